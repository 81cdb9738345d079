"""Where the burn trainer's CPU time goes, by function: perf's sampling profile of real training steps on MNIST, driven
through the same page as the benchmark and recorded only while the steps run (not the build, the warm-up or Python's
start-up). A harness command, not part of the page: pages do not depend on the harness.

    .venv/bin/python -m bench.profile_burn [STEPS] [MNIST_DIR]   # needs perf (Debian: linux-perf)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import load_mnist
from implementations import contract
from implementations.rust_burn.trainer import BurnTrainer


def main(steps: int, mnist_dir: str | None) -> None:
    config = contract.RunConfig(device="cpu", train_subset=steps * contract.RunConfig.batch_size)
    data = contract.prepare_data(*load_mnist(mnist_dir), config)
    trainer = BurnTrainer(config, data, contract.initial_weights(config.seed))
    trainer.warm_up()
    with tempfile.TemporaryDirectory() as folder:
        recording = Path(folder) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "--quiet", "-e", "cpu-clock", "-F", "999", "-p", str(os.getpid()),
                                 "-o", str(recording)])
        time.sleep(1)  # perf attaches to every thread of this process, rayon's pool included
        result = trainer.train_epoch(0)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        print(f"{steps} training steps of {config.batch_size} images in {result.seconds:.1f} s "
              f"({time.strftime('%Y-%m-%d %H:%M')}); the functions that take the time (self time, all threads):")
        report = subprocess.run(["perf", "report", "-i", str(recording), "--stdio", "--no-children",
                                 "--sort", "dso,symbol", "--percent-limit", "1"], capture_output=True, text=True,
                                check=True)
        print("\n".join(line for line in report.stdout.splitlines() if line and not line.startswith("#")))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, sys.argv[2] if len(sys.argv) > 2 else None)
