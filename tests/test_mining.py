"""Key miners and the loss on mined pairs against brute force, Python loops and the reference."""

from __future__ import annotations

import math
from typing import Union

import pytest
import torch
import torch.nn.functional as F

from pixcontrast import mining
from pixcontrast.functional import contrastive_loss, pair_contrastive_loss
from pixcontrast.mining import MinedContrastLoss, mine_keys

from _helpers import as_double, assert_close_to_oracle, contrast_floors, key_space, loop_loss

# (in_batch, with_keys): in-batch only, memory keys only, both (with invalid memory slots)
MODES = [(True, False), (False, True), (True, True)]


def make_problem(
    seed: int, n: int, m: int, dim: int, classes: int, in_batch: bool, with_keys: bool,
    device: Union[str, torch.device] = "cpu",
) -> dict:
    """Random continuous data (no ties); class 0 is rare (one anchor, two keys) so that some
    rows need padding. With keys, a few memory slots are invalid (label -1). Drawn on CPU, then
    moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(1, classes, (n,), generator=gen)
    labels[0] = 0
    keys = key_labels = None
    if with_keys:
        keys = torch.randn(m, dim, generator=gen, dtype=torch.float64)
        key_labels = torch.randint(1, classes, (m,), generator=gen)
        key_labels[:2] = 0
        key_labels[torch.randperm(m, generator=gen)[: m // 8]] = -1
        keys, key_labels = keys.to(device), key_labels.to(device)
    anchors, labels = anchors.to(device), labels.to(device)
    space = [anchors] if in_batch else []
    space_labels = [labels] if in_batch else []
    if with_keys:
        space.append(keys)
        space_labels.append(key_labels)
    return {
        "anchors": anchors, "labels": labels, "keys": keys, "key_labels": key_labels,
        "in_batch": in_batch, "space": torch.cat(space), "space_labels": torch.cat(space_labels),
    }


def candidates(p: dict, a: int) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """(similarity, column) of the positives and negatives of anchor ``a``, by a Python loop."""
    x = p["anchors"][a].tolist()
    positives, negatives = [], []
    for j, (key, c) in enumerate(zip(p["space"].tolist(), p["space_labels"].tolist())):
        if c < 0 or (p["in_batch"] and j == a):
            continue
        sim = sum(u * v for u, v in zip(x, key))
        (positives if c == int(p["labels"][a]) else negatives).append((sim, j))
    return positives, negatives


def padded(columns: list[int], count: int) -> list[int]:
    return columns[:count] + [-1] * (count - len(columns[:count]))


def mine(p: dict, **kwargs) -> mining.MinedPairs:
    return mine_keys(
        p["anchors"], p["labels"], p["keys"], p["key_labels"], in_batch=p["in_batch"], **kwargs
    )


@pytest.mark.parametrize("in_batch,with_keys", MODES)
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_hardest_equals_brute_force(monkeypatch, in_batch, with_keys, chunk_rows, device):
    p = make_problem(0, 23, 37, 5, 4, in_batch, with_keys, device)
    if chunk_rows is not None:  # several chunks, the last one short
        monkeypatch.setattr(mining, "_CHUNK_ELEMENTS", chunk_rows * p["space"].shape[0])
    pairs = mine(p, miner="hardest", num_positives=4, num_negatives=6)
    assert pairs.positive_index.dtype == pairs.negative_index.dtype == torch.int64
    assert pairs.positive_index.shape == (23, 4) and pairs.negative_index.shape == (23, 6)
    for a in range(23):
        positives, negatives = candidates(p, a)
        expected_pos = padded([j for _, j in sorted(positives)], 4)  # least similar first
        expected_neg = padded([j for _, j in sorted(negatives, reverse=True)], 6)
        assert pairs.positive_index[a].tolist() == expected_pos
        assert pairs.negative_index[a].tolist() == expected_neg
    assert (pairs.positive_index[0] == -1).any()  # the rare class is padded


@pytest.mark.parametrize("in_batch,with_keys", MODES)
def test_semi_hard_draws_within_the_hardest_fraction(in_batch, with_keys, device):
    p = make_problem(1, 30, 60, 4, 3, in_batch, with_keys, device)
    fraction = 0.3
    pairs = mine(p, miner="semi-hard", num_positives=3, num_negatives=5, fraction=fraction,
                 generator=torch.Generator().manual_seed(0))
    for a in range(30):
        positives, negatives = candidates(p, a)
        for chosen, ranked, count in [
            (pairs.positive_index[a].tolist(), [j for _, j in sorted(positives)], 3),
            (pairs.negative_index[a].tolist(), [j for _, j in sorted(negatives, reverse=True)], 5),
        ]:
            pool = max(1, round(fraction * len(ranked))) if ranked else 0
            taken = min(count, pool)
            assert chosen[taken:] == [-1] * (count - taken)
            assert len(set(chosen[:taken])) == taken
            ranks = [ranked.index(j) for j in chosen[:taken]]
            assert all(r < pool for r in ranks) and ranks == sorted(ranks)


def test_semi_hard_is_uniform_over_the_pool():
    # identical anchors against fixed keys: every row draws from the same pool of 10 negatives
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(100, 6, generator=gen)
    key_labels = torch.ones(100, dtype=torch.long)
    anchors = torch.randn(1, 6, generator=gen).expand(3000, 6)
    labels = torch.zeros(3000, dtype=torch.long)
    pairs = mine_keys(anchors, labels, keys, key_labels, miner="semi-hard", num_positives=1,
                      num_negatives=3, fraction=0.1, generator=torch.Generator().manual_seed(3))
    hardest = (keys @ anchors[0]).argsort(descending=True)[:10]
    counts = torch.bincount(pairs.negative_index.reshape(-1), minlength=100)
    assert counts.sum() == counts[hardest].sum() == 9000  # nothing outside the pool
    assert (counts[hardest] - 900).abs().max() < 150  # binomial sd ~ 25
    assert (pairs.positive_index == -1).all()  # no key of class 0


def test_class_relation_follows_the_prototype_softmax():
    # 4 classes around fixed directions; anchors of classes 0 and 2; memory keys only
    gen = torch.Generator().manual_seed(4)
    directions = F.normalize(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.3, 1]]))
    key_labels = torch.arange(4).repeat_interleave(torch.tensor([20, 30, 25, 15]))
    keys = directions[key_labels] + 0.2 * torch.randn(90, 3, generator=gen)
    labels = torch.tensor([0, 2]).repeat_interleave(250)
    anchors = directions[labels] + 0.2 * torch.randn(500, 3, generator=gen)
    t = 0.5
    pairs = mine_keys(anchors, labels, keys, key_labels, miner="class-relation", num_positives=2,
                      num_negatives=80, class_temperature=t,
                      generator=torch.Generator().manual_seed(5))
    drawn_class = key_labels[pairs.negative_index]
    assert (pairs.negative_index >= 0).all() and (pairs.positive_index >= 0).all()
    assert (key_labels[pairs.positive_index] == labels[:, None]).all()
    for own in (0, 2):
        prototypes = [keys[key_labels == c].mean(0) for c in range(4)]
        logits = {c: F.cosine_similarity(prototypes[own], prototypes[c], dim=0).item() / t
                  for c in range(4) if c != own}
        total = sum(math.exp(v) for v in logits.values())
        draws = drawn_class[labels == own].reshape(-1)  # 20,000 draws
        assert (draws != own).all()
        for c, v in logits.items():
            frequency = (draws == c).double().mean().item()
            assert abs(frequency - math.exp(v) / total) < 0.015  # sd <= 0.0036
        # within a drawn class the key is uniform: 30 keys of class 1, each ~1/30
        within = torch.bincount(pairs.negative_index[labels == own][draws.view(250, 80) == 1],
                                minlength=90)[key_labels == 1]
        assert (within.double() / within.sum() - 1 / 30).abs().max() < 0.015
    # the intended distribution is far from uniform, so the bound above is meaningful
    assert drawn_class[labels == 0].eq(1).double().mean() > 0.5


def test_class_relation_in_batch_never_pairs_an_anchor_with_itself(device):
    p = make_problem(6, 40, 0, 4, 3, True, False, device)
    pairs = mine(p, miner="class-relation", num_positives=20, num_negatives=20,
                 generator=torch.Generator().manual_seed(0))
    own = torch.arange(40)[:, None]
    selected = pairs.positive_index >= 0
    assert (pairs.positive_index != own).all()
    assert (p["labels"][pairs.positive_index][selected] == p["labels"][:, None].expand(-1, 20)[
        selected]).all()
    assert (p["labels"][pairs.negative_index] != p["labels"][:, None]).all()
    assert not selected[0].any()  # the only anchor of class 0 has no positive


@pytest.mark.parametrize("miner", ["semi-hard", "class-relation"])
def test_mining_is_reproducible(miner, device):
    p = make_problem(7, 25, 40, 4, 3, True, True, device)

    def run(seed: int) -> mining.MinedPairs:
        return mine(p, miner=miner, num_positives=3, num_negatives=4, fraction=0.5,
                    generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.positive_index, again.positive_index)
    assert torch.equal(first.negative_index, again.negative_index)
    assert not torch.equal(first.negative_index, other.negative_index)


def test_mining_without_keys_or_anchors():
    empty = mine_keys(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), num_positives=2,
                      num_negatives=2)
    assert empty.positive_index.shape == (0, 2) and empty.negative_index.shape == (0, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 2])
    for miner in mining.MINERS:
        alone = mine_keys(x, y, torch.randn(0, 3), torch.zeros(0, dtype=torch.long),
                          miner=miner, num_positives=2, num_negatives=3)
        assert (alone.positive_index == -1).all() and (alone.negative_index == -1).all()


def listed_pairs(index: torch.Tensor) -> list[list[int]]:
    """The columns of each row of a ``[N, K]`` index tensor, padding (-1) dropped."""
    return [[j for j in row if j >= 0] for row in index.tolist()]


def unit_problem(
    seed: int, in_batch: bool, with_keys: bool, device: Union[str, torch.device] = "cpu"
) -> dict:
    """fp64 unit vectors, anchors and keys requiring grad."""
    p = make_problem(seed, 13, 21, 6, 4, in_batch, with_keys, device)
    p["anchors"] = F.normalize(p["anchors"], dim=1).requires_grad_()
    if with_keys:
        p["keys"] = F.normalize(p["keys"], dim=1).requires_grad_()
    return p


def inputs_of(p: dict) -> list[torch.Tensor]:
    return [p["anchors"]] + ([p["keys"]] if p["keys"] is not None else [])


def upstream(loss: torch.Tensor, seed: int) -> torch.Tensor:
    """A gradient != 1 for the output (random per anchor for reduction="none")."""
    if loss.ndim == 0:
        return torch.tensor(0.7, dtype=loss.dtype, device=loss.device)
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=loss.dtype).to(loss.device) + 0.5


def assert_same_loss_and_grads(p: dict, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    weight = upstream(ours, 0)
    grads = torch.autograd.grad(ours, inputs_of(p), weight)
    expected = torch.autograd.grad(theirs, inputs_of(p), weight)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_batch,with_keys", MODES)
@pytest.mark.parametrize("miner", mining.MINERS)
@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_loss_equals_python_loop(in_batch, with_keys, miner, variant, reduction, device):
    p = unit_problem(10, in_batch, with_keys, device)
    pairs = mine(p, miner=miner, num_positives=3, num_negatives=5, fraction=0.5,
                 generator=torch.Generator().manual_seed(1))
    positive_index, negative_index = pairs.positive_index.clone(), pairs.negative_index.clone()
    positive_index[1] = -1  # an anchor without selected positives
    negative_index[2] = -1  # one without selected negatives
    negative_index[3, 1:] = -1  # padding in the middle of the columns
    kwargs = dict(temperature=0.2, variant=variant, reduction=reduction)
    ours = pair_contrastive_loss(
        p["anchors"], p["labels"], p["keys"], p["key_labels"], positive_index, negative_index,
        in_batch=in_batch, base_temperature=0.4, **kwargs,
    )
    space = key_space(p["anchors"], p["keys"], in_batch)
    theirs = loop_loss(p["anchors"], space, listed_pairs(positive_index),
                       listed_pairs(negative_index), rho=0.5, **kwargs)
    assert_same_loss_and_grads(p, ours, theirs)


def all_pairs(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every positive and every negative of each anchor, padded with -1."""
    rows = [candidates(p, a) for a in range(p["anchors"].shape[0])]
    width_pos = max(len(pos) for pos, _ in rows)
    width_neg = max(len(neg) for _, neg in rows)
    device = p["labels"].device
    positive_index = torch.tensor([padded([j for _, j in pos], width_pos) for pos, _ in rows],
                                  device=device)
    negative_index = torch.tensor([padded([j for _, j in neg], width_neg) for _, neg in rows],
                                  device=device)
    return positive_index, negative_index


