"""Test-session settings shared by tests/ and the doctests of pixcontrast/ (collected by
``--doctest-modules``; see ``[tool.pytest.ini_options]`` in pyproject.toml)."""

import importlib.util
import os

# Triton picks its interpreter when the kernels are defined, so this must precede any import of
# pixcontrast.ops._kernels: the Triton tests then run on CPU tensors. On a GPU machine,
# TRITON_INTERPRET=0 tests the compiled kernels on CUDA tensors instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# --doctest-modules imports every module of the package; the kernels need Triton, which the
# package itself does not (its Triton backend then reports itself unavailable).
collect_ignore = [] if importlib.util.find_spec("triton") else ["pixcontrast/ops/_kernels.py"]
