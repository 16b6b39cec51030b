"""Learned rounding of a layer's weight onto its grid (AdaRound, as BRECQ implements it), from Gram matrices.

Contract.  ``adaround(weight, hessian, cross, grid)`` takes G independent groups of r output rows
and d unfolded input columns (``weight`` [G, r, d]; G = 1 for a dense layer, G = channels for a
depthwise convolution), the Gram matrices Ĥ = E[x̂ x̂ᵀ] and C = E[x̂ xᵀ] ([G, d, d]; x̂ the layer's
input in the partly quantized model, x the input in the float model) and the :class:`RowGrid`
whose rows are the G·r rows in order.  It returns Ŵ [G, r, d], float64, every entry exactly on
the grid (``grid.quantize(Ŵ) == Ŵ`` bit for bit), chosen to make

    L(Ŵ) = tr(Ŵ Ĥ Ŵᵀ) − 2 tr(Ŵ C Wᵀ)    (= E‖W x − Ŵ x̂‖² up to a constant)

small.  Nothing depends on the number of samples; nothing is random; groups are solved together
(batched matmul) and each gives the same result it would alone.

Method.  Each entry may round down or up: with f = ⌊W/s⌋ and z the zero point,

    Ŵ = s · (clamp(f + h(α) + z, qmin, qmax) − z),   h(α) = clamp(σ(α)(ζ − γ) + γ, 0, 1),

ζ = 1.1, γ = −0.1 (the rectified sigmoid).  α starts where h equals the fractional part W/s − f,
so the start is W itself.  Adam on α minimizes

    c · Σ_rows L_row(Ŵ) / (mean s_row² · mean diag Ĥ)  +  λ Σ (1 − |2h − 1|^β),     c = STEP_COST,

the regularizer off for the first ``warmup`` fraction of the iterations and β annealed linearly
from beta[0] to beta[1] after it (BRECQ's ``LinearTempDecay``).  At the end an entry rounds up
where h(α) ≥ 1/2, i.e. where α ≥ 0.

Normalization.  L is a sum of independent rows, so dividing each row's term by a positive
constant changes only how strongly the regularizer weighs against it, never which rounding
is better.  Dividing by (mean s² of the row) · (mean diag Ĥ of the group) measures the
reconstruction in squared grid steps against an average input column: moving one weight by one
grid step costs about c whatever the layer's weight magnitude, activation magnitude, bit width
or width d, so one λ serves every layer (BRECQ's unnormalized loss instead ties λ to the
activation and weight scale of each layer).  c = 0.01 makes that cost equal to the default
λ = 0.01 (BRECQ's value): the regularizer can make h binary by the last iterations without
overriding the reconstruction, and λ within about an order of magnitude either way gives
nearly the same rounding.

Clamp.  An entry whose f + z lies outside [qmin, qmax − 1] reaches the same code rounding down
or up; it is fixed at clamp(f + z) and not optimized.  So is an entry outside ``support`` (a
pruned weight: W = 0, so its code is the zero point).

Damping.  δ = damping · mean diag Ĥ (per group) is added to the diagonal of both Ĥ and C: the
objective gains δ‖Ŵ − W‖² (+ const), which keeps it strictly convex and pulls columns no input
reaches (diag Ĥ = 0) towards round-to-nearest; adding δ to Ĥ alone would instead pull Ŵ
towards 0.

Arithmetic.  Gram matrices and the starting point are formed in float64; the iterations run in
float32 on the residual Ŵ − W, which is of the order of one grid step, with 2h − 1 written as
clamp((ζ − γ) tanh(α/2), −1, 1) (the same function, since ζ + γ = 1).  Adam's step size is
``learning_rate`` in α; α spans about ±2.4 between h = 0 and h = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rowgrid import RowGrid

ZETA = 1.1
GAMMA = -0.1
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# c: what moving one weight by one grid step against an average input column costs in the
# normalized reconstruction term (see "Normalization" above).
STEP_COST = 0.01


@dataclass(frozen=True)
class _Rounding:
    """The choice left on each entry: codes ``floor + z (+ 1 where rounding up)``.

    floor: ⌊W/s⌋ + z (codes, float64); start: the residual Ŵ − W with every entry rounded down
    (fixed ones at their code); step: s where the two choices differ (free entries), 0 on fixed
    ones; fraction: W/s − ⌊W/s⌋; scale: s per entry.
    """

    floor: np.ndarray
    start: np.ndarray
    step: np.ndarray
    fraction: np.ndarray
    scale: np.ndarray


def _rounding(rows: np.ndarray, grid: RowGrid, support: np.ndarray | None) -> _Rounding:
    floor, fraction, scale, zero = grid.floor_and_fraction(rows)
    codes = floor + zero
    free = (codes >= grid.qmin) & (codes <= grid.qmax - 1)
    if support is not None:  # a pruned entry stays at its zero code
        free &= support
    scale = scale.astype(np.float64)
    start = (np.clip(codes, grid.qmin, grid.qmax) - zero) * scale - rows
    return _Rounding(codes, start, np.where(free, scale, 0.0), fraction, scale)


def _damped(hessian: np.ndarray, cross: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Ĥ + δI, C + δI, mean diag Ĥ) per group; Ĥ symmetrized."""
    hessian = 0.5 * (hessian + np.swapaxes(hessian, 1, 2))
    energy = np.diagonal(hessian, axis1=1, axis2=2).mean(axis=1)
    eye = np.eye(hessian.shape[1]) * (damping * energy)[:, None, None]
    return hessian + eye, cross + eye, energy


