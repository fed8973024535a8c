"""Test helper: `effllm train` in which rank DIE_RANK exits abruptly after DIE_STEP optimizer steps,
as a process killed by the OOM killer or a lost node would. Used under torchrun by
test_distributed_train.py to check that the job fails fast instead of hanging."""

import importlib
import os
import sys

from effllm.cli import main

train_module = importlib.import_module("effllm.train")  # the module (effllm.train is also a function's name)

die_rank, die_step = int(os.environ["DIE_RANK"]), int(os.environ["DIE_STEP"])
steps = 0
real_update = train_module.optimizer_update


def update_then_maybe_die(*args, **kwargs):
    global steps
    steps += 1
    if int(os.environ.get("RANK", 0)) == die_rank and steps == die_step:
        os._exit(17)
    return real_update(*args, **kwargs)


train_module.optimizer_update = update_then_maybe_die
sys.exit(main(sys.argv[1:]))
