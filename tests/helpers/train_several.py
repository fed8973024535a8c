"""Test helper: under one torchrun job, run `effllm train ...` once per argument group (groups are
separated by a lone `--next`), so that one launch covers several distributed trainings. The
process group is opened here, before the first run, so every run reuses it (train() closes only
a group it opened itself)."""

import datetime
import sys

import torch.distributed as dist

from effllm.cli import main
from effllm.parallelize import exit_rank

runs, current = [], []
for arg in sys.argv[1:]:
    if arg == "--next":
        runs.append(current)
        current = []
    else:
        current.append(arg)
runs.append(current)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
code = 0
for args in runs:
    code = main(args)
    if code:
        break
dist.destroy_process_group()
exit_rank(code)
