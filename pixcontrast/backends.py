"""Which backend :func:`~pixcontrast.contrastive_loss` runs, and why.

``backend="auto"`` (the default) takes Triton only for the (GPU capability, dtype) pairs of
:data:`TRITON_MEASURED_WINS`, where committed GPU measurements show it faster than the torch
path, and the torch path otherwise; :func:`explain_auto` says which one it takes for given
tensors and why it passed over the others. The environment variable :data:`ENV_VAR`
(``PIXCONTRAST_BACKEND``) replaces ``"auto"`` without a code change.

Example:
    >>> import torch
    >>> print(explain_auto(torch.randn(4, 8)))
    auto -> 'torch'
      not 'triton': auto takes Triton for CUDA tensors only
"""

from .ops import BACKEND_NAMES, ENV_VAR, TRITON_MEASURED_WINS, explain_auto

__all__ = ["BACKEND_NAMES", "ENV_VAR", "TRITON_MEASURED_WINS", "explain_auto"]
