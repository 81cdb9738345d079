"""The benchmark: each framework trains the shared ResNet18 recipe in its own worker, one pytest-benchmark round per epoch.

Warm-up (compilation, tracing) happens before the timed rounds; evaluation runs between rounds, untimed. The test then
asserts the accuracy target, so a fast but wrong implementation fails here.
"""

import pytest

from bench.run import FrameworkRun, accuracy_failure, progress_line
from bench.worker import UnsupportedRun, WorkerError


def test_train(benchmark, framework, bench_session):
    config = bench_session.run_config
    benchmark.group = f"mnist-resnet18 epoch time (batch {config.batch_size})"
    show = lambda line: bench_session.show(f"{framework.name}: {line}")  # progress, on the terminal
    run = FrameworkRun(framework, config, bench_session.data, bench_session.worker_timeout_s,
                       bench_session.progress_interval_s, on_epoch=lambda run: show(run.last_epoch_line()))
    run.on_progress = lambda progress: show(progress_line(run, progress))
    failure = None
    try:
        with run:
            run.matmul = bench_session.matmul_rate(run.environment["device"])
            show(f"{run.environment['framework_version']} on {run.environment['device']}; warming up")
            run.warm_up()
            show(f"warm-up {run.warmup_s:.1f} s; {config.epochs} timed epoch(s) of "
                 f"{config.train_subset or 'all'} training images")
            benchmark.pedantic(run.train_epoch, setup=run.evaluate_new_epoch, rounds=config.epochs, iterations=1)
            while len(run.epoch_results) < config.epochs:  # --benchmark-disable runs the rounds' function once
                run.train_epoch()
                run.evaluate_new_epoch()
            record = run.record()
    except UnsupportedRun as error:
        pytest.skip(str(error))
    except WorkerError as error:
        failure = str(error)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: pytest-benchmark marks only Exceptions, so drop the cut-short entry
        benchmark.has_error = True
        raise
    if failure:  # outside the except block: the message alone, no chained traceback
        pytest.fail(failure, pytrace=False)
    benchmark.extra_info.update(record.to_json())
    bench_session.records.append(record)
    failure = accuracy_failure(record)
    if failure:
        pytest.fail(failure, pytrace=False)
