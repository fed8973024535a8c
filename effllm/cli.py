"""The `effllm` command: prepare | train | generate | recipes.

Each subcommand parses its own dataclass with tyro, so `effllm <subcommand> --help` lists every
field with the comment written beside it. `effllm train <recipe>` starts from the recipe's
TrainConfig and lets any field be overridden: `effllm train dense_tiny --optim.lr 1e-3`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

import effllm.recipes
from effllm import checkpoint as ckpt_io
from effllm.card import CardConfig, write_card
from effllm.config import OptimConfig, TrainConfig, saved_config
from effllm.devices import resolve_device
from effllm.docfields import documented
from effllm.errors import ConfigError, EffllmError, TrainingInterrupted
from effllm.eu_summary import SUMMARY_JSON, write_summary_for
from effllm.hf import ExportConfig, export_hf
from effllm.hf_import import ImportConfig, import_hf
from effllm.model import ModelConfig, Transformer, describe_params
from effllm.mtp import speculative_generate
from effllm.parallelize import exit_rank
from effllm.prepare import PrepareConfig, prepare
from effllm.run import evaluate_checkpoint
from effllm.tokenizer import load_tokenizer
from effllm.train import train

USAGE = """usage: effllm <command> [options]

commands:
  prepare    tokenize the embedded corpus (Python's standard library) or your own text/jsonl
             (--tokenizer byte | bpe | path/to/tokenizer.json)
  train      train a recipe:  effllm train <recipe | config.json | --from RUN_DIR> [--field value ...]
  eval       score a checkpoint:  effllm eval --checkpoint DIR [--data-dir D]  (loss, perplexity, bits/byte)
  generate   sample from a checkpoint:  effllm generate --checkpoint DIR --prompt "..."
  card       write MODEL_CARD.md for a checkpoint:  effllm card --checkpoint DIR [--eu-summary]
  export-hf  write a checkpoint in the Hugging Face transformers layout:  effllm export-hf --checkpoint DIR --out DIR
  import-hf  make a transformers checkpoint an effllm run to train on:  effllm import-hf HF_DIR --out RUN_DIR
  recipes    list the recipes: parameters and what each is for

`effllm <command> --help` lists every option.
"""


@documented
@dataclass
class GenerateConfig:
    """Options of `effllm generate`."""

    checkpoint: str  # a run directory, its checkpoints/ folder, or one step_* folder
    prompt: str = ""  # text to continue (empty = start from an end-of-text token)
    max_new_tokens: int = 200  # tokens to sample
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50  # sample among the k most likely tokens; None = all
    seed: int = 0  # seeds the sampler
    device: str = "auto"  # auto = cuda if available, else cpu
    speculative: bool = False  # greedy decoding drafted by the model's first MTP module (same output, fewer passes)

    def __post_init__(self) -> None:
        if self.speculative and self.temperature != 0:
            raise ConfigError(f"--speculative reproduces greedy decoding, and temperature={self.temperature} "
                              "samples — pass --temperature 0 with --speculative")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature} cannot work — use 0 (greedy) or a positive temperature, "
                              "e.g. 0.8")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} cannot work — use a positive k, e.g. 50, or None for all tokens")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} cannot work — ask for at least 1 token")


@documented
@dataclass
class EvalConfig:
    """Options of `effllm eval`."""

    checkpoint: str  # a run directory, its checkpoints/ folder, or one step_* folder
    data_dir: str | None = None  # prepared data whose val split is scored; None = the data the run trained on
    max_tokens: int | None = None  # tokens to score from the split's start; None = the whole val split
    batch_size: int = 8  # windows per forward pass
    device: str = "auto"  # auto = cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    json: bool = False  # print the result as one JSON object

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ConfigError(f"batch_size={self.batch_size}, max_tokens={self.max_tokens} cannot work — use positive "
                              "numbers (max_tokens None for the whole split)")


def cmd_eval(args: list[str]) -> None:
    cfg = parse(EvalConfig, args, "effllm eval",
                "Score a checkpoint on a prepared val split: loss, perplexity and bits per byte.")
    r = evaluate_checkpoint(cfg.checkpoint, cfg.data_dir, cfg.max_tokens, cfg.batch_size, cfg.device, cfg.precision)
    if cfg.json:
        print(json.dumps(r))
        return
    print(f"{r['checkpoint']} (step {r['step']}) on {r['data_dir']}: val loss {r['loss']:.4f} nats/token, "
          f"perplexity {r['perplexity']:.3f}, {r['bits_per_byte']:.4f} bits per byte ({r['tokens']:,} tokens, "
          f"{r['bytes']:,} bytes, windows of {r['seq_len']}, {r['precision']})")


def recipe_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(effllm.recipes.__path__) if not m.name.startswith("_"))


def recipe_table() -> str:
    """`effllm recipes`: each recipe, its parameters (counted on the meta device: nothing is
    allocated) and the first line of its docstring."""
    rows = []
    for name in recipe_names():
        doc = (importlib.import_module(f"effllm.recipes.{name}").__doc__ or "").strip().splitlines()
        with torch.device("meta"):
            counts = Transformer(load_recipe(name).model).param_counts()
        rows.append((name, describe_params(counts), doc[0].removeprefix(f"{name}:").strip() if doc else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{n:<{widths[0]}}  {c:<{widths[1]}}  {d}" for n, c, d in rows)


def _check_keys(d: dict, cls, where: str) -> None:
    """Refuse a key of a config file that is no field of `cls` (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"{where}: {key!r} is no field of {cls.__name__}"
                              + (f" — did you mean {close[0]!r}?" if close else f" — the fields are {', '.join(names)}"))
        if is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping of {hints[key].__name__} fields, got {value!r}")
            _check_keys(value, hints[key], where)


def config_from_file(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON or YAML file: any subset of its fields (nested as in config.json),
    the rest at TrainConfig's defaults. An unknown field is refused with its closest match."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}) — fix the file") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML, and PyYAML is not installed — pip install pyyaml, or write the "
                              "config as JSON") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({e}) — fix the file") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds {type(d).__name__}, not a mapping of TrainConfig fields")
    _check_keys(d, TrainConfig, str(path))
    d = dict(d)
    model = d.pop("model", {})
    optim = d.pop("optim", {})
    return TrainConfig(model=ModelConfig.from_dict(model), optim=OptimConfig(**optim), **d)


