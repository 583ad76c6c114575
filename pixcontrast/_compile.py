"""Cooperation with ``torch.compile`` that imports nothing of it up front.

Nothing of it is imported (``torch._dynamo`` brings in Triton) at import time or in eager mode.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["eager_under_compile"]

Function = TypeVar("Function", bound=Callable)

# public as torch.compiler.is_compiling from torch 2.3; the same flag before that
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling


def eager_under_compile(fn: Function) -> Function:
    """``fn``, run eagerly when ``torch.compile`` traces a caller.

    Dynamo breaks the graph before and after the call (``torch.compiler.disable``) instead of
    tracing into it. For functions that synchronise with the host and then make tensors of
    data-dependent size, which fake-tensor tracing cannot. Eager calls go straight to ``fn``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_compiling():  # (a constant while dynamo traces; disable is made at trace time)
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
