"""Where independent jobs run: in this process, in local worker processes, or on a Ray cluster.

    run_jobs(spec, setup, work, payload, items, on_done) == [work(setup(payload), item) for item in items]

``setup(payload)`` builds a worker's state once (say, a loss evaluator over the calibration
batches); ``work(state, item)`` runs one job on it.  Both are module-level functions and the
payload and items picklable, so any worker can run any job; results come back in the order
of ``items`` whichever worker ran them, and ``on_done(done, total)`` is told as they finish.
Jobs are handed out in the order of ``items``, so each worker sees them in that order.

``spec``:
  * ``inline``: this process, no workers;
  * ``local`` or ``local:N``: N worker processes (default: the cores this process may use),
    fresh interpreters fed over pipes (no copy of this process's threads or sessions, and
    nothing of the caller's main module run again), each sizing its sessions to cores // N threads;
  * ``ray``, ``ray:ADDRESS`` or ``ray://HOST:PORT``: one Ray actor per CPU of the cluster (the
    running one where ``ray.init`` was called, else ADDRESS, else a new local instance, shut
    down again after the jobs), each one thread.  Ray is an optional extra (``pip install '.[ray]'``).
"""
from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, Callable

from .errors import ConfigError
from .runtime import cores, share_cores

EXECUTORS = ("inline", "local", "ray")


def check_spec(spec: str) -> None:
    """Raise ConfigError unless ``spec`` names an executor (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind not in EXECUTORS or (kind == "inline" and arg) or (kind == "local" and arg and not (arg.isdigit() and int(arg) > 0)):
        raise ConfigError(f"executor={spec!r} is unknown: use inline, local, local:N (N worker processes), ray, ray:ADDRESS or ray://HOST:PORT")


def run_jobs(spec: str, setup: Callable[[Any], Any], work: Callable[[Any, Any], Any], payload: Any, items: list,
             on_done: Callable[[int, int], None] | None = None) -> list:
    """The results of ``work`` on every item, in order (see the module docstring)."""
    check_spec(spec)
    if not items:
        return []
    kind, _, arg = spec.partition(":")
    done = on_done or (lambda done, total: None)
    if kind == "inline":
        state = setup(payload)
        results = []
        for item in items:
            results.append(work(state, item))
            done(len(results), len(items))
        return results
    if kind == "local":
        return _local(int(arg) if arg else cores(), setup, work, payload, items, done)
    return _ray(arg, setup, work, payload, items, done)


def _local(workers: int, setup, work, payload, items: list, done) -> list:
    """Jobs on ``workers`` fresh Python processes (``python -m onnx_lapq.worker``), fed over
    their pipes: nothing of the caller's main module is imported or run again there."""
    workers = min(workers, len(items))
    queue = list(enumerate(items))
    results: list = [None] * len(items)
    lock = threading.Lock()
    finished, failures = [0], []

    def serve(process: subprocess.Popen) -> None:
        try:
            _send(process.stdin, (setup, work, payload, max(1, cores() // workers)))
            while not failures:
                with lock:
                    if not queue:
                        return
                    i, item = queue.pop(0)
                _send(process.stdin, item)
                ok, value = _receive(process.stdout)
                if not ok:
                    raise RuntimeError(f"a worker's job failed: {value}")
                with lock:
                    results[i] = value
                    finished[0] += 1
                    done(finished[0], len(items))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)

    processes = [subprocess.Popen([sys.executable, "-m", "onnx_lapq.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for _ in range(workers)]
    try:
        servers = [threading.Thread(target=serve, args=(p,), daemon=True) for p in processes]
        for server in servers:
            server.start()
        for server in servers:
            server.join()
    finally:
        for process in processes:
            process.kill()
            process.wait()
    if failures:
        raise failures[0]
    return results


def _send(pipe, value) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(struct.pack("<Q", len(data)))
    pipe.write(data)
    pipe.flush()


def _receive(pipe):
    header = pipe.read(8)
    if len(header) < 8:
        raise EOFError("a worker process ended before answering (out of memory?)")
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(pipe.read(size))


def serve_pipes() -> None:
    """A local worker: read (setup, work, payload, threads), then answer each item with (ok, result)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    setup, work, payload, threads = _receive(stdin)
    share_cores(threads)
    state = setup(payload)
    while True:
        try:
            item = _receive(stdin)
        except EOFError:
            return
        try:
            answer = (True, work(state, item))
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            answer = (False, f"{type(exc).__name__}: {exc}")
        _send(stdout, answer)


def _ray(address: str, setup, work, payload, items: list, done) -> list:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor='ray' needs Ray: pip install 'onnx_lapq[ray]', or use executor='local'") from None
    started = not ray.is_initialized()  # a cluster this call started ends with it; one the caller started stays
    if started:
        ray.init(address=f"ray:{address}" if address.startswith("//") else address or None, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, payload):
            share_cores(1)
            self.state = setup(payload)

        def run(self, item):
            return work(self.state, item)

    actors = []
    try:
        shared = ray.put(payload)
        actors = [Worker.remote(shared) for _ in range(max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1)))))]
        results: list = [None] * len(items)
        pending, queue = {}, list(enumerate(items))
        for actor in actors:
            if queue:
                i, item = queue.pop(0)
                pending[actor.run.remote(item)] = (i, actor)
        for finished in range(1, len(items) + 1):
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            results[i] = ray.get(ref)
            done(finished, len(items))
            if queue:
                j, item = queue.pop(0)
                pending[actor.run.remote(item)] = (j, actor)
        return results
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
