"""Bit-width allocation as an integer program: optimal against brute force, pair terms, ties (whole and by class), budgets."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_lapq import ConfigError
from onnx_lapq.allocation import Tie, allocate, smallest_size


def _brute_force(costs, sizes, budget, pairs, ties):
    best = None
    for choice in itertools.product(range(costs.shape[1]), repeat=len(costs)):
        if any(len({_class_of(choice[l], tie) for l in _layers(tie)}) > 1 for tie in ties):
            continue
        size = sum(sizes[l, k] for l, k in enumerate(choice))
        if size > budget:
            continue
        value = sum(costs[l, k] for l, k in enumerate(choice)) + sum(p[choice[l], choice[m]] for (l, m), p in pairs.items())
        if best is None or value < best[0] - 1e-12:
            best = (value, choice)
    return best


def _layers(tie):
    return tie.layers if isinstance(tie, Tie) else tie


def _class_of(candidate, tie):
    classes = tie.classes if isinstance(tie, Tie) and tie.classes is not None else None
    return candidate if classes is None else next(i for i, c in enumerate(classes) if candidate in c)


@pytest.mark.parametrize("seed", range(4))
def test_the_program_finds_the_brute_force_optimum_with_pairs_and_ties(seed):
    rng = np.random.default_rng(seed)
    layers, candidates = 6, 3
    sizes = np.sort(rng.uniform(1, 10, (layers, candidates)), axis=1)  # wider candidates take more bytes
    costs = np.sort(rng.exponential(1.0, (layers, candidates)), axis=1)[:, ::-1].copy()  # and lose less
    pairs = {(0, 1): rng.normal(0, 0.5, (candidates, candidates)), (2, 4): rng.normal(0, 0.5, (candidates, candidates))}
    ties = ((3, 5),)
    budget = 0.5 * (smallest_size(sizes, ties) + sizes[:, -1].sum())
    got = allocate(costs, sizes, budget, pairs=pairs, ties=ties)
    value, choice = _brute_force(costs, sizes, budget, pairs, ties)
    assert got.objective == pytest.approx(value, abs=1e-9)
    assert got.size <= budget and got.choice[3] == got.choice[5]


def test_interaction_terms_change_the_allocation():
    """Two layers each cheap to narrow alone but costly together: with the pair term one stays wide."""
    costs = np.array([[1.0, 0.0], [1.0, 0.0], [1.5, 0.0]])  # candidate 0 narrow, 1 wide
    sizes = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    alone = allocate(costs, sizes, budget=4.0)
    assert alone.choice == (0, 0, 1)
    together = allocate(costs, sizes, budget=4.0, pairs={(0, 1): np.array([[5.0, 0.0], [0.0, 0.0]])})
    assert together.choice in ((0, 1, 0), (1, 0, 0))


def test_a_budget_below_every_allocation_names_the_smallest_feasible_one():
    sizes = np.array([[1.0, 4.0], [2.0, 8.0], [9.0, 3.0]])
    assert smallest_size(sizes) == 6.0  # 1 + 2 + 3
    assert smallest_size(sizes, ((1, 2),)) == 12.0  # tied layers share a candidate: 1 + min(2 + 9, 8 + 3)
    with pytest.raises(ConfigError, match=r"below the smallest model the candidate widths allow \(6 bytes\): give at least 6"):
        allocate(np.zeros((3, 2)), sizes, budget=5.0)
    with pytest.raises(ConfigError, match=r"\(12 bytes\)"):
        allocate(np.zeros((3, 2)), sizes, budget=9.0, ties=((1, 2),))
    assert allocate(np.zeros((3, 2)), sizes, budget=12.0, ties=((1, 2),)).size == 12.0


@pytest.mark.parametrize("seed", range(3))
def test_layers_tied_by_class_take_candidates_of_one_class(seed):
    """Joint (weight, activation) candidates: layers that read one activation must take its width,
    each its own weight width; the program's optimum is the brute force's, and the smallest size
    picks the best class for the group."""
    rng = np.random.default_rng(10 + seed)
    layers, candidates = 5, 4  # candidates (w, a): (2, 4), (2, 8), (8, 4), (8, 8)
    sizes = np.array([[2 * 4, 2 * 8, 8 * 4, 8 * 8]] * layers, np.float64) * rng.uniform(1, 3, (layers, 1))
    costs = rng.exponential(1.0, (layers, candidates)) * np.array([3.0, 2.0, 1.0, 0.0])
    by_act = Tie((1, 2, 4), classes=((0, 2), (1, 3)))
    budget = 0.45 * sizes[:, -1].sum()
    got = allocate(costs, sizes, budget, ties=(by_act,))
    value, choice = _brute_force(costs, sizes, budget, {}, (by_act,))
    assert got.objective == pytest.approx(value, abs=1e-9)
    assert len({_class_of(got.choice[l], by_act) for l in by_act.layers}) == 1
    least = smallest_size(sizes, (by_act,))
    assert least == pytest.approx(sizes[[0, 3], 0].sum() + sizes[[1, 2, 4], 0].sum())  # (2, 4) everywhere is smallest
    with pytest.raises(ConfigError, match="below the smallest model"):
        allocate(costs, sizes, least * 0.99, ties=(by_act,))
    pair = np.array([[1.0, 9.0, 9.0, 1.5], [9.0, 2.0, 3.0, 9.0]])
    assert smallest_size(pair) == 3.0  # each alone at its smallest
    assert smallest_size(pair, (Tie((0, 1), classes=((0, 2), (1, 3))),)) == 3.5  # one class for both: 1.5 + 2
