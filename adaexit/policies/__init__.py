"""Exit policies: who exits where. A policy only decides; the executor runs.

* :mod:`.base`: the :class:`Policy` interface, :class:`RoutingPolicy` (multi-way decisions) and
  :func:`policy_from_state` (a saved policy's class restored on load);
* :mod:`.confidence`: :class:`ConfidencePolicy`, :class:`NeverExitPolicy`, :class:`PatiencePolicy`;
* :mod:`.learned`: :class:`LearnedPolicy` (Bolukbasi et al.'s bottom-up learned gates);
* :mod:`.peers`: thresholds carried over from DeeBERT, BranchyNet, FastBERT (entropy conversions).

Routing policies for cascades (network selection, Guan et al.'s selectors) live in
:mod:`adaexit.cascade.policies`.
"""

from .base import Policy, RoutingPolicy, policy_from_state
from .confidence import ConfidencePolicy, NeverExitPolicy, PatiencePolicy
from .learned import ALWAYS_FIRE, LearnedPolicy, fit_learned_gates
from .peers import entropy_nats, entropy_score, entropy_threshold, fastbert_threshold

__all__ = [
    "ALWAYS_FIRE",
    "ConfidencePolicy",
    "LearnedPolicy",
    "NeverExitPolicy",
    "PatiencePolicy",
    "Policy",
    "RoutingPolicy",
    "entropy_nats",
    "entropy_score",
    "entropy_threshold",
    "fastbert_threshold",
    "fit_learned_gates",
    "policy_from_state",
]
