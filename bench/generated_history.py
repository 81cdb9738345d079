"""Histories generated from real records: what bench.history is tested, measured and shown on.

    python -m bench.generated_history benchmark [--runs 1000] [--frameworks 17] [--html]
    python -m bench.generated_history planted FOLDER

`write_history` copies the records of a real run file (by default the committed smoke baseline) into a history of
autosaved run files, commit after commit, with noise drawn like the run-to-run noise of a real machine and with the
changes it is told to plant from a given commit on: a framework slower, its accuracy lower, its memory larger, or the
whole machine slower (epoch times and the matmul yardstick alike). `benchmark` times `python -m bench.history` over
a large one (the issue's budget: 1,000 runs x 17 frameworks in at most 10 s and 500 MB); `planted` writes the example
whose report the README shows.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench import cli
from bench.errors import BenchError

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "results" / "baseline-smoke-cpu.json"
MACHINE_FOLDER = "Linux-CPython-3.11-64bit"  # as pytest-benchmark's autosave names the machine's folder


@dataclass(frozen=True)
class Planted:
    """A change from commit `commit` on, to one framework or (framework None) to the whole machine."""

    commit: int
    framework: str | None
    time: float = 1.0  # factor on the epoch times
    matmul: float = 1.0  # factor on the yardstick's rate: a slower machine has a slower matmul
    accuracy: float = 0.0  # points added to the test accuracy
    memory: float = 1.0  # factor on every memory figure


@dataclass(frozen=True)
class Noise:
    """Run-to-run noise, each drawn afresh per run: relative spreads (log-normal) and points."""

    time: float = 0.03
    matmul: float = 0.02
    memory: float = 0.02
    accuracy: float = 0.1  # points


def planted_example(frameworks: list[str]) -> list[Planted]:
    """The acceptance scenario of issue #30 over 24 commits: three code changes and a machine change."""
    slower, less_accurate, larger = frameworks[:3]
    return [Planted(6, slower, time=1.35), Planted(10, None, time=1.6, matmul=1 / 1.6),
            Planted(14, less_accurate, accuracy=-2.0), Planted(18, larger, memory=1.3)]


def commit_id(index: int) -> str:
    return hashlib.sha1(f"generated commit {index}".encode()).hexdigest()


def write_history(template: Path, folder: Path, commits: int, runs_per_commit: int = 1,
                  frameworks: list[str] | None = None, planted: list[Planted] = (), noise: Noise = Noise(),
                  seed: int = 0) -> list[str]:
    """Autosaved run files of `commits` commits, `runs_per_commit` each, into `folder`; the commit ids in order.
    Each run holds every framework of `frameworks` (default: the template's), their records copied from the
    template's in turn."""
    data = json.loads(template.read_text())
    entries = [entry for entry in data["benchmarks"] if entry.get("extra_info")]
    if not entries:
        raise BenchError(f"{template}: no benchmark entry with a record to copy")
    names = frameworks or [entry["extra_info"]["framework"] for entry in entries]
    rng = random.Random(seed)
    machine = folder / MACHINE_FOLDER
    machine.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids, number = [commit_id(index) for index in range(commits)], 0
    for index, commit in enumerate(ids):
        changes = [plant for plant in planted if index >= plant.commit]
        for run in range(runs_per_commit):
            number += 1
            started = start + timedelta(hours=index, minutes=10 * run)
            matmul = rng.lognormvariate(0, noise.matmul)
            for plant in changes:
                matmul *= plant.matmul if plant.framework is None else 1.0
            run_data = {key: value for key, value in data.items() if key != "benchmarks"}
            run_data.update(commit_info={"id": commit, "time": (start + timedelta(hours=index)).isoformat(),
                                         "dirty": False, "project": "generated", "branch": "main"},
                            datetime=started.isoformat())
            run_data["benchmarks"] = [
                generated_entry(entries[position % len(entries)], name, matmul, rng, noise,
                                [plant for plant in changes if plant.framework in (None, name)])
                for position, name in enumerate(names)]
            (machine / f"{number:04d}_{commit}_{started:%Y%m%d_%H%M%S}.json").write_text(json.dumps(run_data))
    return ids


