"""pytest options and fixtures of the benchmark suite (`pytest bench`) and the harness tests (`pytest tests`).

This process never imports a framework: frameworks are parametrized by name and run in worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench import options
from bench.run import require_installed, resolve_framework
from bench.summary import SELECTED_FRAMEWORKS, summary_table
from implementations import FRAMEWORKS, contract

RECORDS = pytest.StashKey[list]()


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
    config.stash[RECORDS] = []
    claim_benchmark_json(config)
    values = {options.dest(flag): config.getoption(options.dest(flag)) for flag, _ in options.RUN_OPTIONS}
    try:
        config.bench_run_config = options.run_config(values)
        config.bench_mnist_dir = options.mnist_dir(values)
        config.bench_extra_modules = dict(parse_module(text) for text in config.getoption("framework_module"))
        names = config.getoption("frameworks")
        names = names.split(",") if names else [*FRAMEWORKS, *config.bench_extra_modules]
        config.bench_frameworks = [resolve_framework(name.strip(), config.bench_extra_modules) for name in names]
    except (BenchError, contract.ConfigError) as error:
        raise pytest.UsageError(str(error)) from None


def claim_benchmark_json(config) -> None:
    """Make --benchmark-json atomic and never silently overwriting: pytest-benchmark writes a temporary file beside the
    target, which is linked into place once complete (os.link fails if the target appeared meanwhile)."""
    target = config.getoption("benchmark_json", None)
    if target is None:
        return
    target = Path(target)
    if target.exists():
        raise pytest.UsageError(f"--benchmark-json {target} exists and would be overwritten: choose a new file name, "
                                "or keep a numbered history with --benchmark-autosave --benchmark-storage=file://results/history")
    target.parent.mkdir(parents=True, exist_ok=True)
    config.option.benchmark_json = target.parent / f".{target.name}.{os.getpid()}.partial"
    config.bench_json_target = target


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session):
    yield  # pytest-benchmark writes the temporary JSON here
    config = session.config
    target = getattr(config, "bench_json_target", None)
    partial = Path(config.option.benchmark_json) if target else None
    if partial is not None and partial.exists():
        try:
            os.link(partial, target)
        except FileExistsError:
            raise pytest.UsageError(f"{target} appeared during the run; the results are kept in {partial}") from None
        partial.unlink()
        config.get_terminal_writer().line(f"results written to {target}")


def parse_module(text: str) -> tuple[str, str]:
    name, _, module = text.partition("=")
    if not name or ":" not in module:
        raise BenchError(f"--framework-module {text!r}: expected NAME=package.module:TrainerClass")
    return name, module


def pytest_generate_tests(metafunc):
    """Parametrize `framework` over the selected frameworks; those not installed are skipped, saying so."""
    if "framework" in metafunc.fixturenames:
        params = []
        for framework in metafunc.config.bench_frameworks:
            try:
                require_installed(framework)
                marks = ()
            except BenchError as error:
                marks = pytest.mark.skip(reason=f"not installed: {error}")
            params.append(pytest.param(framework, id=framework.name, marks=marks))
        metafunc.parametrize("framework", params, scope="module")  # a module's tests grouped by framework


@pytest.fixture(scope="session")
def run_config(pytestconfig) -> contract.RunConfig:
    return pytestconfig.bench_run_config


@pytest.fixture(scope="session")
def run_records(pytestconfig) -> list:
    return pytestconfig.stash[RECORDS]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Which frameworks this session set out to run: the gate tells a framework that failed from one not selected."""
    output_json[SELECTED_FRAMEWORKS] = [framework.name for framework in config.bench_frameworks]


def pytest_terminal_summary(terminalreporter, config):
    records = config.stash.get(RECORDS, [])
    if records:
        terminalreporter.section("MNIST ResNet18: per-framework results")
        terminalreporter.write_line(summary_table(records))
