"""Checkpoints: model weights in safetensors, optimizer and RNG state, a JSON train state.

Layout of a run directory:

    checkpoints/step_00000500/  model.safetensors, optimizer.pt, rng.pt, state.json
    checkpoints/latest          name of the newest complete checkpoint

A weights-only checkpoint (`optimizer=None`: what `effllm import-hf` writes) has no optimizer or
RNG state; it starts new runs (`--init-from`) and is never resumed.

A sharded checkpoint (`save_sharded_checkpoint`, FSDP2 runs with checkpoint_format "sharded")
holds torch.distributed.checkpoint's folder dcp/ in place of model.safetensors and optimizer.pt:
each rank writes its own shards, no rank gathers the full state. It is finished (hashes,
state.json, rename, `latest`) as the other format is, so it is as atomic, and it loads at any
world size, one process included.

A checkpoint is written into a hidden temporary directory, every file flushed to disk, its
sha256 recorded in state.json (written last), and only then renamed into place; `latest` is
replaced by an atomic rename after that. A process killed at any moment therefore leaves the
previous checkpoint and pointer intact. Loading verifies every file's sha256, so a truncated or
corrupted file is reported as such instead of loading garbage.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_file, save_model

from effllm.errors import CheckpointError
from effllm.fsutil import fsync_dir, replace_dir, sha256_file, write_file_synced
from effllm.model import ModelConfig, Transformer

STATE_FORMAT = "effllm-checkpoint/1"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    extra_files: dict[str, Path] | None = None,
    keep: int = 2,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints.

    `model_state` / `optimizer_state`, when given, are written instead of `model` and `optimizer`'s
    own state dicts: a distributed run passes the full states gathered from its ranks, in the
    single-device layout. With `optimizer` None the checkpoint holds the weights only."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    # The weights file names the data it was trained on, so it says so even when copied on its own.
    metadata = {"format": "pt", "step": str(step)}
    if state.get("data_manifest_sha256"):
        metadata["data_manifest_sha256"] = state["data_manifest_sha256"]
    if model_state is None:
        save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
    else:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"),
                  metadata=metadata)
    if optimizer is not None or optimizer_state is not None:
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        _save_rng(tmp)
    else:
        state = {**state, "weights_only": True}
    return _finish(root, tmp, final, state, extra_files, keep)


def _save_rng(folder: Path) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / "rng.pt")


def _finish(root: Path, tmp: Path, final: Path, state: dict, extra_files: dict[str, Path] | None, keep: int) -> Path:
    """The rest of an atomic save, once the weights and optimizer state are in `tmp`: the extra
    files, every file flushed and hashed into state.json (written last), the rename into place,
    the `latest` pointer, and the pruning of older checkpoints."""
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        with open(tmp / name, "rb+") as fh:
            os.fsync(fh.fileno())
    state = {"format": STATE_FORMAT, "step": final_step(final), **state,
             "files": {n: sha256_file(tmp / n) for n in files}}
    write_file_synced(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
    for name in files:  # safetensors writes 0600, torch.distributed.checkpoint its own modes; the rest the umask's
        shutil.copymode(tmp / "state.json", tmp / name)
    for folder in {(tmp / n).parent for n in files}:
        fsync_dir(folder)

    replace_dir(tmp, final)  # the same step may be saved again after a resume
    pointer_tmp = root / ".latest.tmp"
    write_file_synced(pointer_tmp, (final.name + "\n").encode())
    os.replace(pointer_tmp, root / "latest")
    fsync_dir(root)

    complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    for stale in complete[: max(0, len(complete) - keep)]:
        if stale != final:
            shutil.rmtree(stale)
    return final


def final_step(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def save_sharded_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, extra_files: dict[str, Path] | None = None, keep: int = 2) -> Path:
    """Collective (every rank calls it): checkpoint `step` in torch.distributed.checkpoint's sharded
    format, each rank writing its own shards of the FSDP2 weights and optimizer state into dcp/
    (no rank gathers the full state), then rank 0 the RNG state, state.json and the rename, exactly
    as `save_checkpoint` finishes. Any world size resumes it (`load_sharded_state`), and one
    process reads its weights (`load_weights`: generate, eval, export-hf)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    main = dist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))  # files synced per rank
    if main:
        _save_rng(tmp)
        _finish(root, tmp, final, {**state, "sharded": True}, extra_files, keep)
    dist.barrier()
    return final


