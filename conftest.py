"""Test-session settings shared by tests/ and the doctests of pixcontrast/ (collected by
``--doctest-modules``; see ``[tool.pytest.ini_options]`` in pyproject.toml)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tests/ import their shared helpers (tests/_helpers.py) and the developer tools (tools/) as
# top-level modules, from every folder of tests/
ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools")]

# Triton picks its interpreter when the kernels are defined, so this must precede any import of
# pixcontrast.ops._kernels: the Triton tests then run on CPU tensors. On a GPU machine,
# TRITON_INTERPRET=0 tests the compiled kernels on CUDA tensors instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# --doctest-modules imports every module of the package; the kernels need Triton, which the
# package itself does not (its Triton backend then reports itself unavailable).
collect_ignore = [] if importlib.util.find_spec("triton") else ["pixcontrast/ops/_kernels.py"]


_DTYPES = ("float64", "float32", "float16", "bfloat16")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu",
        help="device of the tests that take the `device` fixture (cpu, cuda, cuda:1, ...); "
        "they skip when it is not available",
    )
    parser.addoption(
        "--dtype", default="float64", choices=_DTYPES,
        help="floating-point dtype of the tests that take the `dtype` fixture",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device given by ``--device`` (tests build their inputs on CPU, then move them)."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {chosen}: CUDA is not available")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        pytest.skip(f"--device {chosen}: only {torch.cuda.device_count()} CUDA devices")
    return chosen


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The floating-point dtype given by ``--dtype``."""
    return getattr(torch, request.config.getoption("--dtype"))


# What eager use loads, in a fresh interpreter without TRITON_INTERPRET or PIXCONTRAST_BACKEND
# (a user's setting): sampling and mining (tests/contracts/test_compile.py: no torch._dynamo),
# then the ``auto`` loss on CPU tensors and ``backend="triton"`` (tests/ops/test_dispatch.py: no
# Triton, and the reason). One process for both files' checks, so one start-up; each step records
# what was loaded after it.
_EAGER_SCRIPT = """
import json, sys, torch, pixcontrast
report = {}
sample = pixcontrast.HardAnchorSampler()(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4).long())
pixcontrast.mining.mine_keys(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), miner="semi-hard",
                      num_positives=1, num_negatives=1)
report["sampled"] = sample.indices.numel()
report["dynamo_after_sampling_and_mining"] = "torch._dynamo" in sys.modules
x = torch.randn(6, 8, requires_grad=True)
y = torch.tensor([0, 0, 1, 1, 2, 2])
pixcontrast.contrastive_loss(x, y).backward()
report["triton_after_auto"] = "triton" in sys.modules
try:
    pixcontrast.contrastive_loss(x, y, backend="triton")
except ValueError as error:
    report["triton_backend_error"] = str(error)
else:
    report["triton_backend_error"] = None
print(json.dumps(report))
"""


@pytest.fixture(scope="session")
def fresh_eager_process() -> dict:
    """The report of :data:`_EAGER_SCRIPT`, run once per session (after its own check that the
    process succeeded)."""
    from pixcontrast.ops import _dispatch

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _dispatch.ENV_VAR)}
    result = subprocess.run([sys.executable, "-c", _EAGER_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