def _row_norm(scale: np.ndarray, energy: np.ndarray, groups: int) -> np.ndarray:
    """[G, r, 1]: mean s² of each row times mean diag Ĥ of its group (1 where that is 0)."""
    per_row = (scale**2).mean(axis=1).reshape(groups, -1) * energy[:, None]
    return np.where(per_row > 0, per_row, 1.0)[:, :, None]


def _alpha_start(fraction: np.ndarray) -> np.ndarray:
    """α with h(α) = fraction: σ(α) = (fraction − γ)/(ζ − γ), inside (1/12, 11/12) for fraction in [0, 1)."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)
    return np.log(p) - np.log1p(-p)


def _beta_schedule(iterations: int, warmup: float, beta: tuple[float, float]) -> list[float | None]:
    """β of each iteration, None while the regularizer is off (the first ``warmup`` fraction)."""
    start = warmup * iterations
    span = max(iterations - start, 1.0)
    out: list[float | None] = []
    for t in range(iterations):
        if t < start:
            out.append(None)
        else:
            out.append(beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - (t - start) / span))
    return out


class _Adam:
    """Adam (Kingma & Ba) on a float32 array, in place."""

    def __init__(self, shape: tuple[int, ...], learning_rate: float):
        self.lr = learning_rate
        self.m = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.t = 0
        self._tmp = np.empty(shape, np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        b1, b2 = ADAM_BETAS
        self.t += 1
        tmp = self._tmp
        self.m *= b1
        np.multiply(grad, 1.0 - b1, out=tmp)
        self.m += tmp
        self.v *= b2
        np.multiply(grad, grad, out=tmp)
        tmp *= 1.0 - b2
        self.v += tmp
        bias1 = 1.0 - b1**self.t
        bias2 = 1.0 - b2**self.t
        np.sqrt(self.v, out=tmp)
        tmp *= 1.0 / np.sqrt(bias2)
        tmp += ADAM_EPS
        np.divide(self.m, tmp, out=tmp)
        tmp *= self.lr / bias1
        param -= tmp


def _learn_alpha(alpha: np.ndarray, middle: np.ndarray, half_step: np.ndarray, hessian: np.ndarray,
                 offset: np.ndarray, rec_weight: np.ndarray, betas: list[float | None],
                 regularization: float, learning_rate: float) -> np.ndarray:
    """Adam on α ([G, r, d] float32), written in u = 2h − 1 = clamp((ζ − γ) tanh(α/2), −1, 1)
    (the same rectified sigmoid, since ζ + γ = 1).

    Ŵ − W = middle + half_step · u (middle: halfway between the two choices).  The reconstruction
    gradient with respect to Ŵ is proportional to (Ŵ − W) Ĥ + offset, offset = W(Ĥ − Cᵀ);
    ``rec_weight`` carries the rest of the chain to α.  The regularizer λ Σ (1 − |u|^β) has
    gradient −λβ |u|^(β−1) sign(u); du/dα = (ζ − γ)(1 − tanh²(α/2))/2 where u is not clamped.
    Fixed entries have half_step 0: the regularizer moves their α but never their code.
    """
    adam = _Adam(alpha.shape, learning_rate)
    tanh, u, resid, grad, tmp, inside = (np.empty_like(alpha) for _ in range(6))
    slope = 0.5 * (ZETA - GAMMA)
    edge = 1.0 - 1.0 / (ZETA - GAMMA) ** 2
    for beta in betas:
        np.multiply(alpha, 0.5, out=tanh)
        np.tanh(tanh, out=tanh)
        np.multiply(tanh, ZETA - GAMMA, out=u)
        np.clip(u, -1.0, 1.0, out=u)
        np.multiply(half_step, u, out=resid)
        resid += middle
        np.matmul(resid, hessian, out=grad)
        grad += offset
        grad *= rec_weight
        if beta is not None:
            np.abs(u, out=tmp)
            np.power(tmp, beta - 1.0, out=tmp)
            np.copysign(tmp, u, out=tmp)
            tmp *= regularization * beta
            grad -= tmp
        np.multiply(tanh, tanh, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        np.greater(tmp, edge, out=inside)
        tmp *= inside
        tmp *= slope
        grad *= tmp
        adam.step(alpha, grad)
    return alpha


def adaround(weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray, grid: RowGrid, *,
             iterations: int = 1000, regularization: float = 0.01, beta: tuple[float, float] = (20.0, 2.0),
             warmup: float = 0.2, learning_rate: float = 1e-2, damping: float = 0.01, support: np.ndarray | None = None) -> np.ndarray:
    """Ŵ [G, r, d] on ``grid`` minimizing E‖W x − Ŵ x̂‖² by learned rounding (see the module
    docstring); entries outside ``support`` ([G, r, d] bool: the kept weights of a pruned
    layer, whose others are 0) stay 0."""
    weight = np.asarray(weight, np.float64)
    hessian = np.asarray(hessian, np.float64)
    cross = np.asarray(cross, np.float64)
    groups, r, d = weight.shape
    rows = weight.reshape(groups * r, d)
    rounding = _rounding(rows, grid, None if support is None else support.reshape(groups * r, d))
    damped_h, damped_c, energy = _damped(hessian, cross, damping)

    def shaped(a, dtype=np.float32):
        return np.ascontiguousarray(a.reshape(groups, r, d), dtype=dtype)

    offset = weight @ (damped_h - np.swapaxes(damped_c, 1, 2))
    # d/du of STEP_COST · L_row / norm_row: 2 STEP_COST (Ŵ Ĥ − W Cᵀ) / norm_row · step / 2
    rec_weight = STEP_COST * shaped(rounding.step, np.float64) / _row_norm(rounding.scale, energy, groups)
    alpha = _learn_alpha(
        shaped(_alpha_start(rounding.fraction)), shaped(rounding.start + 0.5 * rounding.step),
        shaped(0.5 * rounding.step), np.ascontiguousarray(damped_h, np.float32), shaped(offset),
        shaped(rec_weight), _beta_schedule(iterations, warmup, beta), regularization, learning_rate)

    up = (alpha.reshape(groups * r, d) >= 0) & (rounding.step > 0)  # fixed entries: either way the same code, or pruned
    return grid.dequantize(rounding.floor + up).reshape(groups, r, d)
