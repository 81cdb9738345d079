"""Every command's standard output that cannot be written: a full device is one line and exit 2, a closed pipe ends the
command quietly as Unix tools end. Real processes, the real /dev/full and a real pipe whose reader has gone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.cli import CLOSED_PIPE_STATUS
from commands import REPO


@pytest.fixture
def commands(real_session, mnist_dir, tmp_path) -> dict[str, list[str]]:
    run = str(real_session.json_path)
    return {
        "data": ["-m", "bench.data", "verify", "--mnist-dir", mnist_dir],
        "gate": ["-m", "bench.gate", "--baseline", run, run],
        "report": ["-m", "bench.report", run, "--plots", str(tmp_path / "plots")],
    }


@pytest.mark.parametrize("command", ["data", "gate", "report"])
def test_a_full_device_on_standard_output_is_one_line_and_exit_2(commands, command):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, *commands[command]], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: standard output could not be written (No space left on device)\n", result.stderr


@pytest.mark.parametrize("command", ["data", "gate", "report"])
def test_a_closed_pipe_ends_the_command_quietly(commands, command):
    process = subprocess.Popen([sys.executable, *commands[command]], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the first line, as `| head -0` leaves it
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == CLOSED_PIPE_STATUS, stderr
    assert stderr == ""
