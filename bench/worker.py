"""One framework, one process: a spawned worker that owns the framework, its trainer and its device memory.

The benchmark process talks to it through a pipe: `call("train_epoch", 0)` runs `trainer.train_epoch(0)` in the worker
and returns the result. A crash, a hang past the time limit, or an exception inside the framework comes back as a
`WorkerError` that names the framework; the benchmark process itself never imports a framework.

A worker never outlives the benchmark: it ignores Ctrl-C (the benchmark process stops it, so one interrupted run prints
one message, not a traceback per worker), it is stopped by `close()` within SHUTDOWN_GRACE_S even mid-epoch, and it
ends itself if the benchmark process dies (Linux's parent-death signal, else a thread watching its parent).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import time
import traceback

from bench.errors import BenchError

DEFAULT_CALL_TIMEOUT_S = 1800.0  # per worker call: one epoch of a slow framework on a 2-core CPU fits
SHUTDOWN_GRACE_S = 5.0  # close(): how long a worker may take to end before the next, harder stop (SIGTERM, SIGKILL)
# What the benchmark process may ask of a trainer: contract.Trainer's methods (plus "peak_rss_bytes" and "build", served
# by the worker itself).
TRAINER_METHODS = frozenset({
    "environment", "memory_peak_bytes", "trainable_parameters", "train_on_batch", "learning_rates", "warm_up",
    "train_epoch", "evaluate", "logits", "import_weights", "export_weights",
})


class WorkerError(BenchError):
    """The framework's worker failed: it raised, crashed, or ran past its time limit."""


class UnsupportedRun(WorkerError):
    """The framework cannot run this configuration (contract.Unsupported): skipped, not failed."""


def exit_with_parent(parent_pid: int) -> None:
    """End this process when the benchmark process (parent_pid) dies, however it dies (SIGKILL included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: watch the parent instead
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, name="watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def serve(connection, module: str, environment: tuple[tuple[str, str], ...], parent_pid: int) -> None:
    """The worker's main loop: build one trainer, then run the methods the benchmark process asks for."""
    exit_with_parent(parent_pid)
    os.environ.update(environment)  # before the framework is imported (KERAS_BACKEND, say)
    trainer = None
    sending = threading.Lock()  # a framework may report progress from a thread of its own (Keras' callbacks)

    def send(message) -> None:
        with sending:
            connection.send(message)

    while True:
        try:
            method, args = connection.recv()
        except EOFError:  # the benchmark process closed the pipe: nothing is left to do
            exit_now()
        try:
            if method == "build":
                trainer = build_trainer(module, *args)
                if os.environ.get("RANK", "0") == "0":  # rank 0's epochs are the ones shown
                    trainer.report_progress = lambda progress: send(("progress", progress))
                result = None
            elif method == "peak_rss_bytes":
                result = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
            elif method in TRAINER_METHODS and trainer is not None:
                result = getattr(trainer, method)(*args)
            else:
                raise RuntimeError(f"unknown worker call {method!r} (or 'build' was not called first)")
            reply = ("ok", result)
        except BaseException as error:  # everything goes back to the benchmark process, which decides
            from implementations.contract import ConfigError, Unsupported

            expected = isinstance(error, (BenchError, ConfigError))  # its message says it all: no traceback
            kind = "unsupported" if isinstance(error, Unsupported) else "error"
            reply = (kind, f"{type(error).__name__}: {error}", "" if expected else traceback.format_exc())
        try:
            send(reply)
        except OSError:  # the benchmark process stopped listening mid-call (it was interrupted): nothing to say
            exit_now()


