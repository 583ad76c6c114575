"""Key miners and the loss on mined pairs against brute force, Python loops and the reference."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from pixcontrast import mining
from pixcontrast.functional import contrastive_loss
from pixcontrast.mining import MinedContrastLoss, mine_keys, pair_contrastive_loss

# (in_batch, with_keys): in-batch only, memory keys only, both (with invalid memory slots)
MODES = [(True, False), (False, True), (True, True)]


def make_problem(
    seed: int, n: int, m: int, dim: int, classes: int, in_batch: bool, with_keys: bool
) -> dict:
    """Random continuous data (no ties); class 0 is rare (one anchor, two keys) so that some
    rows need padding. With keys, a few memory slots are invalid (label -1)."""
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
def test_hardest_equals_brute_force(monkeypatch, in_batch, with_keys, chunk_rows):
    p = make_problem(0, 23, 37, 5, 4, in_batch, with_keys)
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
def test_semi_hard_draws_within_the_hardest_fraction(in_batch, with_keys):
    p = make_problem(1, 30, 60, 4, 3, in_batch, with_keys)
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


def test_class_relation_in_batch_never_pairs_an_anchor_with_itself():
    p = make_problem(6, 40, 0, 4, 3, True, False)
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
def test_mining_is_reproducible(miner):
    p = make_problem(7, 25, 40, 4, 3, True, True)

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
