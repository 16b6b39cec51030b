"""Bit-width allocation under a size budget, as an integer program (scipy.optimize.milp).

Each layer l takes one candidate width k: binary x_lk, Σ_k x_lk = 1.  The program minimizes
the summed loss increases Σ cost[l, k] x_lk plus, for chosen pairs of layers, their measured
interaction Σ pair[l, m][k, j] y_lmkj, where y_lmkj = x_lk · x_mj is linearized by
y ≤ x_lk, y ≤ x_mj, y ≥ x_lk + x_mj − 1 (continuous in [0, 1]: integral wherever the x are);
subject to Σ size[l, k] x_lk ≤ budget, and tied layers taking the same candidate, or
candidates of the same class (a :class:`Tie` with classes: layers that read one activation
take the same activation width, whatever their weights' widths): Σ_{k∈C} x_lk = Σ_{k∈C} x_mk.
A budget below the smallest feasible size is a ConfigError that names that size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from .errors import ConfigError

MIP_GAP = 1e-9  # relative optimality gap: below the mixed-precision stage's tie-break


@dataclass(frozen=True)
class Tie:
    """Layers that choose together: the same candidate, or with ``classes`` (a partition of
    the candidate indices) candidates of the same class."""

    layers: tuple[int, ...]
    classes: tuple[tuple[int, ...], ...] | None = None

    def partition(self, candidates: int) -> tuple[tuple[int, ...], ...]:
        return self.classes if self.classes is not None else tuple((k,) for k in range(candidates))


Ties = tuple[Tie | tuple[int, ...], ...]  # a bare tuple of layers ties them to the same candidate


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate of each layer, and the program's objective and total size."""

    choice: tuple[int, ...]
    objective: float
    size: float


def smallest_size(sizes: np.ndarray, ties: Ties = ()) -> float:
    """The least total size any allocation reaches: each layer at its smallest candidate, each
    tied group at the class whose smallest candidates sum least."""
    ties = _ties(ties, len(sizes))
    tied = {l for tie in ties for l in tie.layers}
    free = float(sum(sizes[l].min() for l in range(len(sizes)) if l not in tied))
    return free + float(sum(min(sum(sizes[l, list(c)].min() for l in tie.layers) for c in tie.partition(sizes.shape[1])) for tie in ties))


def allocate(costs: np.ndarray, sizes: np.ndarray, budget: float, *, pairs: dict[tuple[int, int], np.ndarray] | None = None,
             ties: tuple[tuple[int, ...], ...] = (), time_limit: float = 60.0) -> Allocation:
    """The allocation minimizing the loss (see the module docstring) within ``budget``.

    ``costs``, ``sizes``: [layers, candidates]; ``pairs``: (l, m) -> [candidates, candidates]
    interaction terms; ``ties``: groups of layers that take the same candidate."""
    costs, sizes = np.asarray(costs, np.float64), np.asarray(sizes, np.float64)
    layers, candidates = costs.shape
    ties = _ties(ties, layers)
    least = smallest_size(sizes, ties)
    if budget < least:
        raise ConfigError(f"a budget of {budget:.0f} bytes is below the smallest model the candidate widths allow ({least:.0f} bytes): "
                          f"give at least {least:.0f}")
    pairs = pairs or {}
    n_x = layers * candidates
    n_y = len(pairs) * candidates * candidates
    objective = np.concatenate([costs.ravel(), *(np.asarray(p, np.float64).ravel() for p in pairs.values())]) if pairs else costs.ravel()
    rows = layers + 1 + 3 * n_y + sum((len(t.layers) - 1) * len(t.partition(candidates)) for t in ties)
    a = lil_matrix((rows, n_x + n_y))
    lower, upper = np.empty(rows), np.empty(rows)
    row = 0
    for l in range(layers):  # one candidate per layer
        a[row, l * candidates:(l + 1) * candidates] = 1.0
        lower[row] = upper[row] = 1.0
        row += 1
    a[row, :n_x] = sizes.ravel()  # the budget
    lower[row], upper[row] = -np.inf, budget
    row += 1
    y = n_x
    for (l, m) in pairs:
        for k in range(candidates):
            for j in range(candidates):
                xl, xm = l * candidates + k, m * candidates + j
                for coefficients, bound in (({y: 1.0, xl: -1.0}, (-np.inf, 0.0)), ({y: 1.0, xm: -1.0}, (-np.inf, 0.0)),
                                            ({y: 1.0, xl: -1.0, xm: -1.0}, (-1.0, np.inf))):
                    for column, value in coefficients.items():
                        a[row, column] = value
                    lower[row], upper[row] = bound
                    row += 1
                y += 1
    for tie in ties:  # Σ_{k in C} x_{first, k} = Σ_{k in C} x_{other, k}
        first = tie.layers[0]
        for other in tie.layers[1:]:
            for group in tie.partition(candidates):
                for k in group:
                    a[row, first * candidates + k], a[row, other * candidates + k] = 1.0, -1.0
                lower[row] = upper[row] = 0.0
                row += 1
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_y)])
    scale = float(np.abs(objective).max()) or 1.0  # the objective in units of its largest term, solved to a gap of MIP_GAP
    result = milp(objective / scale, constraints=LinearConstraint(a.tocsr(), lower, upper), integrality=integrality, bounds=Bounds(0, 1),
                  options={"time_limit": time_limit, "mip_rel_gap": MIP_GAP})
    if result.x is None:
        raise RuntimeError(f"the allocation program found no solution ({result.message})")
    x = result.x[:n_x].reshape(layers, candidates)
    choice = tuple(int(k) for k in np.argmax(x, axis=1))
    return Allocation(choice, float(result.fun) * scale, float(sum(sizes[l, k] for l, k in enumerate(choice))))


def _ties(ties: Ties, layers: int) -> tuple[Tie, ...]:
    """``ties`` as Ties; ValueError unless their layers are disjoint indices and their classes partition the candidates."""
    out = tuple(t if isinstance(t, Tie) else Tie(tuple(t)) for t in ties)
    tied = [l for t in out for l in t.layers]
    if len(tied) != len(set(tied)) or any(not 0 <= l < layers for l in tied):
        raise ValueError("ties must be disjoint groups of layer indices")
    return out
