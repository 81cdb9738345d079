"""pytest options and fixtures of the benchmark suite (`pytest bench`) and the harness tests (`pytest tests`).

This process never imports a framework: frameworks are parametrized by name and run in worker processes. Every option
is checked before the first worker starts. `--benchmark-json` is written atomically and never over an existing file;
an interrupted session (Ctrl-C, or SIGTERM from a CI runner or a job scheduler) writes neither it nor the autosaved
history as if it had finished: what finished is kept as `<name>.partial.json`, marked as interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench import options
from bench.errors import BenchError
from bench.record import INTERRUPTED, SELECTED_FRAMEWORKS, MatmulRate, RunRecord
from bench.run import require_installed, resolve_frameworks
from bench.summary import summary_table
from bench.worker import check_trainer_classes
from bench.yardstick import measure_matmul_rate
from implementations import FRAMEWORKS, Framework, contract


@dataclass
class BenchSession:
    """This pytest session's run settings and results, kept in config.stash."""

    run_config: contract.RunConfig
    mnist_dir: str | None
    verify_digests: bool
    worker_timeout_s: float
    frameworks: list[Framework]
    job: contract.JobProcess  # this process's place in a launched job (WORLD_SIZE 1: none)
    json_target: Path | None = None  # where --benchmark-json goes once the session is complete
    json_partial: Path | None = None  # where pytest-benchmark writes it meanwhile
    interrupted: bool = False
    records: list[RunRecord] = field(default_factory=list)
    matmul_rates: dict[str, MatmulRate] = field(default_factory=dict)  # per device kind, measured once
    show: Callable[[str], None] = print  # a progress line on the terminal, past pytest's capture (pytest_configure)

    def matmul_rate(self, device: str) -> MatmulRate:
        kind = "cpu" if device == "CPU" else "cuda"
        if kind not in self.matmul_rates:
            self.matmul_rates[kind] = measure_matmul_rate(kind, self.run_config.precision, self.run_config.allow_tf32)
        return self.matmul_rates[kind]


SESSION = pytest.StashKey[BenchSession]()


def pytest_addoption(parser):
    group = parser.getgroup("bench", "MNIST in every framework")
    group.addoption("--frameworks", default=None,
                    help=f"comma-separated frameworks to run ({', '.join(FRAMEWORKS)}); default: every installed one")
    group.addoption("--framework-module", action="append", default=[], metavar="NAME=MODULE:CLASS",
                    help="also run an implementation from outside this repository (repeatable)")
    for flag, kwargs in options.RUN_OPTIONS:
        group.addoption(flag, **kwargs)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads --benchmark-json
def pytest_configure(config):
    try:
        session = checked_session(config)
    except (BenchError, contract.ConfigError) as error:
        raise pytest.UsageError(str(error)) from None
    if session.job.rank > 0:  # one rank of a launched job: rank 0's session keeps the results and the history
        config.option.benchmark_json = config.option.benchmark_save = None
        config.option.benchmark_autosave = False
    if session.json_target is not None:  # every option is valid: only now may a folder be created
        session.json_target.parent.mkdir(parents=True, exist_ok=True)
        session.json_partial = session.json_target.with_name(f".{session.json_target.name}.{os.getpid()}.partial")
        config.option.benchmark_json = session.json_partial
    session.show = terminal_line(config)
    config.stash[SESSION] = session
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_sigterm)