@pytest.mark.parametrize("in_batch,with_keys", MODES)
@pytest.mark.parametrize("variant", ["paper", "supcon"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_loss_on_all_pairs_equals_contrastive_loss(
    in_batch, with_keys, variant, reduction, device
):
    p = unit_problem(11, in_batch, with_keys, device)
    with torch.no_grad():
        positive_index, negative_index = all_pairs(p)
    kwargs = dict(in_batch=in_batch, temperature=0.1, base_temperature=0.07, variant=variant,
                  reduction=reduction)
    ours = pair_contrastive_loss(p["anchors"], p["labels"], p["keys"], p["key_labels"],
                                 positive_index, negative_index, **kwargs)
    theirs = contrastive_loss(p["anchors"], p["labels"], p["keys"], p["key_labels"],
                              backend="reference", **kwargs)
    assert_same_loss_and_grads(p, ours, theirs)


@pytest.mark.parametrize("variant", ["paper", "supcon"])
def test_pair_loss_is_finite_for_large_scores(variant, device):
    p = make_problem(12, 9, 15, 4, 3, True, True, device)
    p["anchors"] = (p["anchors"] * 30).float().requires_grad_()
    p["keys"] = (p["keys"] * 30).float().requires_grad_()
    positive_index, negative_index = all_pairs(p)
    args = (p["anchors"], p["labels"], p["keys"], p["key_labels"])
    ours = pair_contrastive_loss(*args, positive_index, negative_index, in_batch=True,
                                 temperature=0.01, variant=variant, reduction="none")
    kwargs = dict(in_batch=True, temperature=0.01, variant=variant, reduction="none")
    theirs = contrastive_loss(*args, backend="reference", **kwargs)
    exact = contrastive_loss(*as_double(args), backend="reference", **kwargs)
    # scores reach ~1e5: fp32 rounds them by ~1e-2, which the loss (Lipschitz in them) inherits
    floors = contrast_floors(*args, rho=1.0, upstream=torch.ones(()), **kwargs)
    assert_close_to_oracle(ours, exact, theirs, floors.loss)
    grads = torch.autograd.grad(ours.sum(), inputs_of(p))
    assert all(torch.isfinite(g).all() for g in grads)


def test_pair_loss_without_positives_is_a_connected_zero():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    none = torch.full((4, 2), -1)
    for variant in ("paper", "supcon"):
        loss = pair_contrastive_loss(x, y, None, None, none, none, variant=variant)
        assert loss.item() == 0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))


