"""Command line: python -m onnx_lapq IN.onnx OUT.onnx --calib CALIB.npz [options].

Reads the model and calibration files, runs :func:`onnx_lapq.quantize`, writes the
quantized model atomically (and the report as JSON with --report), and prints a
summary.  Errors print one line and exit non-zero (2 for bad input); -v adds the
traceback and debug logging.  Ctrl-C (exit 130) and SIGTERM (exit 143) stop the run
with one line and leave no temporary file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import sys
import threading
import time
import traceback

from . import __version__
from .bits import read_bits_file
from .runtime import custom_ops
from .config import CALIBRATION_METHODS, DEFAULT_OP_TYPES, QUANTIZABLE_OP_TYPES, QuantConfig
from .nmmask import MASKS
from .options import LOSSES, SEARCH_BIAS_CORRECTION, SEARCHES, WEIGHT_METHODS, CalibrationOptions, LapqOptions, MixedPrecisionOptions, SparsityOptions
from .data import calibration_files, npz_batches
from .checkpoint import CheckpointFile
from .errors import BitsFileError, ConfigError, LapqError, ModelError
from .modelio import external_data_files, load_external_data, output_folder, read_model, same_file, save_model_atomic, save_text_atomic
from .pipeline import quantize
from .progress import ProgressBar
from .summary import count, summary
from .verify import integer_layers

log = logging.getLogger("onnx_lapq")
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
                   help=f"weight bits: 2..8 or 16 (default {DEFAULT.weight_bits}); several (2,3,4,8): each layer's chosen under --target-size or --target-bits")
    p.add_argument("--act-bits", type=int, default=DEFAULT.act_bits, help=f"activation bits: 2..8 or 16 (default {DEFAULT.act_bits})")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per output channel")
    p.add_argument("--method", default=DEFAULT.method, choices=[m for m in CALIBRATION_METHODS if m != "lp"],
                   help=f"clipping: per-tensor calibrators, or lapq (joint loss-aware search; default {DEFAULT.method})")
    p.add_argument("--weights", default=DEFAULT.weights, choices=WEIGHT_METHODS,
                   help=f"how weights are rounded: nearest, or gptq or adaround (each layer reconstructed to fit its quantized inputs); "
                        f"auto: adaround below 8 bits except with --weight-only (default {DEFAULT.weights})")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="node names (regular expressions) or op types to keep float")
    p.add_argument("--keep-first-last-8bit", action="store_true", help="first and last quantized layers at 8 bits")
    p.add_argument("--bits-file", metavar="FILE.json", help='bits of named layers, over the other bit flags: {"layers": {"fc": {"weight_bits": 4}}}')
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
    mixed = p.add_argument_group("mixed precision (with several --weight-bits)")
    mixed.add_argument("--target-size", type=float, default=DEFAULT.mixed_precision.target_size, metavar="FRACTION",
                       help="the weights' bytes as stored, as a fraction of the float32 weights' (e.g. 0.125)")
    mixed.add_argument("--target-bits", type=float, default=DEFAULT.mixed_precision.target_bits, metavar="BITS",
                       help="the weights' average bits (e.g. 3.5)")
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
    """--weight-bits: one width (an int) or several candidates (a tuple), e.g. 2,3,4,8."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a width or a comma-separated list of widths (e.g. 4, or 2,3,4,8)") from None
    return widths[0] if len(widths) == 1 else widths


# QuantConfig fields whose flag is not named after them
RENAMED_FIELDS = {"label_key": "--labels", "exclude_op_types": "--exclude", "dense_layers": "--sparsity-exclude", "candidate_bits": "--weight-bits"}


def _config(args: argparse.Namespace) -> QuantConfig:
    exclude_types = tuple(x for x in args.exclude if x in QUANTIZABLE_OP_TYPES)
    patterns = tuple(x for x in args.exclude if x not in exclude_types)
    op_types = DEFAULT_OP_TYPES + (("Gather",) if args.quantize_embeddings else ())
    lapq = LapqOptions(
        search=args.search, max_evals=args.max_evals, search_samples=args.search_samples, time_limit=args.time_limit,
        search_step=args.search_step, loss=args.loss, search_bias_correction=args.search_bias_correction,
    )
    candidates = args.weight_bits if isinstance(args.weight_bits, tuple) else ()
    return QuantConfig(
        op_types=op_types,
        weight_bits=max(candidates) if candidates else args.weight_bits, act_bits=args.act_bits, per_channel=not args.per_tensor, method=args.method, weights=args.weights,
        exclude=patterns, exclude_op_types=exclude_types, keep_first_last_8bit=args.keep_first_last_8bit,
        layer_bits=read_bits_file(args.bits_file) if args.bits_file else (),
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, label_key=args.labels,
        bias_correction=not args.no_bias_correction, quantize_attention=args.quantize_attention, weight_only=args.weight_only, block_size=args.block_size,
        mask_input=None if args.mask_input.lower() == "none" else args.mask_input, custom_op_libraries=tuple(args.custom_op_library),
        lapq=lapq, mixed_precision=MixedPrecisionOptions(candidate_bits=candidates, target_size=args.target_size, target_bits=args.target_bits),
        sparsity=SparsityOptions(
            pattern=args.sparsity, masks=args.sparsity_masks, dense_first_last=not args.sparse_first_last, dense_layers=tuple(args.sparsity_exclude),
            repair=not args.no_sparsity_repair,
        ),
    )


