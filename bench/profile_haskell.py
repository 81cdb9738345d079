"""Where the Haskell trainer's time goes, by function (each layer's forward and backward pass): GHC's cost-centre
profile of real training steps on MNIST, driven through the same page as the benchmark. Part of the harness, not of
the page: it reads MNIST with bench.data.

    implementations/haskell/profile.sh [STEPS] [MNIST_DIR]   # builds the profiling copy, then runs this module:
    python -m bench.profile_haskell PROGRAM STEPS [MNIST_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.data import load_mnist
from implementations import contract
from implementations.haskell.trainer import HaskellTrainer


def main(program: str, steps: int, mnist_dir: str | None) -> None:
    config = contract.RunConfig(train_subset=steps * contract.RunConfig.batch_size)
    data = contract.prepare_data(*load_mnist(mnist_dir), config)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "mnist-resnet"

        class ProfiledTrainer(HaskellTrainer):
            command = (program, "+RTS", "-p", f"-po{report}", "-RTS")

        trainer = ProfiledTrainer(config, data, contract.initial_weights(config.seed))
        result = trainer.train_epoch(0)
        trainer.program.process.stdin.close()  # the runtime writes its profile as the program exits
        trainer.program.process.wait()
        print(f"{steps} training steps of {config.batch_size} images in {result.seconds:.1f} s under profiling "
              f"({time.strftime('%Y-%m-%d %H:%M')}); the cost centres that take the time (GHC's profile, less its "
              "call tree):")
        print(report.with_suffix(".prof").read_text().split("\n\n\n")[0])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