def from_run(run_dir: str | Path) -> TrainConfig:
    """`effllm train --from RUN_DIR`: the configuration that run started with (its config.json), as
    a new run: not resuming, and with the lr schedule spanning the new run's max_steps (the run's
    recorded span is dropped) unless --optim.schedule-steps says otherwise."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--from {run_dir}: no config.json there — name a run directory that effllm train wrote")
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    return replace(cfg, resume=False, optim=replace(cfg.optim, schedule_steps=None))


def load_recipe(name: str):
    """The TrainConfig of recipe `name`: a module of effllm.recipes, a path to a .py file defining
    config(), or a JSON or YAML config file (`config_from_file`)."""
    if name.endswith((".json", ".yaml", ".yml")):
        return config_from_file(name)
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"recipe file {name} does not exist")
        spec = importlib.util.spec_from_file_location(f"effllm_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name in recipe_names():
        module = importlib.import_module(f"effllm.recipes.{name}")
    else:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(recipe_names())}, "
                          "or pass a path to a .py file defining config()")
    if not hasattr(module, "config"):
        raise ConfigError(f"recipe {name} defines no config() function returning a TrainConfig")
    return module.config()


def flags(cls, prefix: str = "") -> list[str]:
    """The command-line flags tyro makes of a config dataclass: --field, --nested.field."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        name = prefix + f.name.replace("_", "-")
        out += flags(hints[f.name], name + ".") if is_dataclass(hints[f.name]) else [f"--{name}"]
    return out


def _one_line_rejection(cls, prog: str):
    """A tyro parse-error hook that raises every rejection of the command line as one ConfigError
    line (what, then how to fix it); an event it does not know goes on to tyro's own message."""
    def hook(event) -> None:
        try:
            kind = type(event).__name__
            argument = getattr(event, "argument", None)
            flag = argument.display_name() if argument is not None else ""
            if kind == "InstantiationFailure":
                message = event.message
            elif kind == "InvalidChoice":
                message = f"{event.value!r} is not one of {', '.join(map(str, event.choices))}"
            elif kind == "UnrecognizedArgs":
                unknown = [t for t in event.tokens if t.startswith("-")] or list(event.tokens)
                close = [m for t in unknown for m in difflib.get_close_matches(t.split("=")[0], flags(cls), n=1)]
                message = (f"unrecognized argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}"
                           + (f" — did you mean {', '.join(close)}?" if close else ""))
            elif kind == "MissingArgs":
                message = "missing " + ", ".join(a.arg.display_name() for a in event.missing_arguments)
            else:
                return
        except AttributeError:  # a tyro whose events look otherwise: its own message
            return
        if flag and flag not in message:
            message = f"{flag}: {message}"
        raise ConfigError(message if "—" in message else f"{message} — see `{prog} --help`")
    return hook