def exit_now() -> None:
    """End the worker without the interpreter's teardown: unloading a framework takes seconds (a two-rank Lightning
    job's rank did not end within SHUTDOWN_GRACE_S), and nothing of the worker's is left to save."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def build_trainer(module: str, config, data, progress_interval_s: float = 0.0):
    """The trainer of `module` ("package.module:Class") for the run's config and data; it reports an epoch's progress
    every `progress_interval_s` (0: never)."""
    from implementations import contract, load_trainer_class

    trainer = load_trainer_class(module)(config, data, contract.initial_weights(config.seed))
    trainer.progress_interval_s = progress_interval_s
    return trainer


class NotPlainData(Exception):
    """A worker's reply holds an object of a class outside plain data (its module and name)."""


class PlainUnpickler(pickle.Unpickler):
    """Reads a worker's reply, refusing every class outside plain data before its module is imported: a framework's
    object (torch's TorchVersion is a str) would import the framework into the benchmark process, which must never
    hold one (1.8 s and 500 MiB for torch, and its threads and signal handlers)."""

    PLAIN = ("builtins", "copyreg", "collections", "numpy")  # and the contract's named tuples

    def find_class(self, module: str, name: str):
        if module.split(".")[0] in self.PLAIN or module == "implementations.contract":
            return super().find_class(module, name)
        raise NotPlainData(f"{module}.{name}")