def _check_output_paths(args: argparse.Namespace, model_data: list[str]) -> None:
    """Before any work: every file the run writes (OUT, its external data file, the report,
    a checkpoint) is none of the files it reads (the model, its external data files
    ``model_data``, the calibration files) nor another of them, and each but the external
    data file (written only over 2 GB) is new or replaceable, in a writable folder."""
    out_data = "the external data file of OUT.onnx (written over 2 GB)"
    outputs = {"OUT.onnx": args.output, out_data: args.output + ".data"}
    outputs.update((f"--{flag}", getattr(args, flag)) for flag in ("report", "checkpoint") if getattr(args, flag, None))
    inputs = {"the input model": args.input}
    inputs.update((f"the input model's external data file {f!r}", f) for f in model_data)
    inputs.update((f"the calibration file {f!r}", f) for f in (calibration_files(args.calib) if args.calib else []))
    written: dict[str, str] = {}
    for flag, path in outputs.items():
        for what, source in inputs.items():
            if same_file(path, source):
                raise ModelError(f"{flag} {path!r} is {what}: choose another path (inputs are never overwritten)")
        for what, other in written.items():
            if same_file(path, other):
                raise ModelError(f"{flag} {path!r} is {what}: give each output a path of its own")
        written[flag] = path
    for flag, path in outputs.items():
        if flag != out_data:
            output_folder(path)


def _warn_unused_search_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A warning naming the lapq-search flags given with another --method, which ignores them."""
    given = [a.option_strings[0] for a in parser.search_flags if getattr(args, a.dest) != a.default]
    if given and args.method != "lapq":
        log.warning("%s only tune the lapq search: --method %s ignores them", ", ".join(given), args.method)


def _checkpoint(args: argparse.Namespace) -> CheckpointFile | None:
    """The run's checkpoint: with --checkpoint PATH for a lapq search, else None."""
    if args.resume and not args.checkpoint:
        raise ConfigError("--resume continues the run kept in a checkpoint: give its path with --checkpoint PATH")
    if args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every} must be at least 1")
    if not args.checkpoint or args.method != "lapq":
        return None
    return CheckpointFile(args.checkpoint, args.checkpoint_every, args.resume)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    started = time.perf_counter()
    if args.calib is None and not args.weight_only:
        raise ConfigError("--calib CALIB.npz is required (only --weight-only runs without calibration data): give the calibration file or folder")
    config = _config(args)
    _warn_unused_search_flags(args, parser)
    model = read_model(args.input)
    _check_output_paths(args, external_data_files(model, args.input))
    checkpoint = _checkpoint(args)
    load_external_data(model, args.input)
    bar = ProgressBar(sys.stderr)
    try:
        result = quantize(model, npz_batches(args.calib) if args.calib else None, config=config, on_step=bar,
                          journal=None if checkpoint is None else checkpoint.journal)
    except BaseException as exc:
        bar.close(finished=False)
        if checkpoint is not None:
            checkpoint.save()
            if checkpoint.saved and not isinstance(exc, LapqError):
                log.warning("the search's progress is kept in %s: the same command plus --resume continues it", args.checkpoint)
        raise
    bar.close()
    save_model_atomic(result.model, args.output)
    if args.report:
        if same_file(args.report, args.output):  # only now both exist: names that differ in case only, on a case-insensitive disk
            raise ModelError(f"--report {args.report!r} is the model just written to OUT.onnx: give the report a path of its own")
        save_text_atomic(json.dumps(result.report, indent=1), args.report)
    if checkpoint is not None:
        checkpoint.remove()
    with custom_ops(config.custom_op_libraries):
        kernels = integer_layers(result.model)
    print(summary(result, time.perf_counter() - started, args.output, kernels))
    if args.resume and checkpoint is not None:
        print(f"resumed from {args.checkpoint}: {count(result.report['replayed_evaluations'], 'evaluation')} replayed, the rest measured")
    return 0


def _in_flag_words(message: str, parser: argparse.ArgumentParser) -> str:
    """A QuantConfig error as the CLI's user wrote it: ``weight_bits=9`` reads ``--weight-bits 9``,
    ``mask_input`` reads ``--mask-input``, ``label_key (CLI: --labels KEY)`` reads ``--labels KEY``,
    "None" reads as leaving the flag out."""
    usage = parser.format_usage()

    def flag_of(field: str) -> str | None:
        name = RENAMED_FIELDS.get(field, "--" + field.replace("_", "-"))
        return name if re.search(re.escape(name) + r"[\s\]]", usage) else None

    message = re.sub(r"\b([a-z][a-z0-9_]*) \(CLI: ([^)]*)\)", lambda m: m.group(2) if flag_of(m.group(1)) else m.group(0), message)
    message = re.sub(r"\b([a-z][a-z0-9_]*)=", lambda m: f"{flag_of(m.group(1))} " if flag_of(m.group(1)) else m.group(0), message)
    names = [f.name for options in (QuantConfig, LapqOptions, CalibrationOptions, SparsityOptions, MixedPrecisionOptions) for f in dataclasses.fields(options)]
    fields = "|".join(name for name in names if "_" in name)
    message = re.sub(rf"(?<![\w-])({fields})\b", lambda m: flag_of(m.group(1)) or m.group(0), message)
    return message.replace("(or None for", "(or leave it out for")


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the run as Ctrl-C does, removing temporary files."""


def _terminate(signum: int, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return run(args, parser)
    except Terminated:
        print("onnx_lapq: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except LapqError as exc:
        if args.verbose:
            traceback.print_exc()
        message = _in_flag_words(str(exc), parser) if isinstance(exc, ConfigError) and not isinstance(exc, BitsFileError) else str(exc)
        print(f"onnx_lapq: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx_lapq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"onnx_lapq: internal error: {type(exc).__name__}: {exc} (rerun with -v and report it)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
