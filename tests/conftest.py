import os

# Triton picks its interpreter when the kernels are defined, so this must precede any import of
# pixcontrast.ops._kernels: the Triton tests then run on CPU tensors. On a GPU machine,
# TRITON_INTERPRET=0 tests the compiled kernels on CUDA tensors instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
