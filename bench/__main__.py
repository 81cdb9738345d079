"""`python -m bench run FRAMEWORK [options]`: one framework's standalone run, with progress and a summary.

The same run as `pytest bench --frameworks=FRAMEWORK`, without pytest: warm-up, timed epochs, evaluation after each,
the accuracy check. `--output FILE` keeps the record as JSON (written atomically; an existing file is never replaced).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench import cli, options
from bench.errors import BenchError
from bench.output import check_new_files, keep_elsewhere, write_new_file
from bench.run import (FrameworkRun, accuracy_failure, check_device, progress_line, require_installed,
                       resolve_frameworks, run_data, stop_on_sigterm)
from bench.summary import summary_table
from bench.worker import check_trainer_classes
from bench.yardstick import measure_matmul_rate
from implementations import FRAMEWORKS, contract


def run(args: argparse.Namespace, console: Console) -> int:
    values = vars(args)
    config = options.run_config(values)
    job = contract.job_process(config)  # one replica per process, checked before anything runs
    check_device(config)
    extra_modules = options.framework_modules(args.framework_module)
    (framework,) = resolve_frameworks([args.framework], extra_modules)
    require_installed(framework)
    if reason := framework.cannot_run(config):
        raise BenchError(f"cannot run this configuration: {reason}")
    check_trainer_classes({name: module for name, module in extra_modules.items() if name == framework.name})
    data = run_data(config, args.mnist_dir, not args.no_verify_digests)
    output = Path(args.output) if args.output and job.rank == 0 else None  # a launched job's record is rank 0's
    if output is not None:
        check_new_files("--output", output)  # may create its folder: last
    if job.processes > 1:
        console.print(f"rank {job.rank} of a job of {job.processes} processes (coordinator {job.coordinator})"
                      + ("; rank 0 writes the record, not this one" if args.output and job.rank else ""))
    console.print(f"[bold]{framework.name}[/]: {config.epochs} epoch(s), batch {config.batch_size}, "
                  f"{config.train_subset or 'all'} training images, device {config.device}, seed {config.seed}")
    with FrameworkRun(framework, config, data, args.worker_timeout, args.progress_interval) as run:
        console.print(f"worker ready on {run.environment['device']} ({framework.name} {run.environment['framework_version']}); "
                      "measuring the matmul yardstick")
        run.matmul = measure_matmul_rate("cpu" if run.environment["device"] == "CPU" else "cuda", config.precision,
                                         config.allow_tf32)
        console.print(f"matmul: {run.matmul.flops_per_second / 1e9:,.0f} GFLOP/s ({run.matmul.description}); warming up")
        run.warm_up()
        console.print(f"warm-up {run.warmup_s:.1f} s")
        columns = (TextColumn("epoch {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("training", total=config.epochs)

            def show(run: FrameworkRun) -> None:
                progress.console.print(run.last_epoch_line())
                progress.update(task, advance=1, description=f"test accuracy {run.evaluations[-1].accuracy:.2%}")

            run.on_epoch = show
            run.on_progress = lambda step: progress.update(task, description=progress_line(run, step))
            run.train()
        record = run.record()
    console.print(summary_table([record]), soft_wrap=True)  # long lines scroll: numbers are never broken
    console.print(f"epoch times: {', '.join(f'{s:.2f}' for s in record.epoch_seconds)} s "
                  f"(median {record.median_epoch_seconds:.2f} s)")
    for note in record.notes:
        console.print(f"note: {note}")
    if output is not None:
        text = json.dumps(record.to_json(), indent=2)
        try:
            write_new_file(output, text)
        except FileExistsError:
            raise BenchError(f"--output {output} appeared during the run and is left as it was; "
                             f"{keep_elsewhere(text, 'record is')}") from None
        except OSError as error:
            raise BenchError(f"--output {output} could not be written ({error.strerror}); "
                             f"{keep_elsewhere(text, 'record is')}") from None
        console.print(f"record written to {output}")
    failure = accuracy_failure(record)
    if failure:
        console.print(f"[red]FAILED[/]: {failure}")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train one framework and print a summary")
    run_parser.add_argument("framework", help=f"one of {', '.join(FRAMEWORKS)}, or a --framework-module name")
    for flag, kwargs in options.RUN_OPTIONS:
        run_parser.add_argument(flag, **kwargs)
    run_parser.add_argument("--output", help="also write the run's record to this JSON file (must not exist)")
    args = parser.parse_args(argv)
    console = Console(stderr=False)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        options.check_given_once(sys.argv[1:] if argv is None else argv,
                                 ["--output", *(flag for flag, _ in options.RUN_OPTIONS)])
        return run(args, console)
    except (BenchError, contract.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        print(f"interrupted{f' by {interruption}' if str(interruption) else ''}: the worker is stopped, nothing is "
              "recorded", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli.run(main))
