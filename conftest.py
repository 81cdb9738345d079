"""pytest options and fixtures of the benchmark suite (`pytest bench`) and the harness tests (`pytest tests`).

This process never imports a framework: frameworks are parametrized by name and run in worker processes.
"""

from __future__ import annotations

import pytest

from bench.errors import BenchError
from bench import options
from bench.run import require_installed, resolve_framework
from bench.summary import summary_table
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


def pytest_configure(config):
    config.stash[RECORDS] = []
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
        metafunc.parametrize("framework", params)


@pytest.fixture(scope="session")
def run_config(pytestconfig) -> contract.RunConfig:
    return pytestconfig.bench_run_config


@pytest.fixture(scope="session")
def run_records(pytestconfig) -> list:
    return pytestconfig.stash[RECORDS]


def pytest_terminal_summary(terminalreporter, config):
    records = config.stash.get(RECORDS, [])
    if records:
        terminalreporter.section("MNIST ResNet18: per-framework results")
        terminalreporter.write_line(summary_table(records))
