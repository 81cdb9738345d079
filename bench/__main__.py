"""`python -m bench run FRAMEWORK [options]`: one framework's standalone run, with progress and a summary.

The same run as `pytest bench --frameworks=FRAMEWORK`, without pytest: warm-up, timed epochs, evaluation after each,
the accuracy check. `--output FILE` keeps the record as JSON (written atomically; an existing file is never replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench import cli, options
from bench.errors import BenchError
from bench.run import FrameworkRun, accuracy_failure, require_installed, resolve_frameworks
from bench.summary import summary_table
from bench.yardstick import measure_matmul_rate
from implementations import FRAMEWORKS, contract


def write_json_atomically(path: Path, payload: dict) -> None:
    """Written to a temporary file, then linked into place; a file that appeared at `path` during the run is kept,
    and so is the record, in the temporary file. If the record cannot be written at all (a full disk), the error says
    where it went instead: a file in the system's temporary folder, or standard output."""
    text = json.dumps(payload, indent=2)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # mkstemp creates it private (0600)
        os.link(temporary, path)  # fails if `path` exists, unlike a rename
    except FileExistsError:
        raise BenchError(f"--output {path} appeared during the run and is left as it was; the record is kept in "
                         f"{temporary}") from None
    except OSError as error:
        if temporary is not None:
            os.unlink(temporary)
        raise BenchError(f"--output {path} could not be written ({error.strerror}); {keep_elsewhere(text)}") from None
    os.unlink(temporary)


def keep_elsewhere(text: str) -> str:
    kept = None
    try:
        descriptor, kept = tempfile.mkstemp(prefix="mnist-bench-record-", suffix=".json")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return f"the record is kept in {kept}"
    except OSError:
        if kept is not None:
            os.unlink(kept)
        print(text)
        return "the record is printed above"


def run(args: argparse.Namespace, console: Console) -> int:
    values = vars(args)
    config = options.run_config(values)
    job = contract.job_process(config)  # one replica per process, checked before anything runs
    (framework,) = resolve_frameworks([args.framework], {})
    require_installed(framework)
    output = Path(args.output) if args.output and job.rank == 0 else None  # a launched job's record is rank 0's
    if output is not None:
        options.check_output_path(output, "--output")
    if job.processes > 1:
        console.print(f"rank {job.rank} of a job of {job.processes} processes (coordinator {job.coordinator})"
                      + ("; rank 0 writes the record, not this one" if args.output and job.rank else ""))
    console.print(f"[bold]{framework.name}[/]: {config.epochs} epoch(s), batch {config.batch_size}, "
                  f"{config.train_subset or 'all'} training images, device {config.device}, seed {config.seed}")
    with FrameworkRun(framework, config, options.mnist_dir(values), not args.no_verify_digests, args.worker_timeout) as run:
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
            run.train()
        record = run.record()
    console.print(summary_table([record]))
    console.print(f"epoch times: {', '.join(f'{s:.2f}' for s in record.epoch_seconds)} s "
                  f"(median {record.median_epoch_seconds:.2f} s)")
    for note in record.notes:
        console.print(f"note: {note}")
    if output is not None:
        write_json_atomically(output, record.to_json())
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
    run_parser.add_argument("framework", help=f"one of {', '.join(FRAMEWORKS)}")
    for flag, kwargs in options.RUN_OPTIONS:
        run_parser.add_argument(flag, **kwargs)
    run_parser.add_argument("--output", help="also write the run's record to this JSON file (must not exist)")
    args = parser.parse_args(argv)
    console = Console(stderr=False)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return run(args, console)
    except (BenchError, contract.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        print(f"interrupted{f' by {interruption}' if str(interruption) else ''}: the worker is stopped, nothing is "
              "recorded", file=sys.stderr)
        return 130


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # a scheduler's stop ends the run as Ctrl-C does: the worker is stopped too


if __name__ == "__main__":
    sys.exit(cli.run(main))