SHARDED_DIR = "dcp"  # the torch.distributed.checkpoint folder of a sharded checkpoint


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDED_DIR).is_dir()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (via `latest`, else the highest step), or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a checkpoints/ root, or a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found at {path}: pass a run directory, its checkpoints/ "
                          "folder, or one step_* folder inside it")


def read_state(ckpt: Path) -> dict:
    """The JSON train state of checkpoint `ckpt`, with every file's sha256 verified."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'} is unreadable or corrupt ({e}): "
                              "resume from an earlier checkpoint or start a new run") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt} is not an effllm checkpoint of format {STATE_FORMAT}")
    for name, digest in state["files"].items():
        path = ckpt / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is missing, truncated or corrupt (its sha256 does not match "
                "state.json): delete this checkpoint directory to fall back to an earlier one, or start a new run"
            )
    return state


def check_model_config(ckpt: Path, saved, model_config) -> None:
    """Fail, naming the differing fields, if `ckpt` (written for ModelConfig `saved`) cannot resume
    as `model_config`: the fields that set the weights' shapes or the function they compute must
    match; kernel backends, the decode path and loss weights may change (ModelConfig.resume_changes)."""
    diff = saved.resume_changes(model_config)
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {ckpt} was written for a different model config ({listing}): "
                              "use the same model settings as that run, or a new out_dir")


def _dcp_load(state: dict, ckpt: Path) -> None:
    """torch.distributed.checkpoint's load of `state` (its tensors filled in place) from a sharded
    checkpoint: collective under a process group, in this process alone without one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what this call is for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR), no_dist=not dist.is_initialized())
    except (RuntimeError, ValueError, KeyError) as e:  # DCP wraps its ranks' failures in CheckpointException
        raise CheckpointError(f"cannot load the sharded checkpoint {ckpt} ({str(e).splitlines()[0][:300]}): it is "
                              "damaged or written for another model") from None


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load the weights of a verified checkpoint into `model` (strict: every tensor must match):
    model.safetensors, or a sharded checkpoint's shards (read whole: any world size, one process
    included, consolidates them)."""
    if is_sharded(ckpt):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        sd = get_model_state_dict(model)
        _dcp_load({"model": sd}, ckpt)
        set_model_state_dict(model, sd)
        return
    try:
        missing, unexpected = load_safetensors_into(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {ckpt / 'model.safetensors'} ({e}): "
                              "the checkpoint is damaged or written for another model") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} does not match the model "
                              f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               check=None) -> tuple[Transformer, dict, Path]:
    """The model of the checkpoint at `path` (a step directory, a checkpoints/ folder or a run
    directory), its weights loaded on `device`, in eval mode; with the checkpoint's verified state
    and its directory. `check(model_config)`, if given, runs before the model is built."""
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    cfg = ModelConfig.from_dict(state["config"]["model"])
    if check is not None:
        check(cfg)
    model = Transformer(cfg).to(device)
    load_weights(ckpt, model)
    return model.eval(), state, ckpt


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, load_optimizer=None,
                        model: torch.nn.Module | None = None) -> None:
    """Restore optimizer state and RNG states from a verified checkpoint. `load_optimizer(state)`
    replaces `optimizer.load_state_dict` (a sharded optimizer loads the full state its own way). A
    sharded checkpoint's optimizer state is resharded onto `model`'s layout, whatever it is (FSDP2
    over any number of ranks, or one process)."""
    if is_sharded(ckpt):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if model is None:
            raise ValueError("a sharded checkpoint's optimizer state loads onto its model: pass model=")
        osd = get_optimizer_state_dict(model, optimizer)
        _dcp_load({"optim": osd}, ckpt)
        set_optimizer_state_dict(model, optimizer, osd)
    elif load_optimizer is None:
        device = next(iter(optimizer.param_groups[0]["params"])).device
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    else:
        load_optimizer(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