def parse(cls, args: list[str], prog: str, description: str, default=None):
    """tyro's parse of `cls` from `args`, every rejection of the command line (a bad value, an
    unknown flag, a config check) raised as a one-line ConfigError, which `main` prints as
    `effllm: error: ...`. tyro's parse-error hook is private to tyro (pinned in constraints.txt);
    a tyro without it prints its own boxed message and exits 2."""
    try:
        hooks = importlib.import_module("tyro._errors").on_parse_error
    except (ImportError, AttributeError):
        hooks = None
    with hooks(_one_line_rejection(cls, prog)) if hooks else contextlib.nullcontext():
        return tyro.cli(cls, default=default, args=args, prog=prog, description=description)


def run_recipe(default, args: list[str], prog: str) -> dict:
    """Parse overrides of the TrainConfig `default` from `args` and train."""
    description = "Train a model. Every field below can be overridden on the command line."
    cfg = parse(TrainConfig, args, prog, description, default=default)
    if cfg.resume:  # continue the run as it was configured: the command line changes only what it names
        saved = replace(saved_config(cfg.out_dir), resume=True)
        cfg = parse(TrainConfig, args, prog, description, default=saved)
    return train(cfg)  # closes the process group it opened under torchrun; one its caller opened stays


def cmd_prepare(args: list[str]) -> None:
    cfg = parse(PrepareConfig, args, "effllm prepare",
                "Tokenize text into train/val shards with a manifest of sources and licences.")
    out = prepare(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    for skipped in manifest.get("skipped") or []:
        print(f"skipped {skipped['path']} (source {skipped['source']}): {skipped['reason']}", file=sys.stderr)
    tok = manifest["tokenizer"]
    if tok["kind"] == "bpe" and tok["vocab_size"] < cfg.vocab_size:
        print(f"note: the BPE learned {tok['vocab_size']:,} tokens of the {cfg.vocab_size:,} asked: the train split "
              "has no more merges to learn; the model's vocab_size can be as small", file=sys.stderr)
    if manifest["split"].get("forced_val"):
        print(f"note: --val-fraction {cfg.val_fraction} put no document in val; {manifest['split']['forced_val']} "
              "went there instead (recorded in the manifest)", file=sys.stderr)
    for pattern, n in ((manifest.get("filters") or {}).get("opt_out") or {}).get("matched", {}).items():
        if not n:
            print(f"note: opt-out pattern {pattern!r} matched no document", file=sys.stderr)
    print(f"prepared {out}: {totals['files']} files, {totals['train_tokens']:,} train and "
          f"{totals['val_tokens']:,} val tokens; unigram val loss {totals['unigram_val_loss']:.3f}")


def cmd_train(args: list[str]) -> None:
    if not args or args[0].startswith("-"):
        if args and args[0] in ("-h", "--help"):
            print("usage: effllm train <recipe> [--field value ...]\n"
                  "       effllm train config.json | config.yaml [--field value ...]\n"
                  "       effllm train --from RUN_DIR [--field value ...]   (a new run with that run's config)\n\n"
                  "recipes: " + ", ".join(recipe_names())
                  + "\n\n`effllm train <recipe> --help` lists every field and the recipe's values.")
            return
        if args and (args[0] == "--from" or args[0].startswith("--from=")):
            run_dir, rest = (args[1] if len(args) > 1 else "", args[2:]) if args[0] == "--from" else \
                (args[0].split("=", 1)[1], args[1:])
            if not run_dir:
                raise ConfigError("--from needs a run directory: effllm train --from runs/<run> [--field value ...]")
            run_recipe(from_run(run_dir), rest, prog=f"effllm train --from {run_dir}")
            return
        raise ConfigError("name a recipe: effllm train <recipe | config.json | config.yaml | --from RUN_DIR>; "
                          "recipes: " + ", ".join(recipe_names()))
    run_recipe(load_recipe(args[0]), args[1:], prog=f"effllm train {args[0]}")


def cmd_generate(args: list[str]) -> None:
    cfg = parse(GenerateConfig, args, "effllm generate", "Sample text from a trained checkpoint.")
    text, stats = sample(cfg)
    print(text)
    if stats:
        print(f"speculative: {stats['accepted']} of {stats['drafted']} MTP drafts accepted "
              f"({100 * stats['acceptance']:.0f}%)", file=sys.stderr)


def generate_text(cfg: GenerateConfig) -> str:
    """Load the checkpoint `cfg.checkpoint` and continue `cfg.prompt`."""
    return sample(cfg)[0]


def sample(cfg: GenerateConfig) -> tuple[str, dict | None]:
    """(the prompt and its continuation, the speculative drafts' acceptance or None)."""
    device = resolve_device(cfg.device)
    model, state, ckpt = ckpt_io.load_model(cfg.checkpoint, device)
    if cfg.speculative and not model.cfg.mtp_depth:
        raise ConfigError(f"{cfg.checkpoint} has no MTP module to draft with — drop --speculative, or train with "
                          "--model.mtp-depth 1 (deepseek_tiny has one)")
    tokenizer = load_tokenizer(ckpt, state["tokenizer"])
    ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    room = model.cfg.max_seq_len - (1 if cfg.speculative else 0)  # speculative decoding verifies one draft past the end
    budget = room - len(ids)
    if budget <= 0:
        raise ConfigError(f"the prompt is {len(ids)} tokens, the model's limit is {model.cfg.max_seq_len}: shorten it")
    if cfg.max_new_tokens > budget:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} does not fit: the model's context is "
                          f"{model.cfg.max_seq_len} tokens and the prompt takes {len(ids)}"
                          + (" (+1 for the draft)" if cfg.speculative else "")
                          + f" — pass --max-new-tokens {budget} or less, or shorten the prompt")
    prompt = torch.tensor([ids], device=device)
    if cfg.speculative:
        out, stats = speculative_generate(model, prompt, cfg.max_new_tokens)
        return tokenizer.decode(out[0].tolist()), stats
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator=gen)
    return tokenizer.decode(out[0].tolist()), None


