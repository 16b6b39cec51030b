"""The command line's flags, and the QuantConfig a parsed command line makes.

Every flag's default is its option's own (a default QuantConfig's); flags named otherwise
than their field are in RENAMED_FIELDS, so that errors about a field name the flag.
"""
from __future__ import annotations

import argparse

from . import __version__
from .bits import read_bits_file
from .config import CALIBRATION_METHODS, DEFAULT_OP_TYPES, QUANTIZABLE_OP_TYPES, QuantConfig
from .mixedoptions import SENSITIVITIES, MixedPrecisionOptions
from .nmmask import MASKS
from .options import LOSSES, SEARCH_BIAS_CORRECTION, SEARCHES, WEIGHT_METHODS, LapqOptions, SparsityOptions

CHECKPOINT_EVERY = 10
DEFAULT = QuantConfig()  # every flag's default is the option's own


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format."""

    def error(self, message: str) -> None:
        self.exit(2, f"onnx_lapq: error: {message} (see python -m onnx_lapq --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m onnx_lapq", description="Quantize a float ONNX model into an integer-ready QDQ model.")
    p.add_argument("input", metavar="IN.onnx", help="float ONNX model (never modified)")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the QDQ model")
    p.add_argument("--calib", metavar="CALIB.npz", help=".npz with one array per model input (samples on axis 0), or a folder of them (required, except with --weight-only)")
    p.add_argument("--weight-bits", type=_widths, default=DEFAULT.weight_bits,
                   help=f"weight bits: 2..8 or 16 (default {DEFAULT.weight_bits}); several (2,3,4,8): each layer's chosen under a budget (--target-size, --target-bits, --target-bops, --max-loss-*)")
    p.add_argument("--act-bits", type=_widths, default=DEFAULT.act_bits,
                   help=f"activation bits: 2..8 or 16 (default {DEFAULT.act_bits}); several (4,8): each layer input's chosen with the weights' under --target-bops")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per output channel")
    p.add_argument("--method", default=DEFAULT.method, choices=[m for m in CALIBRATION_METHODS if m != "lp"],
                   help=f"clipping: per-tensor calibrators, or lapq (joint loss-aware search; default {DEFAULT.method})")
    p.add_argument("--weights", default=DEFAULT.weights, choices=WEIGHT_METHODS,
                   help=f"how weights are rounded: nearest, or gptq or adaround (each layer reconstructed to fit its quantized inputs); "
                        f"auto: below 8 bits (not with --weight-only) adaround on convolutional networks, gptq on Gemm/MatMul-only ones "
                        f"(default {DEFAULT.weights})")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="node names (regular expressions) or op types to keep float")
    p.add_argument("--keep-first-last-8bit", action="store_true", help="first and last quantized layers at 8 bits")
    p.add_argument("--bits-file", metavar="FILE.json", help='bits of named layers, over the other bit flags: {"layers": {"fc": {"weight_bits": 4}}}')
    p.add_argument("--bits-out", metavar="FILE.json", help="write every quantized layer's weight bits (and input bits where chosen) as a --bits-file (to reuse or edit the widths chosen)")
    p.add_argument("--num-samples", type=int, default=DEFAULT.num_samples, help="use the first N calibration samples (default: all)")
    p.add_argument("--no-bias-correction", action="store_true", help="keep the float biases (default: correct them for the mean output shift of weight quantization)")
    p.add_argument("--quantize-attention", action="store_true", help="also quantize MatMuls of two activations (attention)")
    p.add_argument("--weight-only", action="store_true", help="quantize only MatMul weights, blockwise and asymmetric (4 bits: ONNX Runtime's MatMulNBits)")
    p.add_argument("--quantize-embeddings", action="store_true", help="also store Gather embedding tables as integers (weights only)")
    p.add_argument("--block-size", type=int, default=DEFAULT.block_size, help=f"rows per weight block with --weight-only (default {DEFAULT.block_size})")
    p.add_argument("--mask-input", default=DEFAULT.mask_input, metavar="NAME",
                   help="input marking real (1) vs padded (0) positions; 'auto' finds a 2-D integer input named *mask*, 'none' disables")
    p.add_argument("--batch-size", type=int, default=DEFAULT.batch_size, help=f"samples per ONNX Runtime call (default {DEFAULT.batch_size})")
    p.add_argument("--seed", type=int, default=DEFAULT.seed, help=f"seed of the random choices: the search's subset (--search-samples), the patches --weights samples (default {DEFAULT.seed})")
    mixed = p.add_argument_group("mixed precision (with several --weight-bits and one budget)")
    mixed.add_argument("--target-size", type=float, default=DEFAULT.mixed_precision.target_size, metavar="FRACTION",
                       help="the weights' bytes as stored, as a fraction of the float32 weights' (e.g. 0.125)")
    mixed.add_argument("--target-bits", type=float, default=DEFAULT.mixed_precision.target_bits, metavar="BITS",
                       help="the weights' average bits (e.g. 3.5)")
    mixed.add_argument("--target-bops", type=float, default=DEFAULT.mixed_precision.target_bops, metavar="FRACTION",
                       help="the bit operations (MACs x weight bits x input bits) as a fraction of those with float32 weights (e.g. 0.125)")
    mixed.add_argument("--max-loss-increase", type=float, default=DEFAULT.mixed_precision.max_loss_increase, metavar="X",
                       help="instead of a size: the smallest model whose calibration loss exceeds the widest model's by at most X")
    mixed.add_argument("--max-loss-ratio", type=float, default=DEFAULT.mixed_precision.max_loss_ratio, metavar="R",
                       help="instead of a size: the smallest model whose calibration loss is at most R times the widest model's (e.g. 1.5)")
    mixed.add_argument("--interactions", action="store_true", help="also measure how neighbouring layers' errors interact (pair terms; 3 more probes a pair)")
    mixed.add_argument("--sensitivity", default=DEFAULT.mixed_precision.sensitivity, choices=SENSITIVITIES,
                       help=f"measured (a probe per layer and width) or proxy (one noise probe per layer) (default {DEFAULT.mixed_precision.sensitivity})")
    mixed.add_argument("--executor", default=DEFAULT.mixed_precision.executor, metavar="SPEC",
                       help=f"where the probes run: inline, local, local:N (worker processes), ray, ray:ADDRESS, ray://HOST:PORT (default {DEFAULT.mixed_precision.executor})")
    mixed.add_argument("--pareto", metavar="FILE.json", help="write the allocations tried (size, loss, widths) as JSON, and FILE.png with matplotlib")
    sparsity = p.add_argument_group("N:M sparsity")
    sparsity.add_argument("--sparsity", metavar="N:M", default=DEFAULT.sparsity.pattern,
                          help="prune every layer's weights to at most N non-zeros in M along the reduction dimension (e.g. 2:4) before quantizing")
    sparsity.add_argument("--sparsity-masks", default=DEFAULT.sparsity.masks, choices=MASKS,
                          help=f"magnitude, or transposable (N per row and column of M x M tiles; -approx: the greedy) (default {DEFAULT.sparsity.masks})")
    sparsity.add_argument("--sparse-first-last", action="store_true", help="also prune the first and last layers (default: dense)")
    sparsity.add_argument("--sparsity-exclude", nargs="+", default=[], metavar="PATTERN", help="node names (regular expressions) of layers kept dense")
    sparsity.add_argument("--no-sparsity-repair", action="store_true",
                          help="keep the kept weights as they are (default: re-fit them to the dense layer's outputs on the calibration data)")
    lapq = p.add_argument_group("lapq search")
    p.search_flags = []

    def search_flag(*names, **options) -> None:
        p.search_flags.append(lapq.add_argument(*names, **options))

    search_flag("--search", default=DEFAULT.lapq.search, choices=SEARCHES, help=f"{' or '.join(SEARCHES)} (default {DEFAULT.lapq.search})")
    search_flag("--max-evals", type=int, default=DEFAULT.lapq.max_evals, help=f"loss evaluations at most (default {DEFAULT.lapq.max_evals})")
    search_flag("--search-step", type=float, default=DEFAULT.lapq.search_step, metavar="LOG_FACTOR",
                help=f"lattice step of the clip factors in log space (default {DEFAULT.lapq.search_step}: 1%%; 0: none)")
    search_flag("--search-samples", type=int, default=DEFAULT.lapq.search_samples, metavar="N",
                      help="evaluate the search's loss on a random subset of N calibration samples, drawn with --seed (default: all; statistics use all)")
    search_flag("--time-limit", type=float, default=DEFAULT.lapq.time_limit, metavar="SECONDS", help="seconds for the start candidates and the search together (best point kept)")
    search_flag("--search-bias-correction", default=DEFAULT.lapq.search_bias_correction, choices=SEARCH_BIAS_CORRECTION,
                help=f"keep bias correction in the search (default {DEFAULT.lapq.search_bias_correction}): race (search both ways on a "
                     "quarter of the budget each, continue the lower), auto (where it more than halves the min/max start's loss), on, or off")
    search_flag("--loss", default=DEFAULT.lapq.loss, choices=LOSSES,
                help=f"search objective (default {DEFAULT.lapq.loss}): auto (kl for classifiers, cosine for normalized embeddings, else mse), kl, mse, cosine, ce")
    search_flag("--checkpoint", metavar="PATH",
                help="keep the search's progress in PATH (written every --checkpoint-every evaluations and when interrupted; removed once OUT is written)")
    search_flag("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N", help=f"evaluations between checkpoint writes (default {CHECKPOINT_EVERY})")
    search_flag("--resume", action="store_true",
                help="continue the interrupted run whose --checkpoint PATH is given (the same command plus --resume): same output as a run never stopped")
    lapq.add_argument("--labels", default=DEFAULT.label_key, metavar="KEY", help="name of the integer labels array in the calibration npz (for --loss ce)")
    p.add_argument("--custom-op-library", action="append", default=[], metavar="PATH",
                   help="shared library of custom ops that ONNX Runtime loads for the model's ops of custom domains (repeatable)")
    p.add_argument("--report", metavar="REPORT.json", help="write the run's report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--version", action="version", version=f"onnx_lapq {__version__}")
    return p


def _widths(text: str):
    """--weight-bits, --act-bits: one width (an int) or several candidates (a tuple), e.g. 2,3,4,8."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a width or a comma-separated list of widths (e.g. 4, or 2,3,4,8)") from None
    return widths[0] if len(widths) == 1 else widths


