"""Provenance: checkpoints name their data manifest, and the model card's numbers are the run's."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_train_config
from safetensors import safe_open

from effllm import checkpoint as ckpt_io
from effllm.card import licence_shares
from effllm.cli import main
from effllm.errors import CheckpointError
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
        from effllm.card import CardConfig, write_card

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
