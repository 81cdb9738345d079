"""One package per framework, each implementing `contract.Trainer`; this registry names them without importing them.

The benchmark process never imports a framework: it reads this table, checks with importlib whether the framework's
packages are installed (and, for a row in another language, whether its program is built), and hands the module path
to a worker process, which imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Framework(NamedTuple):
    name: str
    module: str  # "package.module:TrainerClass"
    requires: tuple[str, ...]  # import names that must be installed
    install_hint: str
    environment: tuple[tuple[str, str], ...] = ()  # variables the worker sets before it imports `module`
    programs: tuple[str, ...] = ()  # built files, from the repository root, that must exist: a compiled row's program
    # Its data-parallel engine runs one process per replica (torch.distributed): the harness starts them, as torchrun.
    process_per_replica: bool = False
    # What the row can run, known without importing it: a run that asks for more is skipped, saying why, before any
    # worker starts (as --replicas on a row without a data-parallel engine is, from its worker).
    precisions: tuple[str, ...] = ("fp32", "bf16")
    devices: tuple[str, ...] = ("cpu", "cuda")
    data_parallel: bool = True  # it has a data-parallel engine (its Trainer's data_parallel names it)

    def worker_ranks(self, replicas: int) -> int:
        """How many worker processes a run on `replicas` replicas takes."""
        return replicas if self.process_per_replica else 1

    def cannot_run(self, config) -> str | None:
        """Why this row cannot run `config` (a contract.RunConfig), or None."""
        if config.precision not in self.precisions:
            return f"{self.name} trains in {' and '.join(self.precisions)} only, not --precision {config.precision}"
        if config.device != "auto" and config.device not in self.devices:
            return f"{self.name} runs on {' and '.join(self.devices)} only, not --device {config.device}"
        if config.replicas > 1 and not self.data_parallel:
            return f"{self.name} has no data-parallel engine, for --replicas {config.replicas}"
        return None


FRAMEWORKS = {
    f.name: f
    for f in (
        Framework("pytorch", "implementations.pytorch.trainer:TorchTrainer", ("torch",), "pip install '.[pytorch]'",
                  process_per_replica=True),
        Framework("tensorflow", "implementations.tensorflow.trainer:TensorFlowTrainer", ("tensorflow",), "pip install '.[tensorflow]'"),
        Framework("jax", "implementations.jax_haiku.trainer:HaikuTrainer", ("jax", "haiku", "optax"), "pip install '.[jax]'"),
        Framework("flax", "implementations.flax_nnx.trainer:FlaxTrainer", ("jax", "flax", "optax"), "pip install '.[flax]'"),
        Framework("keras-jax", "implementations.keras3.trainer:Keras3Trainer", ("keras", "jax"), "pip install '.[keras,jax]'",
                  environment=(("KERAS_BACKEND", "jax"),)),
        # Keras' distribution API runs on the JAX backend only.
        Framework("keras-torch", "implementations.keras3.trainer:Keras3Trainer", ("keras", "torch"),
                  "pip install '.[keras,pytorch]'", environment=(("KERAS_BACKEND", "torch"),), data_parallel=False),
        Framework("keras-tensorflow", "implementations.keras3.trainer:Keras3Trainer", ("keras", "tensorflow"),
                  "pip install '.[keras,tensorflow]'", environment=(("KERAS_BACKEND", "tensorflow"),),
                  data_parallel=False),
        Framework("lightning", "implementations.lightning.trainer:LightningTrainer", ("torch", "pytorch_lightning"),
                  "pip install '.[lightning]'", process_per_replica=True),
        Framework("haskell", "implementations.haskell.trainer:HaskellTrainer", (),
                  "apt-get install -y ghc libghc-hmatrix-dev libghc-vector-dev libopenblas-dev cabal-install && "
                  "implementations/haskell/build.sh", programs=("implementations/haskell/bin/mnist-resnet",),
                  precisions=("fp32",), devices=("cpu",), data_parallel=False),  # float32 sgemm on the CPU's OpenBLAS
        # Rust: a PyO3 extension that `make setup` builds where cargo is present.
        Framework("burn", "implementations.rust_burn.trainer:BurnTrainer", ("mnist_burn",),
                  "install Rust (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then make setup",
                  precisions=("fp32",), data_parallel=False),
    )
}


def missing_packages(framework: Framework) -> list[str]:
    missing = [name for name in framework.requires if importlib.util.find_spec(name) is None]
    return missing + [path for path in framework.programs if not (REPO / path).is_file()]


def load_trainer_class(module: str):
    """Import "package.module:Class" (inside a worker process)."""
    module_name, _, class_name = module.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
