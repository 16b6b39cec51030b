"""Fuzz onnx_lapq.quantize with generated float graphs and random configs (tools/fuzzgen.py).

    python tools/fuzz.py --cases 2000 --seed 0 [--jobs 2] [--failures DIR]
    python tools/fuzz.py --case SEED          # rerun one case, with its traceback

Case ``i`` of a run uses seed ``--seed + i``.  Each case passes when quantize either
returns a model that
  * passes onnx.checker,
  * loads in ONNX Runtime with ORT_ENABLE_ALL and gives finite outputs on a calibration
    batch, with the float model's input and output names, types and shapes,
  * leaves the input ModelProto unchanged,
  * where a search ran, has report["exported_loss"] equal to report["final_loss"]
    (relative difference at most LOSS_TOLERANCE),
or refuses with a LapqError, counted by reason: "refused" where the config excludes every
layer it could quantize, "refused-unexpected" otherwise (a refusal of a valid graph and
config deserves a look).  Anything else is a failure: its model, calibration, config and
traceback go to ``--failures/<seed>/``.  A summary ends the run: counts, refusals and
failures grouped by their message with numbers and names blanked, each failure's seed and
cause, and the RuntimeWarnings seen; the exit status is 1 when a case failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import re
import signal
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's package
sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_lapq  # noqa: E402
from fuzzgen import Case, quant_config, random_case  # noqa: E402

STATUSES = ("passed", "refused", "refused-unexpected", "failed")
LOSS_TOLERANCE = 0.01  # tests/test_lapq.py's test_exported_loss_matches_search
CASE_SECONDS = 300


@dataclass
class Outcome:
    """What one case gave: "passed"; "refused" (with the reason) where the config excludes every
    layer, "refused-unexpected" otherwise; or "failed" (with the cause)."""

    seed: int
    status: str
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class CaseFailure(AssertionError):
    """A property of the quantized model does not hold."""


class CaseTimeout(Exception):
    """A case ran longer than CASE_SECONDS."""


def reason_of(error: Exception) -> str:
    """An error's class and message with names and numbers blanked, to count refusals by kind."""
    return f"{type(error).__name__}: {_blanked(str(error).splitlines()[0] if str(error) else '')}"


def _blanked(message: str) -> str:
    """``message`` with quoted names, bracketed lists and numbers blanked."""
    message = re.sub(r"(?<![A-Za-z])'[^']*'|\"[^\"]*\"", "'…'", message)
    message = re.sub(r"\[[^\]]*\]", "[…]", message)
    return re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", message)


def expected_refusal(case: Case) -> bool:
    """True when the config leaves nothing to quantize: every weight layer (every MatMul for
    weight-only) excluded by name or op type.  Any other refusal of a valid case deserves a look."""
    config = case.config
    layers = [n for n in case.model.graph.node if n.name in case.layers]
    if config.get("weight_only"):
        layers = [n for n in layers if n.op_type == "MatMul"]
    excluded = [re.compile(p) for p in config.get("exclude", ())]
    return all(any(p.fullmatch(n.name) for p in excluded) or n.op_type in config.get("exclude_op_types", ()) for n in layers)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _interface(values) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in values]


def check_result(case: Case, result: onnx_lapq.QuantResult) -> None:
    """The properties of the module docstring; CaseFailure names the first that fails."""
    model = result.model
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CaseFailure(f"onnx.checker: {str(exc).splitlines()[0]}") from None
    if _interface(model.graph.input) != _interface(case.model.graph.input):
        raise CaseFailure(f"inputs {_interface(model.graph.input)} != float {_interface(case.model.graph.input)}")
    if _interface(model.graph.output) != _interface(case.model.graph.output):
        raise CaseFailure(f"outputs {_interface(model.graph.output)} != float {_interface(case.model.graph.output)}")
    try:
        quantized = _session(model)
    except Exception as exc:
        raise CaseFailure(f"ONNX Runtime cannot load the export: {str(exc).splitlines()[0]}") from None
    batch = case.calibration[0]
    expected = _session(case.model).run(None, batch)
    got = quantized.run(None, batch)
    for out, want, have in zip(model.graph.output, expected, got):
        if want.shape != have.shape:
            raise CaseFailure(f"output {out.name} has shape {have.shape}, the float model's {want.shape}")
        if not np.all(np.isfinite(have)):
            raise CaseFailure(f"output {out.name} is not finite ({np.sum(~np.isfinite(have))} of {have.size} values)")
    report = result.report
    if "final_loss" in report:
        final, exported = report["final_loss"], report["exported_loss"]
        if not abs(exported - final) <= LOSS_TOLERANCE * abs(final) + 1e-12:
            raise CaseFailure(f"exported_loss {exported:.6g} != final_loss {final:.6g}")


def run_case(seed: int) -> tuple[Outcome, str]:
    """Generate and run the case of ``seed``: its outcome and, on failure, the traceback."""
    started = time.perf_counter()
    case = random_case(seed)
    before = case.model.SerializeToString()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = onnx_lapq.quantize(case.model, case.calibration, config=quant_config(case.config))
            check_result(case, result)
            if case.model.SerializeToString() != before:
                raise CaseFailure("quantize modified its input model")
            outcome = Outcome(seed, "passed")
        except onnx_lapq.LapqError as exc:
            status = "refused" if expected_refusal(case) else "refused-unexpected"
            outcome = Outcome(seed, status, reason_of(exc), str(exc).splitlines()[0] if str(exc) else "")
        except CaseFailure as exc:
            outcome = Outcome(seed, "failed", str(exc))
            return _finish(outcome, started, caught), traceback.format_exc()
        except Exception as exc:
            outcome = Outcome(seed, "failed", f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return _finish(outcome, started, caught), traceback.format_exc()
    return _finish(outcome, started, caught), ""


def _finish(outcome: Outcome, started: float, caught) -> Outcome:
    outcome.seconds = time.perf_counter() - started
    outcome.warnings = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught if issubclass(w.category, RuntimeWarning)})
    return outcome


