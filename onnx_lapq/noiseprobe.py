"""A cheap proxy of the measured sensitivities: one random-direction probe per layer.

EPTQ weights each layer by a label-free estimate of the Hessian of the loss (the distance of
the network's output to the float model's) with respect to that layer.  Without gradients,
ONNX Runtime gives its trace by a finite difference in a random direction: with Gaussian
noise of variance σ² per element added to layer l's weight, every other weight at the widest
width, the loss increases by ΔL_noise(l) ≈ ½ σ² tr(H_l) (Hutchinson: E[zᵀHz] = tr H; the
first-order term vanishes at the float model's output, where the loss is least).  Rounding
the weight to b bits adds an error of mean square q_l(b) = mean (W − Q_b(W))², measured on
the weight itself (clipping included), so

    ΔL_proxy(l, b) = ΔL_noise(l) · q_l(b) / σ_l²,   σ_l² = q_l(narrowest candidate)

one probe per layer instead of one per (layer, width), the step the size of the errors it
predicts.  The noise is drawn from a generator seeded by the run's seed and the layer's name.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .qmath import fake_quantize
from .sensitivity import ProbeJob, WidthProbe, loss_increases, probe_order


def quantization_power(probe: WidthProbe, tensor: str, bits: int) -> float:
    """q(b): the mean square of W − Q_b(W) for weight ``tensor`` on its grid at ``bits``."""
    weight = probe.solution.weight(tensor)
    qp = probe.params({tensor: bits})[tensor]
    error = weight - fake_quantize(weight, qp.scale, qp.zero_point, qp.fmt, qp.axis, qp.block_size)
    return float(np.mean(np.square(error, dtype=np.float64)))


def proxy_sensitivities(job: ProbeJob, widths: tuple[int, ...], seed: int, executor: str = "inline", on_probe=None) -> dict[str, dict[int, float]]:
    """node -> {bits: ΔL_proxy} for every weight site and every width of ``widths`` below its
    own (see the module docstring)."""
    sites = [s for s in probe_order(job.probe.plan) if any(b < s.bits for b in widths)]
    power = {s.node: {b: quantization_power(job.probe, s.tensor, b) for b in widths if b < s.bits} for s in sites}
    noisy = {}
    for site in sites:
        weight = job.probe.solution.weight(site.tensor)
        sigma = np.sqrt(power[site.node][min(widths)])
        noise = np.random.default_rng([seed, *site.node.encode()]).standard_normal(weight.shape)
        noisy[(site.tensor, 0)] = (weight + sigma * noise).astype(weight.dtype)
    measured = loss_increases(replace(job, replaced={**job.replaced, **noisy}), [((s.tensor, 0),) for s in sites], executor, on_probe)
    out: dict[str, dict[int, float]] = {s.node: {} for s in job.probe.plan.weights}
    for site, value in zip(sites, measured):
        step = power[site.node][min(widths)]
        out[site.node] = {b: value * q / step if step > 0 else 0.0 for b, q in power[site.node].items()}
    return out