def test_pair_loss_gradcheck(device):
    p = unit_problem(13, True, True, device)
    pairs = mine(p, miner="class-relation", num_positives=2, num_negatives=3,
                 generator=torch.Generator().manual_seed(2))

    def fn(anchors: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return pair_contrastive_loss(anchors, p["labels"], keys, p["key_labels"],
                                     pairs.positive_index, pairs.negative_index, in_batch=True,
                                     temperature=0.3, reduction="none")

    assert torch.autograd.gradcheck(fn, (p["anchors"], p["keys"]))


def test_module_equals_functional_and_non_contiguous_inputs(device):
    p = make_problem(14, 20, 30, 5, 3, False, True, device)
    anchors = p["anchors"].float().T.contiguous().T  # column-major view of the same values
    assert not anchors.is_contiguous()
    criterion = MinedContrastLoss("semi-hard", num_positives=2, num_negatives=4, fraction=0.4,
                                  temperature=0.2, variant="supcon")
    ours = criterion(anchors, p["labels"], p["keys"].float(), p["key_labels"],
                     generator=torch.Generator().manual_seed(3))
    pairs = mine_keys(anchors.contiguous(), p["labels"], p["keys"].float(), p["key_labels"],
                      miner="semi-hard", num_positives=2, num_negatives=4, fraction=0.4,
                      generator=torch.Generator().manual_seed(3))
    theirs = pair_contrastive_loss(anchors.contiguous(), p["labels"], p["keys"].float(),
                                   p["key_labels"], pairs.positive_index, pairs.negative_index,
                                   temperature=0.2, variant="supcon")
    assert torch.equal(ours, theirs)


def test_bad_input_names_the_argument():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    keys, key_labels = torch.randn(5, 3), torch.tensor([0, 1, 1, -1, 0])
    good = torch.tensor([[1], [0], [3], [2]])
    bad_mining = [
        (dict(num_positives=0, num_negatives=2), ValueError, "num_positives"),
        (dict(num_positives=2, num_negatives=-1), ValueError, "num_negatives"),
        (dict(num_positives=2.0, num_negatives=2), TypeError, "num_positives"),
        (dict(num_positives=1, num_negatives=1, fraction=0.0), ValueError, "fraction"),
        (dict(num_positives=1, num_negatives=1, fraction=1.5), ValueError, "fraction"),
        (dict(num_positives=1, num_negatives=1, class_temperature=0), ValueError,
         "class_temperature"),
        (dict(num_positives=1, num_negatives=1, miner="easiest"), ValueError, "miner"),
    ]
    for kwargs, error, name in bad_mining:
        with pytest.raises(error, match=name):
            mine_keys(x, y, **kwargs)
    with pytest.raises(ValueError, match="keys"):
        mine_keys(x, y, torch.randn(5, 4), key_labels, num_positives=1, num_negatives=1)
    with pytest.raises(ValueError, match="fraction"):
        MinedContrastLoss("semi-hard", num_positives=1, num_negatives=1, fraction=2)

    negatives = torch.tensor([[2], [3], [0], [1]])
    bad_pairs = [
        (good[:3], negatives, ValueError, "positive_index"),  # rows
        (good.view(-1), negatives, ValueError, "positive_index"),  # dimensions
        (good.float(), negatives, TypeError, "positive_index"),  # dtype
        (good, torch.tensor([[4], [2], [0], [0]]), ValueError, "negative_index"),  # range
        (good, torch.tensor([[-2], [2], [0], [0]]), ValueError, "negative_index"),  # range
        (torch.tensor([[2], [0], [3], [2]]), negatives, ValueError, "positive_index"),  # class
        (torch.tensor([[0], [0], [3], [2]]), negatives, ValueError, "positive_index"),  # itself
        (good, torch.tensor([[1], [2], [0], [0]]), ValueError, "negative_index"),  # same class
    ]
    for positive_index, negative_index, error, name in bad_pairs:
        with pytest.raises(error, match=name):
            pair_contrastive_loss(x, y, None, None, positive_index, negative_index)
    # an invalid memory slot (key 3, label -1) cannot be a negative
    with pytest.raises(ValueError, match="negative_index"):
        pair_contrastive_loss(x, y, keys, key_labels, torch.tensor([[0], [4], [1], [2]]),
                              torch.tensor([[3], [1], [0], [0]]))
    with pytest.raises(ValueError, match="keys"):
        pair_contrastive_loss(x, y, torch.randn(5, 2), key_labels, good, negatives)
