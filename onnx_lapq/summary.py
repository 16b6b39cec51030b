"""The summary of a run that the command line prints: a few lines a user reads at a glance."""
from __future__ import annotations

from .fidelity import describe as describe_fidelity
from .ops import fuses_to_integer
from .result import QuantResult


def summary(result: QuantResult, seconds: float, output: str, kernels: tuple[int, int] | None) -> str:
    """The lines the CLI prints after writing ``output``: what was quantized and how, sizes,
    samples and ``seconds``; each stage's own line; the exported model's loss; how many
    quantized layers ONNX Runtime runs on integer kernels (``kernels``: integer, all; None
    when unknown); and the fidelity to the float model."""
    config, report = result.config, result.report
    size = report["size_bytes"]
    if config.weight_only:
        grid = f"W{config.weight_bits} weights only, blocks of {config.block_size}"
    else:
        grid = f"W{config.weight_bits}A{config.act_bits}" + ("" if config.per_channel else " per-tensor")
    grid += ", first and last layers 8-bit" if config.keep_first_last_8bit else ""
    grid += f", {count(len(config.layer_bits), 'layer')} at widths of their own" if config.layer_bits else ""
    grid += f", {result.float_type} model quantized in float32" if result.float_type != "float32" else ""
    quantized = count(len(result.plan.weights), "weight site")
    if not config.weight_only:  # weight-only runs quantize no activations and calibrate nothing
        quantized += f" and {count(len(result.plan.activations), 'activation site')}"
    data = "" if config.weight_only else f"{result.calibration_samples} calibration samples, "
    line = (
        f"wrote {output}: {quantized} ({grid}, {_methods(result)}), "
        f"{size['float'] / 1e6:.2f} MB -> {size['quantized'] / 1e6:.2f} MB, {data}{seconds:.1f} s"
    )
    for record in result.stages:
        if record.summary():
            line += "\n" + record.summary()
    if result.exported_loss is not None:
        line += f"; exported model {result.exported_loss:.4g}"
    if kernels is not None:
        integer, layers = kernels
        line += f"\nONNX Runtime (CPU) runs {min(integer, layers)} of its {layers} quantized layers on integer kernels"
        if integer < layers:
            line += f"; the other {layers - integer} run dequantized, in float"
            if not fuses_to_integer(*(site.bits for site in [*result.plan.weights, *result.plan.activations])):
                line += " (CPU kernels take 8-bit grids only)"
    if result.fidelity is not None:
        line += "\n" + describe_fidelity(report["fidelity"])
    else:
        line += "\nfidelity not measured: no calibration data (--calib measures it)"
    return line


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural where ``n`` is not 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _methods(result) -> str:
    """The methods that chose the numbers: weight reconstruction, if any, then the clipping method."""
    config = result.config
    return config.method if config.weight_rounding == "nearest" else f"{config.weight_rounding} weights, {config.method} clipping"
