"""Cascades and network selection (Bolukbasi et al.; Guan et al.).

* :mod:`.model`: :class:`Cascade`, networks of increasing cost as the nodes of one executor graph;
* :mod:`.policies`: :class:`NetworkSelectionPolicy` (rows may skip networks), :class:`SelectorPolicy`;
* :mod:`.reinforce`: :func:`train_reinforce`, Guan et al.'s joint training.

The oracle, operating points and frontiers are the generic ones of :mod:`adaexit.evaluation` (re-exported
here under the names earlier versions used).
"""

from ..evaluation import ExitOutputs, OperatingPoint, OracleResult, cascade_oracle, collect, evaluate_policy
from ..evaluation import frontier_table, policy_frontier
from ..policies import RoutingPolicy
from ..reports import plot_frontier
from ..simulation import prob_features
from .model import Cascade, CascadeInfo
from .policies import NetworkSelectionPolicy, SelectorPolicy, Standardize
from .reinforce import train_reinforce

CascadeOutputs = ExitOutputs
CascadeOracle = OracleResult
FrontierPoint = OperatingPoint
collect_outputs = collect
cascade_frontier = policy_frontier

__all__ = [
    "Cascade",
    "CascadeInfo",
    "CascadeOracle",
    "CascadeOutputs",
    "FrontierPoint",
    "NetworkSelectionPolicy",
    "RoutingPolicy",
    "SelectorPolicy",
    "Standardize",
    "cascade_frontier",
    "cascade_oracle",
    "collect_outputs",
    "evaluate_policy",
    "frontier_table",
    "plot_frontier",
    "prob_features",
    "train_reinforce",
]
