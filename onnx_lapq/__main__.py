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

from .bits import bits_file_text
from .pareto import png_path, write_front
from .cliargs import RENAMED_FIELDS, build_parser, config_of
from .runtime import custom_ops
from .config import QuantConfig
from .mixedoptions import MixedPrecisionOptions
from .options import CalibrationOptions, LapqOptions, SparsityOptions
from .data import calibration_files, npz_batches
from .checkpoint import CheckpointFile
from .errors import BitsFileError, ConfigError, LapqError, ModelError
from .modelio import external_data_files, load_external_data, output_folder, read_model, same_file, save_model_atomic, save_text_atomic
from .pipeline import quantize
from .progress import ProgressBar
from .summary import count, summary
from .verify import integer_layers

log = logging.getLogger("onnx_lapq")


def _check_output_paths(args: argparse.Namespace, model_data: list[str]) -> None:
    """Before any work: every file the run writes (OUT, its external data file, the report,
    a checkpoint) is none of the files it reads (the model, its external data files
    ``model_data``, the calibration files) nor another of them, and each but the external
    data file (written only over 2 GB) is new or replaceable, in a writable folder."""
    out_data = "the external data file of OUT.onnx (written over 2 GB)"
    outputs = {"OUT.onnx": args.output, out_data: args.output + ".data"}
    outputs.update((f"--{flag.replace('_', '-')}", getattr(args, flag)) for flag in ("report", "checkpoint", "pareto", "bits_out") if getattr(args, flag, None))
    if args.pareto:
        outputs["the plot of --pareto"] = png_path(args.pareto)
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
    config = config_of(args)
    if args.pareto and not config.mixed_precision.allocates:
        raise ConfigError("--pareto writes the allocations mixed precision tries: give several --weight-bits and a budget")
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
    if args.bits_out:
        save_text_atomic(bits_file_text(result.plan, result.config.layer_bits), args.bits_out)
    if args.pareto:
        write_front(next(r for r in result.stages if r.stage == "mixed_precision"), args.pareto)
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