def generated_entry(template: dict, framework: str, matmul: float, rng: random.Random, noise: Noise,
                    changes: list[Planted]) -> dict:
    entry = copy.deepcopy(template)
    info = entry["extra_info"]
    info["framework"] = framework
    time_factor, memory_factor = rng.lognormvariate(0, noise.time), rng.lognormvariate(0, noise.memory)
    accuracy_points = rng.gauss(0, noise.accuracy)
    for plant in changes:
        time_factor, memory_factor = time_factor * plant.time, memory_factor * plant.memory
        accuracy_points += plant.accuracy
    for key in ("epoch_seconds", "worker_epoch_seconds"):
        info[key] = [seconds * time_factor for seconds in info[key]]
    if info.get("warmup_s") is not None:  # a slower machine or step warms up slower too
        info["warmup_s"] *= time_factor
    entry["stats"]["data"] = [seconds * time_factor for seconds in entry["stats"]["data"]]
    for key in ("gpu_memory_peak_bytes", "allocator_peak_bytes", "peak_rss_bytes"):
        if info.get(key) is not None:
            info[key] = round(info[key] * memory_factor)
    info["test_accuracy"] = min(1.0, max(0.0, info["test_accuracy"] + accuracy_points / 100))
    info["epoch_test_accuracy"][-1] = info["test_accuracy"]
    info["matmul"] = {**info["matmul"], "flops_per_second": info["matmul"]["flops_per_second"] * matmul}
    return entry


# --- The benchmark of bench.history -------------------------------------------------------------------------------------
def measure(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak resident bytes and exit status of a command run alone."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss * 1024, process.returncode


def benchmark(args: argparse.Namespace) -> int:
    frameworks = [f"framework-{index + 1:02d}" for index in range(args.frameworks)]
    with tempfile.TemporaryDirectory(prefix="history-benchmark-") as scratch:
        folder = Path(scratch) / "history"
        write_history(args.template, folder, commits=args.runs, frameworks=frameworks,
                      planted=planted_example(frameworks), seed=0)
        size = sum(path.stat().st_size for path in folder.rglob("*.json"))
        outputs = ["--json", str(Path(scratch) / "changes.json")]
        if args.html:
            outputs += ["--html", str(Path(scratch) / "history.html")]
        seconds, peak, status = measure([sys.executable, "-m", "bench.history", str(folder), *outputs])
        changes = json.loads((Path(scratch) / "changes.json").read_text())["changes"]
        page = f" (a page of {(Path(scratch) / 'history.html').stat().st_size / 1e6:,.0f} MB)" if args.html else ""
    within = seconds <= 10 and peak <= 500e6
    print(f"python -m bench.history over {args.runs:,} runs x {args.frameworks} frameworks ({size / 1e6:,.0f} MB of "
          f"JSON){' with --html' + page if args.html else ''}: {seconds:.1f} s, peak resident memory {peak / 1e6:,.0f} MB "
          f"({'within' if within else 'OVER'} the budget of 10 s and 500 MB); exit status {status}, "
          f"{len(changes)} changes found (3 planted)")
    return 0 if within else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generated_history", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    timed = commands.add_parser("benchmark", help="time bench.history over a large generated history")
    timed.add_argument("--runs", type=int, default=1000, help="runs, one commit each (default 1000)")
    timed.add_argument("--frameworks", type=int, default=17, help="frameworks per run (default 17)")
    timed.add_argument("--html", action="store_true", help="also write the HTML report")
    timed.add_argument("--template", type=Path, default=BASELINE, help="the real run file whose records are copied")
    example = commands.add_parser("planted", help="write the planted example: 24 commits, 2 runs each")
    example.add_argument("folder", type=Path)
    example.add_argument("--template", type=Path, default=BASELINE, help="the real run file whose records are copied")
    args = parser.parse_args(argv)
    if args.command == "benchmark":
        return benchmark(args)
    if args.folder.exists():
        print(f"error: {args.folder} exists; choose a new folder", file=sys.stderr)
        return 2
    frameworks = [entry["extra_info"]["framework"] for entry in json.loads(args.template.read_text())["benchmarks"]]
    write_history(args.template, args.folder, commits=24, runs_per_commit=2, planted=planted_example(frameworks))
    print(f"wrote {args.folder}: 24 commits of 2 runs; planted: {planted_example(frameworks)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