def cmd_card(args: list[str]) -> None:
    cfg = parse(CardConfig, args, "effllm card",
                "Write MODEL_CARD.md: architecture, parameters, tokens, compute, data by licence; with --eu-summary, "
                "the EU AI Act's public summary of training content (Markdown and JSON).")
    if cfg.eu_summary:
        md = write_summary_for(cfg.checkpoint, cfg.out, cfg.data_dir, cfg.provider)
        print(f"wrote {md} and {md.with_name(SUMMARY_JSON)}")
        return
    if cfg.provider:
        raise ConfigError("--provider is read with --eu-summary only: add --eu-summary")
    print(f"wrote {write_card(cfg)}")


def cmd_export_hf(args: list[str]) -> None:
    cfg = parse(ExportConfig, args, "effllm export-hf",
                "Write a checkpoint as a transformers model (Llama or DeepseekV3 layout) with a model card.")
    out = export_hf(cfg)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {cfg.checkpoint} to {out} ({arch}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cmd_import_hf(args: list[str]) -> None:
    if args and not args[0].startswith("-"):  # effllm import-hf DIR --out RUN_DIR
        args = ["--source", *args]
    cfg = parse(ImportConfig, args, "effllm import-hf",
                "Import a transformers checkpoint (Llama or DeepseekV3 layout) as an effllm run directory whose "
                "weights start new runs: effllm train --from RUN_DIR --data-dir DATA --out-dir NEW_RUN.")
    out = import_hf(cfg)
    ckpt = ckpt_io.resolve_checkpoint(out)
    state = ckpt_io.read_state(ckpt)
    model = ModelConfig.from_dict(state["config"]["model"])
    tok = state["tokenizer"]
    with torch.device("meta"):  # counted without allocating
        counts = Transformer(model).param_counts()
    print(f"imported {cfg.source} into {out} ({describe_params(counts)})")
    if tok is None:
        print(f"note: {cfg.source} has no tokenizer.json: prepare data with the model's tokenizer "
              "(effllm prepare --tokenizer path/to/tokenizer.json)", file=sys.stderr)
    prep = f"effllm prepare --tokenizer {ckpt / 'tokenizer.json'} ... --out DATA" if tok and tok["kind"] == "file" else \
        f"effllm prepare --tokenizer {tok['kind']} ... --out DATA" if tok else "effllm prepare ... --out DATA"
    print(f"continue training it: {prep}, then effllm train --from {out} --data-dir DATA --out-dir runs/NAME")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "export-hf": cmd_export_hf, "import-hf": cmd_import_hf,
                "card": cmd_card,
                "recipes": lambda a: print(recipe_table())}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"effllm: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        commands[argv[0]](argv[1:])
    except TrainingInterrupted as e:
        print(f"effllm: {e}", file=sys.stderr)
        return e.exit_code
    except EffllmError as e:
        print(f"effllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop: every writer removes its unfinished output
        print("effllm: interrupted; nothing unfinished was left in place", file=sys.stderr)
        return 130
    return 0


def console() -> int:
    """The `effllm` command and `python -m effllm`: run `main` and return its exit code. Under
    torchrun (WORLD_SIZE > 1) the rank ends through effllm.parallelize.exit_rank instead, skipping
    the interpreter's finalization, in which gloo's threads can abort a finished rank. Everything
    is on disk by then: checkpoints and metrics are written and closed before train() returns."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(console())
