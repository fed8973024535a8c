"""pytest's hooks and the shared fixtures: a small real corpus (one package of the standard library)
prepared once. What tests share besides fixtures is in tests/helpers/."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit reads this variable when
# a kernel is decorated, so it must be set before effllm.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # on a GPU the FP8 kernels run one fixed configuration: autotuning every test shape takes minutes
    os.environ.setdefault("EFFLLM_FP8_AUTOTUNE", "0")

from helpers import SMALL_CORPUS  # noqa: E402  (imports effllm: after TRITON_INTERPRET is set)

from effllm.prepare import PrepareConfig, prepare  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    # Small tensors: one thread avoids oversubscription when the suite runs beside other work.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def small_prepare_config() -> PrepareConfig:
    return PrepareConfig(sources=(str(SMALL_CORPUS),), license="PSF-2.0", extensions=(".py",), val_fraction=0.15)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, small_prepare_config) -> Path:
    out = tmp_path_factory.mktemp("data") / "email-byte"
    return prepare(replace(small_prepare_config, out=str(out)), progress=False)


# The modules that take longest, longest first (README, "The test suite"). `make test` runs the
# suite on two workers (pytest -n 2 --dist worksteal): each starts on its half of the collected
# tests, in order, and one that runs dry takes tests from the end of the other's. Longest first, so
# that test_recipes' 3.5-minute training test (a third of the suite's CPU time) starts at once.
LONGEST_FIRST = ("test_recipes.py", "test_fp8_experts.py", "test_distributed_train.py", "test_fp8.py",
                 "test_train.py", "test_cli.py", "test_hopper_compile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
