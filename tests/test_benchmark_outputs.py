"""Benchmark runs write to a folder of their own: never over the committed record unless asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def parser():
    return common.base_parser("doc", common.RESULTS_ROOT / "moe_layer", "quick")


def test_a_run_writes_a_new_folder_and_never_the_record_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUNS_ROOT", tmp_path / "runs")
    args = common.parse_args(parser(), ["--quick"])
    assert args.out.parent == tmp_path / "runs" and args.out.name.startswith("moe_layer-")
    again = common.parse_args(parser(), ["--out", str(args.out)])  # a folder this benchmark wrote: reused
    assert again.out == args.out
    with pytest.raises(SystemExit):  # the committed record only through --update-record
        common.parse_args(parser(), ["--out", str(common.RESULTS_ROOT / "moe_layer")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit):
        common.parse_args(parser(), ["--out", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234-dirty")
    with pytest.raises(SystemExit):  # a record names a clean commit
        common.parse_args(parser(), ["--update-record"])
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234")
    assert common.parse_args(parser(), ["--update-record"]).out == common.RESULTS_ROOT / "moe_layer"
    monkeypatch.setattr(common, "RESULTS_ROOT", tmp_path / "benchmarks" / "results")
    first = common.base_parser("doc", common.RESULTS_ROOT / "new_bench", "quick")  # no record yet: made
    assert common.parse_args(first, ["--update-record"]).out.is_dir()
