"""pytest options and fixtures of the benchmark suite (`pytest bench`) and the harness tests (`pytest tests`).

This process never imports a framework: frameworks are parametrized by name and run in worker processes, and a
session that finds one imported here fails. Every option is checked before the first worker starts; so are MNIST (read
and prepared here, once, for every worker) and every file the session will write (`--benchmark-json`, the autosaved
history), by creating and removing a file of each exact name. The session writes those files itself, atomically and
never over an existing file; what cannot be written is kept in the system's temporary folder, and the message says
where. An interrupted session (Ctrl-C, or SIGTERM from a CI runner or a job scheduler) writes neither as if it had
finished: the frameworks that finished are kept as `<name>.partial.json`, marked as interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench import options
from bench.errors import BenchError
from bench.output import check_new_files, keep_elsewhere, write_new_file
from bench.record import INTERRUPTED, SELECTED_FRAMEWORKS, MatmulRate, RunRecord
from bench.run import check_device, require_installed, resolve_frameworks, run_data, stop_on_sigterm
from bench.summary import summary_table
from bench.worker import check_trainer_classes
from bench.yardstick import measure_matmul_rate
from implementations import FRAMEWORKS, Framework, contract

# What no benchmark process may import (the registry's packages): finding one in sys.modules fails the session.
FRAMEWORK_MODULES = frozenset(name.split(".")[0] for framework in FRAMEWORKS.values() for name in framework.requires)


@dataclass
class BenchSession:
    """This pytest session's run settings and results, kept in config.stash."""

    run_config: contract.RunConfig
    mnist_dir: str | None
    verify_digests: bool
    worker_timeout_s: float
    progress_interval_s: float
    frameworks: list[Framework]
    job: contract.JobProcess  # this process's place in a launched job (WORLD_SIZE 1: none)
    data: contract.Data | None = None  # prepared once the benchmark's tests are collected
    selected: list[str] = field(default_factory=list)  # the frameworks whose benchmark pytest collected
    json_target: Path | None = None  # --benchmark-json
    history_target: Path | None = None  # the autosaved (or --benchmark-save) history file
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


def pytest_addhooks(pluginmanager):
    """pytest-benchmark registered here where plugin autoloading is off (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1, as CI
    systems set it): the benchmark needs it, and this conftest implements one of its hooks."""
    if not pluginmanager.has_plugin("benchmark") and not pluginmanager.is_blocked("benchmark"):
        import pytest_benchmark.plugin

        pluginmanager.register(pytest_benchmark.plugin, "benchmark")


def pytest_addoption(parser):
    group = parser.getgroup("bench", "MNIST in every framework")
    group.addoption("--frameworks", default=None,
                    help=f"comma-separated frameworks to run ({', '.join(FRAMEWORKS)}); default: every installed one")
    for flag, kwargs in options.RUN_OPTIONS:
        group.addoption(flag, **kwargs)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    try:
        session = checked_session(config)
    except (BenchError, contract.ConfigError) as error:
        raise pytest.UsageError(str(error)) from None
    if session.job.rank > 0:  # one rank of a launched job: rank 0's session keeps the results and the history
        config.option.benchmark_json = config.option.benchmark_save = None
        config.option.benchmark_autosave = False
    session.show = terminal_line(config)
    config.stash[SESSION] = session
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_sigterm)


def checked_session(config) -> BenchSession:
    if config.pluginmanager.is_blocked("benchmark"):
        raise BenchError("this suite needs pytest-benchmark, which `-p no:benchmark` turned off; drop that option")
    given = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *config.getini("addopts"),
             *config.invocation_params.args]
    options.check_given_once(given, ["--frameworks", *(flag for flag, _ in options.RUN_OPTIONS)])
    values = {options.dest(flag): config.getoption(options.dest(flag)) for flag, _ in options.RUN_OPTIONS}
    extra_modules = options.framework_modules(values["framework_module"])
    names = config.getoption("frameworks")
    if names is None:
        names = [*FRAMEWORKS, *extra_modules]
    else:
        names = [name.strip() for name in names.split(",")] if names.strip() else []
    run_config = options.run_config(values)
    check_device(run_config)
    for flag in ("benchmark_disable", "benchmark_skip"):
        wanted = [f"--{option.replace('_', '-')}" for option in ("benchmark_json", "benchmark_autosave",
                                                                  "benchmark_save") if config.getoption(option)]
        if config.getoption(flag) and wanted:
            raise BenchError(f"--{flag.replace('_', '-')} times nothing, so {' and '.join(wanted)} would never be "
                             "written; drop one of them")
    session = BenchSession(run_config, values["mnist_dir"], not values["no_verify_digests"], values["worker_timeout"],
                           values["progress_interval"], resolve_frameworks(names, extra_modules),
                           contract.job_process(run_config))
    check_trainer_classes({name: module for name, module in extra_modules.items() if name in names})
    return session


