"""The efficiency benchmark's pieces: the report builder on a small fixture (invented round numbers,
not measurements), the time-to-target interpolation and the ratios, and the throughput and
equal-time measurements on a tiny model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import tiny_train_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import report  # noqa: E402
import tokens_per_gpu_hour as bench  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "efficiency_results.json"


def test_time_to_reach_interpolates_between_evaluations():
    curve = [{"train_s": 10.0, "val_loss": 3.0}, {"train_s": 20.0, "val_loss": 2.0}, {"train_s": 30.0, "val_loss": 1.5}]
    assert bench.time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert bench.time_to_reach(curve, 2.0) == pytest.approx(20.0)
    assert bench.time_to_reach(curve, 3.5) == pytest.approx(10.0)  # reached at the first evaluation
    assert bench.time_to_reach(curve, 1.0) is None


def test_ratios_against_the_baseline_of_the_same_run():
    r = json.loads(FIXTURE.read_text())
    ratios = bench.ratios(r["rows"])
    assert ratios["deepseek / dense equal-active, tokens per device-hour"] == pytest.approx(0.8)
    assert ratios["deepseek / dense equal-total, tokens per device-hour"] == pytest.approx(2.0)
    # deepseek's curve crosses the baseline's final 2.0 halfway between 2.2 (50 s) and 1.8 (100 s)
    assert r["rows"][2]["quality"]["time_to_baseline_loss_s"] == pytest.approx(75.0)
    assert ratios["deepseek: compute multiplier (baseline time / time to reach its final loss)"] == pytest.approx(100 / 75)
    assert r["rows"][1]["quality"]["time_to_baseline_loss_s"] is None  # the wide dense model never gets there
    assert not any("FP8" in k for k in ratios)  # the FP8 row was skipped


def test_report_rebuilds_from_json(tmp_path):
    folder = tmp_path / "efficiency-cpu-quick"
    folder.mkdir()
    r = json.loads(FIXTURE.read_text())
    r["ratios"] = bench.ratios(r["rows"])
    (folder / "results.json").write_text(json.dumps(r))
    written = report.write_report(folder)
    md = (folder / "report.md").read_text()
    assert "tokens per CPU-hour" in md and "GPU-hour" not in md
    assert "| DeepSeek-style | deepseek_tiny | 4.60M (+1.40M MTP) / 1.70M |" in md
    assert "skipped: no FP8 tensor cores on a CPU" in md
    assert "| DeepSeek-style throughput at least 0.6x the dense model of equal active parameters | 0.80x | yes |" in md
    assert "| DeepSeek-style reaches the dense baseline's final loss in at most 1/1.5 of its time | 1.33x | **no** |" in md
    assert "| dense, equal total | 40 | 163,840 | 100 | 2.2000 | not reached |" in md
    assert {p.name for p in written} == {"report.md", "throughput.png", "val_loss.png"}
    assert all((folder / n).stat().st_size > 1000 for n in ("throughput.png", "val_loss.png"))
    # a DeepSeek-style curve that never reaches the baseline's loss is a measured "no", not "not measured"
    r["rows"][2]["quality"]["curve"] = [{"step": 80, "train_s": 100.0, "device_hours": 0.03, "val_loss": 2.1}]
    r["rows"][2]["quality"]["final_val_loss"] = 2.1
    r["ratios"] = bench.ratios(r["rows"])
    (folder / "results.json").write_text(json.dumps(r))
    report.write_report(folder)
    assert "| never reached it within the budget (final loss 2.1000) | **no** |" in (folder / "report.md").read_text()


def test_throughput_and_equal_time_run_on_a_tiny_model(byte_data, tmp_path):
    cfg = tiny_train_config(byte_data, tmp_path / "unused", max_steps=10)
    tp = bench.measure_throughput(cfg, bench.torch.device("cpu"), warmup=1, repeats=3)
    assert tp["tokens_per_s"] == pytest.approx(cfg.tokens_per_step / tp["step_s_median"])
    assert tp["mfu"] is None and tp["params"]["total"] > 0
    q = bench.equal_time_run(cfg, budget_s=1.0, tokens_per_s=30 * cfg.tokens_per_step, run_dir=tmp_path / "run",
                             evals=3)
    assert q["steps"] == 30 and len(q["curve"]) == 3 and q["curve"][-1]["step"] == 30
    assert q["final_val_loss"] == q["curve"][-1]["val_loss"]
    assert 0 < q["curve"][0]["train_s"] < q["curve"][-1]["train_s"] <= q["train_s"] + 1e-9
    shutil.rmtree(tmp_path / "run")
