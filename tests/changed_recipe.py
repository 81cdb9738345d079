"""The contract with every recipe constant a page could restate changed, for the test that a change made in
implementations/contract.py reaches every row: importing this module changes them, then `changed_recipe:NAME` loads the
registered row NAME's trainer, which builds under the changed recipe (in its worker, a process of its own)."""

from implementations import FRAMEWORKS, contract, load_trainer_class

contract.BN_EPSILON, contract.BN_MOMENTUM, contract.SGD_MOMENTUM = 1e-3, 0.3, 0.5


def __getattr__(name: str):
    return load_trainer_class(FRAMEWORKS[name].module)
