"""Loss backends. ``reference`` is the dense oracle; ``torch_fused`` and ``triton_fused`` share
the contract of :mod:`pixcontrast.ops._layout` and never build the anchors x keys matrix."""
