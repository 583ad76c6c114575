"""FeatureCapture: the tensor of a named submodule from the model's own forward, on a plain,
wrapped or compiled model; nothing held past a step; clear errors. (Under DDP:
tests/test_distributed.py.)"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from pixcontrast import FeatureCapture
from pixcontrast.capture import unwrap_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.decoder = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.classifier = nn.Conv2d(8, 4, 1)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder(self.stem(x)))


def decoder_output(net: Net, x: torch.Tensor) -> torch.Tensor:
    """The feature computed by hand, layer by layer."""
    return torch.relu(net.decoder[0](net.stem(x)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_output_and_input_are_the_submodules_and_carry_gradients(net) -> None:
    x = torch.randn(2, 3, 6, 6)
    with FeatureCapture(net, "decoder") as output, \
            FeatureCapture(net, "classifier", site="input") as given:
        logits = net(x)
        features = output.take()
        torch.testing.assert_close(features, decoder_output(net, x))
        assert given.take() is features  # the classifier's input is the decoder's output
    features.sum().backward()  # the capture is the graph's tensor, not a copy
    assert net.stem.weight.grad is not None and net.stem.weight.grad.abs().sum() > 0
    assert logits.shape == (2, 4, 6, 6)


def test_wrappers_resolve_to_the_bare_names(net) -> None:
    wrapped = nn.DataParallel(net)  # (on CPU it runs the module as it is)
    assert unwrap_model(wrapped) is net
    x = torch.randn(1, 3, 5, 5)
    with FeatureCapture(wrapped, "decoder.1") as capture:
        wrapped(x)
        torch.testing.assert_close(capture.take(), decoder_output(net, x))


def test_compiled_model(net) -> None:
    torch._dynamo.reset()
    try:
        compiled = torch.compile(net, backend="aot_eager")
        assert unwrap_model(compiled) is net
        capture = FeatureCapture(compiled, "decoder")
        for seed in range(2):
            x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
            compiled(x)
            torch.testing.assert_close(capture.take(), decoder_output(net, x))
        capture.remove()
    finally:
        torch._dynamo.reset()


def test_holds_nothing_past_the_next_forward_nor_in_eval(net) -> None:
    produced: list[weakref.ref] = []
    net.decoder.register_forward_hook(lambda m, a, out: produced.append(weakref.ref(out)))
    capture = FeatureCapture(net, "decoder")
    for _ in range(3):  # never taken: each forward lets the previous tensor go
        net(torch.randn(2, 3, 6, 6)).sum().backward()
    assert [ref() is None for ref in produced] == [True, True, False]
    capture.take()
    assert produced[-1]() is None  # taken and dropped: nothing else holds it

    net.eval()
    net(torch.randn(1, 3, 6, 6))
    assert produced[-1]() is None
    with pytest.raises(RuntimeError, match="eval"):
        capture.take()


def test_errors_name_the_cause(net) -> None:
    with pytest.raises(AttributeError, match="'decoder.1'.*'decoder'"):
        FeatureCapture(net, "decoder.2")
    with pytest.raises(AttributeError, match="'decoder.1'"):
        FeatureCapture(net, "relu")  # a type name: the submodule of that type is suggested
    with pytest.raises(ValueError, match="site"):
        FeatureCapture(net, "decoder", site="outputs")

    unused = FeatureCapture(net, "unused")
    with pytest.raises(RuntimeError, match="no forward ran"):
        unused.take()
    net(torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="did not run in the model's last forward"):
        unused.take()

    capture = FeatureCapture(net, "decoder")
    net(torch.randn(1, 3, 4, 4))
    capture.take()
    with pytest.raises(RuntimeError, match="already taken"):
        capture.take()
    with pytest.raises(TypeError, match="index"):
        FeatureCapture(net, "decoder", index=0)
        net(torch.randn(1, 3, 4, 4))


def test_a_submodule_that_runs_twice_is_refused() -> None:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), relu, nn.Conv2d(4, 4, 1), relu)
    with FeatureCapture(model, "1") as capture:
        model(torch.randn(1, 3, 4, 4))
        with pytest.raises(RuntimeError, match="ran 2 times"):
            capture.take()


def test_tuple_outputs_need_an_index() -> None:
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    model = nn.Sequential(Pair())
    with FeatureCapture(model, "0") as whole:
        with pytest.raises(TypeError, match="a tuple of 2, not a tensor: pass index"):
            model(torch.ones(2))
    with FeatureCapture(model, "0", index=1) as second:
        model(torch.ones(2))
        torch.testing.assert_close(second.take(), torch.full((2,), 2.0))
    assert "removed" in repr(whole)


def test_remove_takes_both_hooks_away(net) -> None:
    before = (len(net._forward_pre_hooks), len(net.decoder._forward_hooks))
    capture = FeatureCapture(net, "decoder")
    capture.remove()
    assert (len(net._forward_pre_hooks), len(net.decoder._forward_hooks)) == before
    net(torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="removed"):
        capture.take()
