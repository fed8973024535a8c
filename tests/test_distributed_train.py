"""Training under torchrun on the CPU (2 gloo ranks): FSDP2 and DDP follow the single-process loss
curve of the same global batch, checkpoints move between world sizes, and a dying rank fails the
job fast.

Same global batch: rank r takes micro-batches r*A .. r*A+A-1 of each step, so two ranks with
grad_accum=1 see what one process sees with grad_accum=2. The objective is the mean over the
global batch either way; only the order of floating-point sums differs (all-reduce vs
accumulation), so the curves agree to 1e-4 over the run rather than bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import built_once

HELPERS = Path(__file__).parent / "helpers"
TINY = ["--model.vocab-size", "256", "--model.dim", "64", "--model.n-layers", "2", "--model.n-heads", "4",
        "--model.max-seq-len", "64", "--batch-size", "4", "--seq-len", "32", "--optim.lr", "3e-3",
        "--optim.warmup-steps", "2", "--log-interval", "1", "--eval-interval", "4", "--eval-tokens", "256",
        "--ckpt-interval", "4", "--no-progress", "--device", "cpu"]
MOE = ["--model.ffn", "moe", "--model.moe.n-routed-experts", "4", "--model.moe.top-k", "2",
       "--model.moe.expert-dim", "32", "--model.first-k-dense", "1", "--model.mtp-depth", "1"]


def run(args: list[str], nproc: int = 1, env_extra: dict | None = None, script: list[str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    target = script or ["-m", "effllm"]
    if nproc == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
               *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_args(data, out, steps, extra=()):
    return ["train", "dense_tiny", "--data-dir", str(data), "--out-dir", str(out), "--max-steps", str(steps), *TINY,
            *extra]


@pytest.fixture(scope="module")
def single(byte_data, tmp_path_factory):
    """The reference: one process, grad_accum=2, dense and MoE+MTP models."""

    def build(root: Path) -> dict:
        for name, extra in (("dense", []), ("moe", MOE)):
            r = run(train_args(byte_data, root / name, 8, [*extra, "--grad-accum", "2"]))
            assert r.returncode == 0, r.stderr
        return {"root": str(root)}

    root = Path(built_once(tmp_path_factory, "single", build)["root"])
    return {name: root / name for name in ("dense", "moe")}


LAYOUTS = {"fsdp-dense": ("fsdp", "dense", 1), "ddp-dense": ("ddp", "dense", 1), "fsdp-moe": ("fsdp", "moe", 1),
           "ep2-moe": ("fsdp", "moe", 2), "fsdp-dense-sharded": ("fsdp", "dense", 1)}
LAYOUT_ARGS = {"fsdp-dense-sharded": ["--checkpoint-format", "sharded"]}  # torch.distributed.checkpoint's shards


@pytest.fixture(scope="module")
def two_rank(byte_data, tmp_path_factory):
    """The 2-rank runs that several tests read, trained in one torchrun launch: dense under FSDP2 and
    DDP, MoE+MTP under FSDP2 without and with expert parallelism. Tests that cut a run back copy it."""

    def build(root: Path) -> dict:
        args = []
        for name, (kind, model, ep) in LAYOUTS.items():
            extra = [*(MOE if model == "moe" else []), "--data-parallel", kind, "--expert-parallel", str(ep),
                     *LAYOUT_ARGS.get(name, [])]
            args += [*train_args(byte_data, root / name, 8, extra), "--next"]
        r = run(args[:-1], nproc=2, script=[str(HELPERS / "train_several.py")], timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        return {"root": str(root), "stdout": r.stdout}

    built = built_once(tmp_path_factory, "two_rank", build)
    return {"dirs": {name: Path(built["root"]) / name for name in LAYOUTS}, "stdout": built["stdout"]}


def copy_of(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.slow
def test_two_ranks_follow_the_single_process_curve(name, two_rank, single):
    kind, model, _ = LAYOUTS[name]
    assert f"over 2 ranks ({kind})" in two_rank["stdout"]
    run_dir = two_rank["dirs"][name]
    ours, ref = losses(run_dir), losses(single[model])
    assert len(ours) == len(ref) == 8
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-4, (ours, ref)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 8 * 2 * 4 * 32


def back_to_step_4(run_dir: Path) -> None:
    """As if the run had died after its step-4 checkpoint: drop the later one."""
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")


@pytest.mark.slow
def test_checkpoints_move_between_world_sizes(two_rank, single, byte_data, tmp_path):
    """A 2-rank FSDP2 checkpoint at step 4 resumes in 1 process, and a 1-process checkpoint resumes on
    2 ranks; both continue the uninterrupted single-process curve."""
    ref = losses(single["dense"])
    two = copy_of(two_rank["dirs"]["fsdp-dense"], tmp_path / "two")
    back_to_step_4(two)
    r = run(train_args(byte_data, two, 8, ["--grad-accum", "2", "--resume"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step 4" in r.stdout
    assert len(losses(two)) == 8 and max(abs(a - b) for a, b in zip(losses(two), ref, strict=True)) < 1e-4

    one = copy_of(single["dense"], tmp_path / "one")
    back_to_step_4(one)
    # the run's own config has grad_accum=2; two ranks keep the global batch with one micro-batch each
    r = run(train_args(byte_data, one, 8, ["--data-parallel", "fsdp", "--grad-accum", "1", "--resume"]), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(one)) == 8 and max(abs(a - b) for a, b in zip(losses(one), ref, strict=True)) < 1e-4


@pytest.mark.slow
def test_sharded_checkpoints_move_between_world_sizes_and_load_in_one_process(two_rank, single, byte_data, tmp_path):
    """--checkpoint-format sharded: each rank writes its own shards (torch.distributed.checkpoint), no
    model.safetensors is gathered; the checkpoint resumes on 2 ranks bit for bit and in one process on
    the single-process curve, and one process reads its weights whole (generate, export-hf): the
    weights of the same run with full checkpoints."""
    from effllm import checkpoint as ckpt_io

    full = two_rank["dirs"]["fsdp-dense-sharded"]
    step4 = full / "checkpoints" / "step_00000004"
    names = {p.name for p in (step4 / "dcp").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= names
    assert not (step4 / "model.safetensors").exists() and not (step4 / "optimizer.pt").exists()
    state = json.loads((step4 / "state.json").read_text())
    assert state["sharded"] and "dcp/__1_0.distcp" in state["files"]  # hashed and verified as any file
    assert json.loads((full / "summary.json").read_text())["checkpoint_format"] == "sharded"
    ours, _, _ = ckpt_io.load_model(full)
    theirs, _, _ = ckpt_io.load_model(two_rank["dirs"]["fsdp-dense"])
    for key, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], t), key

    two = copy_of(full, tmp_path / "two")
    back_to_step_4(two)
    r = run(train_args(byte_data, two, 8, ["--resume"]), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(two) == losses(full)

    one = copy_of(full, tmp_path / "one")
    back_to_step_4(one)
    r = run(train_args(byte_data, one, 8, ["--resume", "--grad-accum", "2", "--checkpoint-format", "full"]))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(single["dense"])
    assert len(losses(one)) == 8 and max(abs(a - b) for a, b in zip(losses(one), ref, strict=True)) < 1e-4
    assert (one / "checkpoints" / "step_00000008" / "model.safetensors").is_file()

    r = run(["export-hf", "--checkpoint", str(full), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_joined_by_a_c10d_rendezvous_follow_the_single_process_curve(single, byte_data, tmp_path):
    """Multi-node launch as on a cluster: two torchrun agents ("nodes", 1 process each) started
    separately, joined by a c10d rendezvous at 127.0.0.1, train one run in a shared folder."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=effllm-test-{port}", "-m", "effllm",
           *train_args(byte_data, tmp_path / "run", 8)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    ref = losses(single["dense"])
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "run"), ref, strict=True)) < 1e-4