def save_case(seed: int, folder: Path, outcome: Outcome, trace: str) -> None:
    """The float model, calibration batches, config and traceback of a failing case."""
    case = random_case(seed)
    where = folder / str(seed)
    where.mkdir(parents=True, exist_ok=True)
    onnx.save(case.model, where / "model.onnx")
    np.savez(where / "calibration.npz", **{f"batch{i}__{k}": v for i, b in enumerate(case.calibration) for k, v in b.items()})
    (where / "config.json").write_text(json.dumps(case.config, indent=1) + "\n")
    (where / "error.txt").write_text(f"{outcome.reason}\n\nrerun: python tools/fuzz.py --case {seed}\n\n{trace}")


def _alarm(signum, frame):
    raise CaseTimeout(f"case ran over {CASE_SECONDS} s")


def worker(seed: int, failures: str | None) -> Outcome:
    """One case in a worker process, under a time limit; failing cases are saved."""
    logging.getLogger("onnx_lapq").setLevel(logging.ERROR)  # short-calibration warnings on every case
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        outcome, trace = run_case(seed)
    except CaseTimeout as exc:
        outcome, trace = Outcome(seed, "failed", f"timeout: {exc}"), traceback.format_exc()
    except Exception as exc:  # the generator itself
        outcome, trace = Outcome(seed, "failed", f"generator: {type(exc).__name__}: {exc}"), traceback.format_exc()
    finally:
        signal.alarm(0)
    if outcome.status == "failed" and failures:
        save_case(seed, Path(failures), outcome, trace)
    return outcome


def run_all(seeds: list[int], jobs: int, failures: str | None, on_outcome) -> list[Outcome]:
    """Every seed's outcome; a worker that dies (a crash in native code) fails its case."""
    outcomes: dict[int, Outcome] = {}
    pending = list(seeds)
    while pending:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(worker, seed, failures): seed for seed in pending}
            broken = []
            for future, seed in futures.items():
                try:
                    outcomes[seed] = future.result()
                    on_outcome(outcomes[seed])
                except BrokenProcessPool:
                    broken.append(seed)
        if broken and jobs == 1:  # the first case that broke the pool is the one that crashed
            outcomes[broken[0]] = Outcome(broken[0], "failed", "crash: the worker process died")
            on_outcome(outcomes[broken[0]])
            broken = broken[1:]
        pending, jobs = broken, 1  # after a crash, one case at a time finds it
    return [outcomes[s] for s in seeds]


def summary(outcomes: list[Outcome], seconds: float) -> str:
    """Counts of passes, refusals by reason, failures with their seeds and causes, and warnings."""
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    lines = [f"cases {len(outcomes)}, " + ", ".join(f"{s} {counts[s]}" for s in STATUSES) + f" ({seconds:.0f} s)"]
    for status in ("refused", "refused-unexpected"):
        lines += _grouped(status, [(o.reason, o.seed) for o in outcomes if o.status == status])
    lines += _grouped("failed", [(_blanked(o.reason), o.seed) for o in outcomes if o.status == "failed"])
    lines += [f"  failed seed {o.seed}: {o.reason}" for o in outcomes if o.status == "failed"]
    lines += _grouped("warned", [(w, o.seed) for o in outcomes for w in o.warnings])
    return "\n".join(lines)


def _grouped(label: str, pairs: list[tuple[str, int]]) -> list[str]:
    by_reason: dict[str, list[int]] = {}
    for reason, seed in pairs:
        by_reason.setdefault(reason, []).append(seed)
    return [
        f"  {label} {len(seeds)}x (seeds {', '.join(map(str, seeds[:5]))}{', ...' if len(seeds) > 5 else ''}): {reason}"
        for reason, seeds in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]


def rerun(seed: int) -> int:
    """``--case SEED``: the case's config, ops, outcome and traceback."""
    case = random_case(seed)
    print(f"seed {seed}: {case.family} graph, opset {case.model.opset_import[0].version}, ops {', '.join(case.ops)}")
    print(f"config {json.dumps(case.config)}")
    print(f"calibration {[tuple(v.shape) for b in case.calibration for v in b.values()]}")
    outcome, trace = run_case(seed)
    print(f"{outcome.status} in {outcome.seconds:.2f} s {outcome.reason}")
    for warning in outcome.warnings:
        print(f"  warned: {warning}")
    if trace:
        print(trace)
    return 1 if outcome.status == "failed" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="number of cases (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--failures", default="fuzz_failures", help="folder for failing cases (default ./fuzz_failures)")
    parser.add_argument("--case", type=int, help="rerun the case of this seed alone and show its traceback")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.case is not None:
        return rerun(args.case)
    started = time.perf_counter()
    done = [0]

    def show(outcome: Outcome) -> None:
        done[0] += 1
        if not args.quiet and (outcome.status != "passed" or done[0] % 50 == 0):
            print(f"[{done[0]}/{args.cases}] seed {outcome.seed} {outcome.status} {outcome.reason}", flush=True)

    outcomes = run_all(list(range(args.seed, args.seed + args.cases)), args.jobs, args.failures, show)
    print(summary(outcomes, time.perf_counter() - started))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