# QuantConfig fields whose flag is not named after them
RENAMED_FIELDS = {"label_key": "--labels", "exclude_op_types": "--exclude", "dense_layers": "--sparsity-exclude", "candidate_bits": "--weight-bits",
                  "candidate_act_bits": "--act-bits"}


def config_of(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig of a parsed command line."""
    exclude_types = tuple(x for x in args.exclude if x in QUANTIZABLE_OP_TYPES)
    patterns = tuple(x for x in args.exclude if x not in exclude_types)
    op_types = DEFAULT_OP_TYPES + (("Gather",) if args.quantize_embeddings else ())
    lapq = LapqOptions(
        search=args.search, max_evals=args.max_evals, search_samples=args.search_samples, time_limit=args.time_limit,
        search_step=args.search_step, loss=args.loss, search_bias_correction=args.search_bias_correction,
    )
    candidates = args.weight_bits if isinstance(args.weight_bits, tuple) else ()
    act_candidates = args.act_bits if isinstance(args.act_bits, tuple) else ()
    return QuantConfig(
        op_types=op_types,
        weight_bits=max(candidates) if candidates else args.weight_bits, act_bits=max(act_candidates) if act_candidates else args.act_bits,
        per_channel=not args.per_tensor, method=args.method, weights=args.weights,
        exclude=patterns, exclude_op_types=exclude_types, keep_first_last_8bit=args.keep_first_last_8bit,
        layer_bits=read_bits_file(args.bits_file) if args.bits_file else (),
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, label_key=args.labels,
        bias_correction=not args.no_bias_correction, quantize_attention=args.quantize_attention, weight_only=args.weight_only, block_size=args.block_size,
        mask_input=None if args.mask_input.lower() == "none" else args.mask_input, custom_op_libraries=tuple(args.custom_op_library),
        lapq=lapq, mixed_precision=MixedPrecisionOptions(
            candidate_bits=candidates, candidate_act_bits=act_candidates, target_size=args.target_size, target_bits=args.target_bits, target_bops=args.target_bops,
            max_loss_increase=args.max_loss_increase,
            max_loss_ratio=args.max_loss_ratio, interactions=args.interactions, sensitivity=args.sensitivity, executor=args.executor,
        ),
        sparsity=SparsityOptions(
            pattern=args.sparsity, masks=args.sparsity_masks, dense_first_last=not args.sparse_first_last, dense_layers=tuple(args.sparsity_exclude),
            repair=not args.no_sparsity_repair,
        ),
    )