@pytest.mark.slow
def test_wrapper_order_with_compile_and_activation_checkpointing(single, byte_data, tmp_path):
    """Expert sharding, activation checkpointing, torch.compile per block and FSDP2 together (the
    documented order) still follow the single-process curve."""
    r = run(train_args(byte_data, tmp_path / "run", 8, [*MOE, "--expert-parallel", "2", "--compile",
                                                        "--activation-checkpointing"]), nproc=2, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(single["moe"])
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "run"), ref, strict=True)) < 1e-4


@pytest.mark.slow
def test_two_rank_resume_repeats_the_two_rank_run_exactly(two_rank, byte_data, tmp_path):
    """Same world size, same layout: resuming repeats the uninterrupted run's losses bit for bit."""
    full = two_rank["dirs"]["ep2-moe"]
    cut = copy_of(full, tmp_path / "cut")
    back_to_step_4(cut)
    r = run(train_args(byte_data, cut, 8, [*MOE, "--expert-parallel", "2", "--resume"]), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(cut) == losses(full)


@pytest.mark.slow
def test_expert_parallel_checkpoint_holds_every_expert(two_rank, single, byte_data, tmp_path):
    """Experts split over 2 ranks are gathered into the checkpoint: one process resumes from it."""
    run_dir = copy_of(two_rank["dirs"]["ep2-moe"], tmp_path / "ep")
    back_to_step_4(run_dir)
    # the run's own config splits the experts over 2 ranks: one process says so
    r = run(train_args(byte_data, run_dir, 8, [*MOE, "--grad-accum", "2", "--expert-parallel", "1", "--resume"]))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(single["moe"])
    assert max(abs(a - b) for a, b in zip(losses(run_dir), ref, strict=True)) < 1e-4


@pytest.mark.slow
def test_the_bias_update_balances_on_the_load_of_one_process(byte_data, tmp_path):
    """DDP and FSDP2, with and without gradient accumulation, count each MoE layer's expert load over
    the global batch as one process does: at step 1 (the same weights on every rank, so the same
    tokens go to the same experts) the load statistics and the balancing bias after the update equal
    the single process's bit for bit. DDP's default broadcast of rank 0's buffers before every
    forward used to overwrite the other ranks' partial load counts under gradient accumulation."""
    from safetensors.torch import load_file

    def step1(run_dir: Path):
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        weights = load_file(run_dir / "checkpoints" / "step_00000001" / "model.safetensors")
        return record["moe_load"], {k: v for k, v in weights.items() if k.endswith("expert_bias")}

    every_step = ["--ckpt-interval", "1", "--optim.warmup-steps", "1"]
    refs = {}
    for ga in (1, 2):  # one process with 2·ga micro-batches sees what 2 ranks with ga each see
        refs[ga] = tmp_path / f"single-{ga}"
        r = run(train_args(byte_data, refs[ga], 2, [*MOE, "--grad-accum", str(2 * ga), *every_step]))
        assert r.returncode == 0, r.stderr[-3000:]
    layouts = [(kind, ga) for kind in ("ddp", "fsdp") for ga in (1, 2)]
    args = []
    for kind, ga in layouts:  # one torchrun launch for the four runs
        args += [*train_args(byte_data, tmp_path / f"{kind}-{ga}", 2, [*MOE, "--data-parallel", kind, "--grad-accum",
                                                                      str(ga), *every_step]), "--next"]
    r = run(args[:-1], nproc=2, script=[str(HELPERS / "train_several.py")])
    assert r.returncode == 0, r.stderr[-3000:]
    for kind, ga in layouts:
        load, bias = step1(tmp_path / f"{kind}-{ga}")
        ref_load, ref_bias = step1(refs[ga])
        assert load == ref_load, (kind, ga, load, ref_load)
        assert bias.keys() == ref_bias.keys() and len(bias) == 2  # the MoE block and the MTP module's
        for name in bias:
            assert torch.equal(bias[name], ref_bias[name]), (kind, ga, name)


def test_expert_parallelism_without_torchrun_fails_before_work(byte_data, tmp_path):
    r = run(train_args(byte_data, tmp_path / "a", 2, [*MOE, "--expert-parallel", "2"]))
    assert r.returncode == 2 and "needs 2 or more ranks" in r.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_impossible_parallel_layouts_fail_before_work(byte_data, tmp_path):
    r = run(train_args(byte_data, tmp_path / "b", 2, ["--expert-parallel", "2"]), nproc=2)
    assert r.returncode != 0 and "needs MoE layers" in r.stderr
    r = run(train_args(byte_data, tmp_path / "c", 2, [*MOE, "--expert-parallel", "2", "--data-parallel", "ddp"]),
            nproc=2)
    assert r.returncode != 0 and "data_parallel=fsdp" in r.stderr
    r = run(train_args(byte_data, tmp_path / "d", 2, ["--checkpoint-format", "sharded"]))  # one process
    assert r.returncode == 2 and "checkpoint_format=sharded writes FSDP2's shards" in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_fast(byte_data, tmp_path):
    start = time.monotonic()
    r = run(train_args(byte_data, tmp_path / "run", 50, ["--dist-timeout-s", "30"]), nproc=2,
            env_extra={"DIE_RANK": "1", "DIE_STEP": "3"}, script=[str(HELPERS / "die_at_step.py")], timeout=180)
    took = time.monotonic() - start
    assert r.returncode != 0
    assert took < 120, f"the job took {took:.0f} s to fail"
    # torchrun names the rank that died first and its exit code
    assert re.search(r"Root Cause[\s\S]*rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: 17", r.stderr), r.stderr[-2000:]