def terminal_line(config) -> Callable[[str], None]:
    """Write a line on the terminal from inside a test, as pytest's live logging does: past the output capture."""
    def show(text: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter._tw.width_of_current_line:  # after a test's progress dot or percentage: a line of its own
                reporter._tw.line()
            reporter.write_line(text)

    return show


def pytest_generate_tests(metafunc):
    """Parametrize `framework` over the selected frameworks; those not installed, or that cannot run the options, are
    skipped, saying why."""
    if "framework" in metafunc.fixturenames:
        session = metafunc.config.stash[SESSION]
        params = []
        for framework in session.frameworks:
            try:
                require_installed(framework)
                reason = framework.cannot_run(session.run_config)
                marks = pytest.mark.skip(reason=f"cannot run this configuration: {reason}") if reason else ()
            except BenchError as error:
                marks = pytest.mark.skip(reason=f"not installed: {error}")
            params.append(pytest.param(framework, id=framework.name, marks=marks))
        metafunc.parametrize("framework", params, scope="module")  # a module's tests grouped by framework


def pytest_collection_finish(session):
    """A benchmark session (its tests collected): the frameworks pytest selected (-k, node ids, --deselect, --lf),
    the files it will write and its data, all checked before the first worker starts."""
    config = session.config
    bench = config.stash[SESSION]
    benchmarks = [item for item in session.items if "bench_session" in getattr(item, "fixturenames", ())]
    if not benchmarks:
        return
    collected = {item.callspec.params["framework"].name for item in benchmarks}
    bench.selected = [framework.name for framework in bench.frameworks if framework.name in collected]
    try:
        bench.data = run_data(bench.run_config, bench.mnist_dir, bench.verify_digests)
        check_outputs(config, bench)  # may create their folders: last
    except (BenchError, contract.ConfigError) as error:
        raise pytest.UsageError(str(error)) from None


def check_outputs(config, bench: BenchSession) -> None:
    benchmark_session = config._benchmarksession
    if benchmark_session.json:
        bench.json_target = Path(benchmark_session.json)
        check_new_files("--benchmark-json", bench.json_target, partial_twin(bench.json_target))
    name = benchmark_session.save or benchmark_session.autosave
    storage = benchmark_session.storage
    if name and hasattr(storage, "default_machine_id"):  # file storage (not elasticsearch): pytest-benchmark's naming
        bench.history_target = storage.path / storage.default_machine_id / f"{storage._next_num}_{name}.json"
        option = "--benchmark-save" if benchmark_session.save else "--benchmark-autosave"
        check_new_files(f"{option} (--benchmark-storage {storage.path})", bench.history_target)
        # The session writes these files itself (pytest_sessionfinish): atomically, and keeping what it cannot write.
        benchmark_session.save = benchmark_session.autosave = None
    benchmark_session.json = None


def partial_twin(path: Path) -> Path:
    """Where an interrupted session keeps what finished, beside the file a complete one would write."""
    return path.with_name(f"{path.stem}.partial.json")


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> BenchSession:
    return pytestconfig.stash[SESSION]


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook: it may be turned off in `pytest tests`
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Which frameworks this session set out to run (the gate tells a failure from a framework not selected), and
    whether it was interrupted."""
    session = config.stash[SESSION]
    output_json[SELECTED_FRAMEWORKS] = session.selected
    if session.interrupted:
        output_json[INTERRUPTED] = True


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    yield  # pytest-benchmark computes its statistics here
    config, bench = session.config, session.config.stash[SESSION]
    bench.interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    problems = write_outputs(config, bench) if exitstatus != pytest.ExitCode.USAGE_ERROR else []
    leaked = sorted(name for name in FRAMEWORK_MODULES if name in sys.modules)
    if leaked:  # a worker's reply, or an import in the harness, brought a framework into this process
        bench.show(f"error: the benchmark process imported {', '.join(leaked)}, and it must import no framework: a "
                   "bug of the harness")
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
    if problems:
        raise pytest.UsageError("\n".join(problems))


def write_outputs(config, bench: BenchSession) -> list[str]:
    """Write --benchmark-json (an interrupted session: its partial twin) and the history file; say what went where.
    The problems, each with where its data is kept instead."""
    write = bench.show
    targets = [("--benchmark-json", bench.json_target)]
    if bench.interrupted and bench.json_target is not None:
        targets = [("--benchmark-json", partial_twin(bench.json_target))]
    if bench.history_target is not None:
        if bench.interrupted:
            write("interrupted: the session is not saved in the benchmark history")
        else:
            targets.append(("the benchmark history", bench.history_target))
    targets = [(option, path) for option, path in targets if path is not None]
    benchmark_session = config._benchmarksession
    benchmarks = [benchmark for benchmark in benchmark_session.benchmarks if not benchmark.has_error]
    if not benchmarks:
        if targets:
            what = "interrupted before any framework finished" if bench.interrupted else \
                "no framework finished its timed epochs"
            write(f"{what}: {', '.join(str(path) for _, path in targets)} not written")
        return []
    text = run_json(config, benchmark_session, benchmarks)
    problems = []
    for option, path in targets:
        try:
            write_new_file(path, text)
        except FileExistsError:
            problems.append(f"{path} appeared during the run and is left as it was; {keep_elsewhere(text, 'run is')}")
        except OSError as error:
            problems.append(f"{option} {path} could not be written ({error.strerror}); "
                            f"{keep_elsewhere(text, 'run is')}")
        else:
            if bench.interrupted:
                write(f"interrupted: {bench.json_target} not written; the frameworks that finished "
                      f"({', '.join(r.framework for r in bench.records) or 'none'}) are kept in {path}, marked "
                      "incomplete")
            else:
                write(f"results written to {path}")
    return problems


def run_json(config, benchmark_session, benchmarks) -> str:
    """The session's pytest-benchmark JSON, made as pytest-benchmark makes it (its hooks, with every timing)."""
    from pytest_benchmark.utils import safe_dumps

    hook = config.hook
    commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
    hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output_json = hook.pytest_benchmark_generate_json(config=config, benchmarks=benchmarks, include_data=True,
                                                      machine_info=benchmark_session.get_machine_info(),
                                                      commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=config, benchmarks=benchmarks, output_json=output_json)
    return safe_dumps(output_json, ensure_ascii=True, indent=4)


def pytest_terminal_summary(terminalreporter, config):
    records = config.stash[SESSION].records if SESSION in config.stash else []
    if records:
        terminalreporter.section("MNIST ResNet18: per-framework results")
        terminalreporter.write_line(summary_table(records))
