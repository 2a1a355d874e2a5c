"""Dynamic routing with controller modules (Liu & Deng, *Dynamic Deep Neural Networks*, D2NN).

* :mod:`.model`: :class:`D2NN` (a graph whose controllers route each example), :class:`Controller`;
* :mod:`.trainer`: :class:`D2NNTrainer` (backprop + REINFORCE);
* :mod:`.topologies`: the paper's high-low, cascade, chain and hierarchy topologies.
"""

from .model import D2NN, Controller, Rollout
from .topologies import cascade_d2nn, chain_d2nn, hierarchy_d2nn, high_low_d2nn
from .trainer import D2NNTrainer

__all__ = [
    "Controller",
    "D2NN",
    "D2NNTrainer",
    "Rollout",
    "cascade_d2nn",
    "chain_d2nn",
    "hierarchy_d2nn",
    "high_low_d2nn",
]
