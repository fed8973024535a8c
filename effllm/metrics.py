"""A run's metrics: one record per log interval, written to metrics.jsonl and, with
`TrainConfig.tensorboard`, to TensorBoard event files in the run's tensorboard/ folder.

Both get the same numbers from the same record: a TensorBoard tag is the record's key, nested keys
joined by "/" (`loss`, `val_loss`, `lr`, `tokens_per_s`, `moe_load/blocks.1.ffn/cv`, ...). Texts
that describe the run once (its parameters, the FP8 backend) go to TensorBoard's text tab.
TensorBoard is an optional dependency (`pip install 'effllm[tensorboard]'`): `check_tensorboard`
says so before a run starts, and the package is imported only when a run asks for it.

A resumed run first drops what the run wrote past its checkpoint: metrics.jsonl lines are cut, and
TensorBoard is told to purge the events from that step on, so both hold one value per step.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from effllm.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """Fail early when TensorBoard output is asked for and the package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install 'effllm[tensorboard]' (or pip install tensorboard), or drop --tensorboard")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines past `last_step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers by TensorBoard tag: nested keys joined by "/", `step` and None left out."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[tag] = float(value)
    return out


class MetricsLog:
    """The writer of one run's metrics on the rank that writes files (`enabled`; the others get a
    log that writes nothing). `start_step` > 0 continues a run (see the module's docstring)."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool, tensorboard: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        if start_step:
            truncate_metrics(self.path, start_step)
        else:
            self.path.write_text("")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            # purge_step: TensorBoard discards the events a crashed run wrote past the checkpoint's step
            self._writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR),
                                         purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        """One metrics line (the record has a "step"), and its numbers as TensorBoard scalars."""
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for tag, value in scalars(record).items():
                self._writer.add_scalar(tag, value, record["step"])
            self._writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """A description of the run (TensorBoard's text tab; metrics.jsonl holds numbers only)."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
