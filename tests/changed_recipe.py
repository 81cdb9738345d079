"""The contract with every recipe constant a page could restate changed, to values no framework has as a default (Keras'
epsilon is 1e-3, its momentum decay 0.99): the parity suite trains every worker under it, so that a change made in
implementations/contract.py is seen to reach every row. Importing this module changes them (in a worker, a process of
its own); then `changed_recipe:NAME` loads the registered row NAME's trainer."""

from implementations import FRAMEWORKS, contract, load_trainer_class

contract.BN_EPSILON, contract.BN_MOMENTUM, contract.SGD_MOMENTUM = 2e-3, 0.3, 0.5


def __getattr__(name: str):
    return load_trainer_class(FRAMEWORKS[name].module)