def terminal_line(config) -> Callable[[str], None]:
    """Write a line on the terminal from inside a test, as pytest's live logging does: past the output capture."""
    def show(text: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(text)

    return show


def stop_on_sigterm(signum, frame):
    """SIGTERM (a CI runner's or job scheduler's stop) ends the session as Ctrl-C does: workers stopped, no results
    recorded as complete."""
    raise KeyboardInterrupt("SIGTERM")


def checked_session(config) -> BenchSession:
    values = {options.dest(flag): config.getoption(options.dest(flag)) for flag, _ in options.RUN_OPTIONS}
    extra_modules = dict(parse_module(text) for text in config.getoption("framework_module"))
    names = config.getoption("frameworks")
    names = [name.strip() for name in names.split(",")] if names else [*FRAMEWORKS, *extra_modules]
    run_config = options.run_config(values)
    session = BenchSession(run_config, options.mnist_dir(values), not values["no_verify_digests"],
                           values["worker_timeout"], resolve_frameworks(names, extra_modules),
                           contract.job_process(run_config))
    target = config.getoption("benchmark_json", None)
    if target is not None and session.job.rank == 0:
        options.check_output_path(Path(target), "--benchmark-json")
        session.json_target = Path(target)
    check_trainer_classes({name: module for name, module in extra_modules.items() if name in names})
    return session


def parse_module(text: str) -> tuple[str, str]:
    name, _, module = text.partition("=")
    if not name or ":" not in module:
        raise BenchError(f"--framework-module {text!r}: expected NAME=package.module:TrainerClass")
    return name, module


def pytest_generate_tests(metafunc):
    """Parametrize `framework` over the selected frameworks; those not installed are skipped, saying so."""
    if "framework" in metafunc.fixturenames:
        params = []
        for framework in metafunc.config.stash[SESSION].frameworks:
            try:
                require_installed(framework)
                marks = ()
            except BenchError as error:
                marks = pytest.mark.skip(reason=f"not installed: {error}")
            params.append(pytest.param(framework, id=framework.name, marks=marks))
        metafunc.parametrize("framework", params, scope="module")  # a module's tests grouped by framework


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> BenchSession:
    return pytestconfig.stash[SESSION]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Which frameworks this session set out to run (the gate tells a failure from a framework not selected), and
    whether it was interrupted."""
    session = config.stash[SESSION]
    output_json[SELECTED_FRAMEWORKS] = [framework.name for framework in session.frameworks]
    if session.interrupted:
        output_json[INTERRUPTED] = True


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    bench = session.config.stash[SESSION]
    write = session.config.get_terminal_writer().line
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        bench.interrupted = True
        benchmark_session = session.config._benchmarksession  # pytest-benchmark's: no history for an unfinished run
        if benchmark_session.save or benchmark_session.autosave:
            benchmark_session.save = benchmark_session.autosave = None
            write("interrupted: the session is not saved in the benchmark history")
    try:
        yield  # pytest-benchmark writes --benchmark-json to the partial file here
    except OSError as error:
        if bench.json_partial is not None:
            bench.json_partial.unlink(missing_ok=True)
        raise pytest.UsageError(f"--benchmark-json {bench.json_target} could not be written ({error.strerror}); "
                                f"{keep_records(bench.records)}") from None
    if bench.json_partial is None:
        return
    if not bench.json_partial.exists():
        if bench.interrupted:
            write(f"interrupted before any framework finished: {bench.json_target} not written")
        return
    target = bench.json_target.with_name(f"{bench.json_target.stem}.partial.json") if bench.interrupted \
        else bench.json_target
    try:
        os.link(bench.json_partial, target)  # fails if the target appeared meanwhile, unlike a rename
    except FileExistsError:
        raise pytest.UsageError(f"{target} appeared during the run; the results are kept in {bench.json_partial}") from None
    bench.json_partial.unlink()
    if bench.interrupted:
        write(f"interrupted: {bench.json_target} not written; the frameworks that finished "
              f"({', '.join(r.framework for r in bench.records) or 'none'}) are kept in {target}, marked incomplete")
    else:
        write(f"results written to {target}")


def keep_records(records: list[RunRecord]) -> str:
    """The measured records put where the user can find them, and the sentence that says where."""
    text, path = json.dumps([record.to_json() for record in records], indent=2), None
    try:
        descriptor, path = tempfile.mkstemp(prefix="mnist-bench-records-", suffix=".json")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return f"the records are kept in {path}"
    except OSError:
        if path is not None:
            os.unlink(path)
        print(text)
        return "the records are printed above"


def pytest_terminal_summary(terminalreporter, config):
    records = config.stash[SESSION].records if SESSION in config.stash else []
    if records:
        terminalreporter.section("MNIST ResNet18: per-framework results")
        terminalreporter.write_line(summary_table(records))
