"""Provenance: checkpoints name their data manifest, and the model card's numbers are the run's."""

from __future__ import annotations

import json
import re

import pytest
from helpers import tiny_train_config
from safetensors import safe_open

from effllm import checkpoint as ckpt_io
from effllm.card import CardConfig, licence_shares, write_card
from effllm.cli import main
from effllm.config import OptimConfig
from effllm.errors import CheckpointError, OutputError
from effllm.hf import ExportConfig, export_hf
from effllm.model import ModelConfig, Transformer
from effllm.run import build_optimizer
from effllm.train import train


def test_card_and_checkpoint_carry_the_runs_provenance(byte_data, tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(tiny_train_config(byte_data, run, max_steps=4, goldfish_k=4))
    manifest = json.loads((byte_data / "manifest.json").read_text())
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    state = ckpt_io.read_state(ckpt)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata()["data_manifest_sha256"] == state["data_manifest_sha256"]

    card = (run / "MODEL_CARD.md").read_text()
    assert f"{summary['tokens_seen']:,} tokens seen" in card
    assert f"{summary['params']['total']:,} in total, {summary['params']['active']:,} active" in card
    assert f"`{state['data_manifest_sha256']}`" in card
    assert f"{summary['final_val_loss']:.4f} nats/token" in card
    assert "Goldfish loss drops 1/4" in card
    assert "Opt-outs honoured: no opt-out list was given." in card and "Exact deduplication: sha256" in card
    t = manifest["totals"]
    kept_bytes = sum(f["kept_bytes"] for f in manifest["files"])
    row = f"| PSF-2.0 | 1 | {t['files']:,} | {kept_bytes:,} | 100.0% | {t['train_tokens']:,} | 100.0% |"
    assert row in card
    hours = re.search(r"= ([0-9.e-]+) device-hours", card).group(1)
    assert float(hours) == pytest.approx(state["elapsed_s"] / 3600, rel=1e-2)

    # `effllm card` writes the same card from the checkpoint alone
    (run / "MODEL_CARD.md").unlink()
    assert main(["card", "--checkpoint", str(run)]) == 0
    assert (run / "MODEL_CARD.md").read_text() == card
    # data that is not the run's is refused, not described
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "totals": {**t, "files": 1}}))
    with pytest.raises(CheckpointError, match="not the manifest"):
        write_card(CardConfig(checkpoint=str(run), data_dir=str(other)))


def test_licence_shares_split_bytes_and_tokens_by_licence():
    manifest = {"sources": [{"license": "MIT"}, {"license": "CC-BY-4.0"}, {"license": None}],
                "files": [{"source": 0, "bytes": 300, "tokens": {"train": 30, "val": 1}},
                          {"source": 1, "bytes": 100, "tokens": {"train": 10, "val": 0}},
                          {"source": 0, "bytes": 300, "tokens": {"train": 50, "val": 0}},
                          {"source": 2, "bytes": 300, "tokens": {"train": 10, "val": 0}}]}
    rows = {r["license"]: r for r in licence_shares(manifest)}
    assert rows["MIT"]["bytes"] == 600 and rows["MIT"]["byte_share"] == pytest.approx(0.6)
    assert rows["MIT"]["token_share"] == pytest.approx(80 / 100) and rows["MIT"]["files"] == 2
    assert rows["unknown"]["bytes"] == 300  # no licence recorded is said so, never dropped silently
    assert sum(r["token_share"] for r in rows.values()) == pytest.approx(1.0)


def test_provenance_survives_a_change_of_folder(byte_data, tmp_path, monkeypatch, capsys):
    """The run keeps a copy of its data manifest (in the run directory and in every checkpoint), so a
    card or export written after the run moved, from another folder, with the data gone, still lists
    its sources and licences. Without any copy (a checkpoint written before they existed) both are
    refused, and a good card is never overwritten by one that lacks them."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    monkeypatch.chdir(tmp_path)
    train(tiny_train_config("data", tmp_path / "run", max_steps=2))  # data_dir recorded as a relative path
    shutil.move(tmp_path / "run", tmp_path / "moved")
    shutil.rmtree(data)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "moved" / "MODEL_CARD.md").unlink()
    assert main(["card", "--checkpoint", str(tmp_path / "moved")]) == 0
    assert "| PSF-2.0 | 1 |" in (tmp_path / "moved" / "MODEL_CARD.md").read_text()
    assert main(["export-hf", "--checkpoint", str(tmp_path / "moved"), "--out", str(tmp_path / "hf")]) == 0
    assert "PSF-2.0" in (tmp_path / "hf" / "README.md").read_text()

    # a checkpoint with no copy of its manifest, whose data is gone: refused, nothing overwritten
    old = tmp_path / "old"
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "moved" / "checkpoints")
    state = ckpt_io.read_state(ckpt)
    model = Transformer(ModelConfig.from_dict(state["config"]["model"]))
    ckpt_io.load_weights(ckpt, model)
    ckpt_io.save_checkpoint(old / "checkpoints", 2, model, build_optimizer(model, OptimConfig()),
                            state={k: v for k, v in state.items() if k not in ("format", "step", "files")})
    (old / "MODEL_CARD.md").write_text(card := (tmp_path / "moved" / "MODEL_CARD.md").read_text())
    capsys.readouterr()
    assert main(["card", "--checkpoint", str(old)]) == 2
    assert "pass --data-dir" in capsys.readouterr().err
    assert (old / "MODEL_CARD.md").read_text() == card
    assert main(["export-hf", "--checkpoint", str(old), "--out", str(tmp_path / "hf2")]) == 2
    assert not (tmp_path / "hf2").exists()


def test_card_and_export_never_replace_what_effllm_did_not_write(byte_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(byte_data, run, max_steps=2))
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    with pytest.raises(OutputError, match="not a model card effllm wrote"):
        write_card(CardConfig(checkpoint=str(run), out=str(notes)))
    assert notes.read_text() == "my notes"
    theirs = tmp_path / "their-model"  # a folder of another model
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by effllm export-hf"):
            export_hf(ExportConfig(checkpoint=str(run), out=str(theirs), overwrite=overwrite))
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json"]
    with pytest.raises(OutputError, match="lies inside --out"):  # the export would replace the checkpoint itself
        export_hf(ExportConfig(checkpoint=str(run), out=str(tmp_path), overwrite=True))
    out = export_hf(ExportConfig(checkpoint=str(run), out=str(tmp_path / "hf")))
    export_hf(ExportConfig(checkpoint=str(run), out=str(out), overwrite=True))  # an earlier export: replaced
    (out / "extra.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(extra.txt\)"):
        export_hf(ExportConfig(checkpoint=str(run), out=str(out), overwrite=True))
    assert (out / "extra.txt").read_text() == "mine"
