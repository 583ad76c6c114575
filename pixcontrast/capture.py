"""Take a tensor out of a model's own forward: the input or output of a named submodule."""

from __future__ import annotations

import difflib
from typing import Any, Optional

from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from . import _checks

__all__ = ["FeatureCapture", "unwrap_model"]

CAPTURE_SITES = ("output", "input")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: through ``torch.compile``'s ``_orig_mod`` and DDP's ``.module``.

    ``DistributedDataParallel``, ``DataParallel`` and a ``torch.compile``-d module (in any
    nesting) are unwrapped; any other module is returned as it is.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1))
        >>> unwrap_model(net) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while True:
        # torch.compile's OptimizedModule, recognised without importing torch._dynamo
        inner = model._modules.get("_orig_mod")
        if inner is None and isinstance(model, (DistributedDataParallel, DataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


class FeatureCapture:
    r"""Capture the output (or input) of a named submodule during the model's own forward.

    Segmentation models rarely return their decoder's pixel features; this takes them where
    they are produced, without editing the model's ``forward``: a forward hook on the submodule
    ``name`` (a dotted path as in ``model.named_modules()``, resolved through
    ``DistributedDataParallel`` / ``DataParallel``'s ``.module`` and ``torch.compile``'s
    wrapper, so the names of the bare model work on all of them) keeps the tensor, and a forward
    pre-hook on the model drops it at the start of every forward.

    What it holds, and for how long:

    - only what the last forward produced: :meth:`take` returns it and lets it go; a forward
      that follows drops it if it was not taken. The graph behind a captured tensor is thus
      never kept past the step that produced it, and nothing accumulates over steps. A
      submodule that runs more than once in a forward (a shared activation) keeps nothing:
      :meth:`take` says so;
    - only in training mode: when the submodule runs in ``eval()`` mode (validation, inference)
      nothing is kept;
    - :meth:`remove` (or leaving the ``with`` block) removes both hooks.

    Where the feature is in common models (verified against their source):

    - Hugging Face ``SegformerForSemanticSegmentation``: ``"decode_head.activation"``, the fused
      decoder feature ``[B, decoder_hidden_size, H/4, W/4]`` after ``linear_fuse``, batch norm
      and ReLU, before the dropout and the classifier;
    - Hugging Face ``UperNetForSemanticSegmentation``: ``"decode_head.fpn_bottleneck"``
      ``[B, hidden_size, H/4, W/4]``, the classifier's input;
    - segmentation_models_pytorch (``Unet``, ``FPN``, ...): ``"decoder"``, the input of
      ``segmentation_head``.

    Args:
        model: the network, bare or wrapped (DDP, DataParallel, ``torch.compile``).
        name: dotted name of the submodule in the unwrapped model (``""``: the model itself).
        site: ``"output"`` (what the submodule returns) or ``"input"`` (its positional
            argument ``index``).
        index: which element to keep when the captured value is a tuple or list (for
            ``site="input"``: which positional argument, default 0); ``None`` for a tensor
            output.

    Raises:
        AttributeError: ``name`` is not a submodule (the message lists the closest names).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        >>> with FeatureCapture(model, "1") as capture:
        ...     logits = model(torch.randn(2, 3, 16, 16))
        ...     features = capture.take()  # the ReLU's output, [2, 8, 16, 16]
        >>> features.shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self, model: nn.Module, name: str, *, site: str = "output", index: Optional[int] = None
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str (a dotted submodule name), got {name!r}")
        self.site = _checks.check_choice(site, "site", CAPTURE_SITES)
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise TypeError(f"index must be an int or None, got {index!r}")
        self.index = index
        self.name = name
        root = unwrap_model(model)
        self.module = _submodule(root, name)
        self._tensor: Optional[Tensor] = None
        self._runs = 0  # calls of the submodule since the model's last forward began
        self._ran_in_eval = False
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(self._forget),
            self.module.register_forward_hook(self._keep),
        ]

    def _forget(self, module: nn.Module, args: Any) -> None:
        self._tensor = None
        self._runs = 0
        self._ran_in_eval = False

    def _keep(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._runs += 1
        if not module.training:
            self._ran_in_eval = True
            return
        if self._runs > 1:  # which call's tensor is meant is ambiguous: take() says so
            self._tensor = None
            return
        value = output if self.site == "output" else args
        index = 0 if self.site == "input" and self.index is None else self.index
        if index is not None:
            if not isinstance(value, (tuple, list)) or not -len(value) <= index < len(value):
                raise TypeError(
                    f"FeatureCapture(index={index}): the {self.site} of {self.name!r} is "
                    f"{_describe(value)}, which has no element {index}"
                )
            value = value[index]
        if not isinstance(value, Tensor):
            raise TypeError(
                f"the {self.site} of {self.name!r} is {_describe(value)}, not a tensor: pass "
                "index=i to keep its element i, or capture a submodule that returns a tensor"
            )
        self._tensor = value

    def take(self) -> Tensor:
        """The tensor captured in the model's last forward; the capture lets it go.

        Raises:
            RuntimeError: the submodule did not run in the model's last forward, ran more than
                once in it, ran in ``eval()`` mode (nothing is kept then), or its tensor was
                already taken.
        """
        tensor, self._tensor = self._tensor, None
        if not self._handles:
            raise RuntimeError(f"the capture of {self.name!r} was removed")
        if self._runs > 1:
            raise RuntimeError(
                f"{self.name!r} ran {self._runs} times in the model's last forward (a module "
                "called more than once, such as a shared activation): capture a submodule "
                "that runs once per forward"
            )
        if tensor is not None:
            return tensor
        if self._ran_in_eval:
            raise RuntimeError(
                f"{self.name!r} ran in eval() mode: FeatureCapture keeps tensors only in "
                "training mode (so validation and inference hold nothing)"
            )
        if self._runs:
            raise RuntimeError(f"the {self.site} of {self.name!r} was already taken")
        raise RuntimeError(
            f"{self.name!r} did not run in the model's last forward (or no forward ran since "
            "the capture was made): capture a submodule on the path of this forward"
        )

    def remove(self) -> None:
        """Remove both hooks and drop anything held; :meth:`take` then raises."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._tensor = None

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if not self._handles else "holding a tensor" if self._tensor is not \
            None else "empty"
        return f"FeatureCapture({self.name!r}, site={self.site!r}, index={self.index}; {state})"


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _submodule(root: nn.Module, name: str) -> nn.Module:
    """``root.get_submodule(name)``, or an error listing the closest names."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        pass
    modules = [(candidate, module) for candidate, module in root.named_modules() if candidate]
    close = difflib.get_close_matches(name, [candidate for candidate, _ in modules], n=5,
                                      cutoff=0.5)
    # a type name ("relu", "ReLU") instead of the submodule's name
    last = name.rsplit(".", 1)[-1].lower()
    close += [candidate for candidate, module in modules
              if type(module).__name__.lower() == last and candidate not in close][:5]
    hint = f"; the closest names: {', '.join(map(repr, close))}" if close else ""
    raise AttributeError(
        f"{type(root).__name__} has no submodule named {name!r}{hint} (names are those of "
        "model.named_modules(), of the model inside a DDP or torch.compile wrapper)"
    )