class FrameworkWorker:
    """Spawned processes serving one framework's trainer: one, or a job of one per replica (torch.distributed's way,
    and the JAX and TensorFlow engines' across processes). Ranks get the launchers' environment variables
    (distributed_environment) and run every call, as a launcher's ranks all run one program; rank 0's result comes
    back. Use as a context manager, or close()."""

    def __init__(self, framework: str, module: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 environment: tuple[tuple[str, str], ...] = (), ranks: int = 1):
        self.framework, self.timeout_s = framework, timeout_s
        self.busy = False  # a call is in flight (interrupted, past its limit, a rank failed): close() stops at once
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no framework state inherited
        ports = [free_port() for _ in range(ranks + 1)] if ranks > 1 else None
        self.ranks = []  # (process, connection), rank 0 first
        for rank in range(ranks):
            rank_environment = environment + (distributed_environment(rank, ranks, ports) if ranks > 1 else ())
            connection, child_end = context.Pipe()
            process = context.Process(target=serve, args=(child_end, module, rank_environment, os.getpid()),
                                      name=f"bench-{framework}" + (f"-rank{rank}" if ranks > 1 else ""), daemon=True)
            process.start()
            child_end.close()
            self.ranks.append((process, connection))

    @property
    def process(self) -> multiprocessing.Process:
        return self.ranks[0][0]  # rank 0: the one whose results come back

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.ranks]

    def call(self, method: str, *args, timeout_s: float | None = None, on_progress=None):
        """Run `method(*args)` on the trainer of every rank; rank 0's result. `on_progress` receives the
        contract.EpochProgress that rank 0's trainer reports during the call."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.busy = True
        for rank, (_, connection) in enumerate(self.ranks):
            try:
                connection.send((method, args))
            except OSError:
                raise self.died(rank, method) from None
        pending, replies = dict(enumerate(connection for _, connection in self.ranks)), {}
        while pending and all(reply[0] == "ok" for reply in replies.values()):
            # Every rank at once: a rank that fails or dies ends the call, rather than the collectives' own timeout.
            ready = multiprocessing.connection.wait(list(pending.values()), max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise WorkerError(f"{self.framework}: '{method}' ran past its {timeout_s:.0f} s limit; the worker was "
                                  "stopped (raise --worker-timeout if the run is just slow)")
            for rank in [rank for rank, connection in pending.items() if connection in ready]:
                try:
                    reply = PlainUnpickler(io.BytesIO(pending[rank].recv_bytes())).load()
                except (EOFError, OSError):
                    raise self.died(rank, method) from None
                except NotPlainData as error:
                    self.close()
                    raise WorkerError(f"{self.framework}: '{method}' returned a {error} object, which the benchmark "
                                      f"process cannot read without importing {str(error).split('.')[0]}; a trainer "
                                      "returns plain data (str, int, float, lists, dicts, numpy arrays)") from None
                if reply[0] == "progress":
                    if rank == 0 and on_progress is not None:
                        on_progress(reply[1])
                    continue
                replies[rank] = reply
                del pending[rank]
        if pending:  # a rank failed: the others may be waiting for it in a collective
            self.close()
        self.busy = False
        for rank in sorted(replies):
            kind, *content = replies[rank]
            if kind == "unsupported":
                raise UnsupportedRun(f"{self.framework}: {content[0]}")
            if kind == "error":
                message, remote_traceback = content
                where = f" (rank {rank})" if len(self.ranks) > 1 else ""
                raise WorkerError(f"{self.framework}: '{method}' failed in the worker{where}: {message}\n"
                                  f"{remote_traceback}".rstrip())
        if method == "peak_rss_bytes":  # the ranks' memory adds up
            return sum(reply[1] for reply in replies.values())
        return replies[0][1]

    def died(self, rank: int, method: str) -> WorkerError:
        process = self.ranks[rank][0]
        process.join(5)
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            cause = " (the kernel's out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
            how = f"was killed by {name}{cause}"
        else:
            how = f"exited with code {code}"
        which = f", rank {rank} of {len(self.ranks)}" if len(self.ranks) > 1 else ""
        error = WorkerError(f"{self.framework}: the worker process (pid {process.pid}{which}) {how} during '{method}'")
        self.close()
        return error

    def close(self) -> None:
        """Stop the worker: an idle one reads the closed pipe and exits; a busy one is terminated (it would not read
        the pipe before its call ends), then killed if it is still there after SHUTDOWN_GRACE_S."""
        for _, connection in self.ranks:
            connection.close()
        stops = (multiprocessing.Process.terminate, multiprocessing.Process.kill)
        for stop in stops if self.busy else (None, *stops):
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for process, _ in self.ranks:
                if stop and process.is_alive():
                    stop(process)
            for process, _ in self.ranks:
                process.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now: where a rank listens for the others."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def distributed_environment(rank: int, ranks: int, ports: list[int]) -> tuple[tuple[str, str], ...]:
    """What the launchers set for each rank of a one-machine job: torchrun's variables (which PyTorch, Lightning and the
    JAX pages read; rank 0 listens on MASTER_PORT) and TF_CONFIG, TensorFlow's (every worker's address, one port each).
    The machine's cores are shared out between the ranks (torchrun sets one thread per rank: on 2 cores, the same)."""
    threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    cluster = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports[1:]]},
               "task": {"type": "worker", "index": rank}}
    return (("RANK", str(rank)), ("LOCAL_RANK", str(rank)), ("WORLD_SIZE", str(ranks)),
            ("LOCAL_WORLD_SIZE", str(ranks)), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(ports[0])),
            ("TF_CONFIG", json.dumps(cluster)), ("OMP_NUM_THREADS", str(threads)))


def trainer_class_problem(module: str) -> str | None:
    """Why "package.module:Class" is no usable contract.Trainer, or None (run in a child: it imports the framework)."""
    from implementations import contract, load_trainer_class

    try:
        trainer_class = load_trainer_class(module)
    except Exception as error:
        return f"cannot be loaded ({type(error).__name__}: {error})"
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, contract.Trainer)):
        return f"{trainer_class!r} is not a subclass of implementations.contract.Trainer"
    abstract = sorted(getattr(trainer_class, "__abstractmethods__", ()))
    if abstract:
        return f"{trainer_class.__name__} does not implement {', '.join(abstract)}"
    return None


def check_trainer_classes(modules: dict[str, str]) -> None:
    """A BenchError naming the first --framework-module that is no Trainer, checked in one spawned process."""
    if not modules:
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        problems = list(pool.map(trainer_class_problem, modules.values()))
    for (name, module), problem in zip(modules.items(), problems):
        if problem:
            raise BenchError(f"--framework-module {name}={module}: {problem}")
