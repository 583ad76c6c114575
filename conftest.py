"""Test-session settings shared by tests/ and the doctests of pixcontrast/ (collected by
``--doctest-modules``; see ``[tool.pytest.ini_options]`` in pyproject.toml)."""

import importlib.util
import os

import pytest
import torch

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
