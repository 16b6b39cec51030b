"""ONNX Runtime sessions for the whole run: the one session factory, the shared memory arena
and the custom op libraries.

Every session of a run is opened by :func:`session`, so that options are set in one place.
Inside ``with custom_ops(libraries):`` every session it opens (in that thread or task)
loads those libraries.  Sessions that run one at a time, many of them (the loss evaluator's
suffix graphs), draw on one process-wide arena: memory of one session's peak rather than
their sum, without fetching fresh memory on every run; :func:`release_shared_arena` gives
its free memory back once they are gone.  :func:`cores` is the number of CPU cores the
process may run on, which callers divide among concurrent runs.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import ConfigError, ExportError, ModelError
from .largemodel import copy_model, over_protobuf_limit, split_large, temporary_model_file

ARENAS = ("own", "none", "shared")
IN_MEMORY = "onnx_lapq-in-memory"  # the external data location of initializers handed to ONNX Runtime as arrays
# op domains whose ops ONNX Runtime implements itself; others need a custom op library
ORT_DOMAINS = (
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training",
    "com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc",
)
# The custom op libraries of the run in progress, set by custom_ops for its block: a
# context variable, so that runs in other threads or tasks never see each other's.
_LIBRARIES: ContextVar[tuple[str, ...]] = ContextVar("custom_op_libraries", default=())


@contextmanager
def custom_ops(libraries: tuple[str, ...]):
    """Every :func:`session` opened in the block (in this thread or task) loads ``libraries``;
    ConfigError up front when ONNX Runtime cannot load one."""
    for library in libraries:
        try:
            ort.SessionOptions().register_custom_ops_library(library)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise ConfigError(
                f"ONNX Runtime cannot load the custom op library {library!r} ({str(exc).splitlines()[0]}): "
                f"give a shared library built for ONNX Runtime {ort.__version__}"
            ) from None
    token = _LIBRARIES.set(tuple(libraries))
    try:
        yield
    finally:
        _LIBRARIES.reset(token)


def require_custom_ops(model: onnx.ModelProto) -> None:
    """ModelError naming the op and its domain when ``model`` has an op of a domain ONNX
    Runtime does not implement and the custom op libraries of the run do not either."""
    custom = [n for n in model.graph.node if n.domain not in ORT_DOMAINS]
    if not custom:
        return
    try:
        session(model, optimize=False)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        message = str(exc)
        node = next((n for n in custom if n.op_type in message), custom[0])
        raise ModelError(
            f"ONNX Runtime cannot run op {node.op_type} of domain {node.domain!r} (node {node.name!r}): load the shared library "
            "that implements it with --custom-op-library PATH (API: QuantConfig(custom_op_libraries=...))"
        ) from None


def session(
    model: onnx.ModelProto | bytes, *, outputs: Iterable[str] = (), threads: int = 0, optimize: bool = True, arena: str = "own",
    optimized_path: str | None = None,
) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for an in-memory model (or its serialized bytes, which
    return only the model's own outputs), which also returns the tensors ``outputs``
    (float32: see :func:`with_outputs`).

    ``arena``: ``"own"``, ONNX Runtime's default memory arena per session; ``"none"``, memory
    goes back after each run; ``"shared"``, one arena for the whole process, which every
    ``"shared"`` session draws from (many sessions run one at a time, such as the loss
    evaluator's suffixes: memory of one session's peak, not their sum, without the cost of
    fresh memory on every run).  A host application that registers its own CPU arena with
    ONNX Runtime's environment replaces this one.  ``optimized_path``: where ONNX Runtime
    writes the graph its optimizations made.  A model over protobuf's 2 GB limit is loaded
    from a temporary file with its large initializers in external data, removed once
    ONNX Runtime has read it."""
    if arena not in ARENAS:
        raise ValueError(f"arena={arena!r}: use one of {ARENAS}")
    if arena == "shared":
        _arena_keeper()  # registers the shared arena on first use
    options = _options(threads, arena)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    for library in _LIBRARIES.get():
        options.register_custom_ops_library(library)
    if isinstance(model, bytes):
        if outputs:
            raise ValueError("a serialized model has only its own outputs: pass the ModelProto to add outputs")
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    if over_protobuf_limit(model):
        skeleton, stubs = split_large(model)  # a copy without the large data, to take the outputs
        _add_outputs(skeleton, outputs)
        with temporary_model_file(skeleton, stubs) as path:
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    model = with_outputs(model, outputs) if outputs else model
    if optimized_path is not None:  # ONNX Runtime writes in-memory initializers out as it holds them: not a loadable model
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _lean_session(model, options)


def _lean_session(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    """The session of ``model`` with its large initializers handed over as arrays (in-memory
    external initializers, which ONNX Runtime copies in before it optimizes) rather than as
    protobuf bytes it would parse again: a third of the cost of a session of a model whose
    weights take tens of MB.  Types numpy cannot hold (4-bit, bfloat16) go as bytes."""
    skeleton, stubs = split_large(model)
    names, values = [], []
    for stub, tensor in stubs:
        if helper.tensor_dtype_to_np_dtype(tensor.data_type).kind not in "fiub":
            stub.CopyFrom(tensor)
            continue
        stub.external_data.add(key="location", value=IN_MEMORY)
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(tensor)))
    if names:
        options.add_external_initializers(names, values)
    return ort.InferenceSession(skeleton.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantized_session(model: onnx.ModelProto, what: str, *, advice: str = "", **options) -> ort.InferenceSession:
    """:func:`session` of a quantized model; ExportError naming ``what`` (and ``advice``) where
    ONNX Runtime cannot build it: its own graph rewrites can make an invalid graph of a
    valid quantized model."""
    try:
        return session(model, **options)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {what} ({str(exc).splitlines()[0]}); please report this with the model{advice}") from None


def release_shared_arena() -> None:
    """Give the shared arena's free memory back to the system (it otherwise keeps its peak for
    the life of the process).  Call it once the sessions that used it are gone."""
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    _arena_keeper().run(None, {"x": np.zeros(1, np.float32)}, ro)


def _options(threads: int, arena: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena == "own"
    if arena == "shared":
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    return options


_ARENA_LOCK = threading.Lock()
_KEEPER: list[ort.InferenceSession] = []


def _arena_keeper() -> ort.InferenceSession:
    """A one-op session on the shared arena, whose runs can ask the arena to shrink; the
    first call registers the arena with ONNX Runtime's environment (registering again would
    replace the arena that live sessions draw from) and runs the keeper once, because the
    arena never gives back its first region: this way that region is the keeper's 1 MB, not
    the first suffix's activations."""
    with _ARENA_LOCK:
        if not _KEEPER:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            value = onnx.helper.make_tensor_value_info
            graph = onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "arena_keeper",
                [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])],
            )
            model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
            keeper = ort.InferenceSession(model.SerializeToString(), _options(1, "shared"), providers=["CPUExecutionProvider"])
            keeper.run(None, {"x": np.zeros(1, np.float32)})
            _KEEPER.append(keeper)
        return _KEEPER[0]


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` (float32) as graph outputs."""
    out = copy_model(model)
    _add_outputs(out, tensors)
    return out


def _add_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> None:
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))


_core_share: int | None = None  # set in a worker process that shares the machine's cores with others


def cores() -> int:
    """CPU cores this process may run on (its share, where :func:`share_cores` set one)."""
    if _core_share is not None:
        return _core_share
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cores(count: int) -> None:
    """Make this process's sessions size their thread pools to ``count`` cores."""
    global _core_share
    _core_share = max(1, count)
