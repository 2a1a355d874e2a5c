"""Cascades and network selection (Bolukbasi et al.; Guan et al.).

* :mod:`.model`: :class:`Cascade`, networks of increasing cost as the nodes of one executor graph;
* :mod:`.policies`: :class:`NetworkSelectionPolicy` (rows may skip networks), :class:`SelectorPolicy`;
* :mod:`.reinforce`: :func:`train_reinforce`, Guan et al.'s joint training.

The oracle, operating points and frontiers are the generic ones of :mod:`adaexit.evaluation`.
"""

from .model import Cascade
from .policies import NetworkSelectionPolicy, SelectorPolicy, Standardize
from .reinforce import train_reinforce

__all__ = ["Cascade", "NetworkSelectionPolicy", "SelectorPolicy", "Standardize", "train_reinforce"]
