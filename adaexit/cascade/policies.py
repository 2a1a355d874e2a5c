"""Routing policies for cascades: Bolukbasi et al.'s network selection and Guan et al.'s selectors.

Both read :func:`~adaexit.simulation.prob_features` of a node's logits (class-agnostic softmax
statistics) through a small classifier per node:

* :class:`NetworkSelectionPolicy`: at node ``k``, exit or go to any successor (a row may skip
  networks), fitted bottom-up as cost-sensitive classification (:meth:`NetworkSelectionPolicy.fit`);
* :class:`SelectorPolicy`: ``P(exit)`` per node, trained jointly with the networks by REINFORCE
  (:func:`adaexit.cascade.train_reinforce`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptiveModel
from ..evaluation import ExitOutputs, collect
from ..policies import Policy, RoutingPolicy
from ..simulation import prob_features


class Standardize(nn.Module):
    """``(x - mean) / std`` with buffers set from data (:meth:`fit`); saved in ``state_dict``."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _small_net(in_features: int, out_features: int, hidden: int) -> nn.Sequential:
    """``Standardize -> Linear`` or ``Standardize -> Linear -> ReLU -> Linear``."""
    if hidden <= 0:
        return nn.Sequential(Standardize(in_features), nn.Linear(in_features, out_features))
    return nn.Sequential(
        Standardize(in_features), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
    )


class NetworkSelectionPolicy(RoutingPolicy):
    """Bolukbasi et al.'s network selection: at node ``k`` a small classifier picks exit or a successor.

    Features are :func:`prob_features` of the node's logits (softmax statistics plus the ``top_k``
    sorted probabilities). :meth:`fit` trains the classifiers from the last decision back to the first:
    at node ``k`` every choice ``r`` has a per-example cost ``c_r`` - the node's loss if it exits, or
    ``lam * (normalised cost of the successor) + (cost-plus-loss of the already-fitted policy from the
    successor on)`` - and the classifier is fit by importance-weighted classification: label
    ``argmin_r c_r``, weight the mean regret ``c_r - min c`` of the other choices. With two choices this
    is exactly Bolukbasi's weighted binary classification (weight ``|c_exit - c_continue|``). Sweeping
    ``lam`` traces an accuracy/cost frontier.

    Args:
        hidden: width of a one-hidden-layer MLP per node; ``0`` (default) = a linear classifier.
        top_k: how many sorted probabilities to add to the three statistics.
    """

    def __init__(self, hidden: int = 0, top_k: int = 3):
        super().__init__()
        if int(hidden) < 0 or int(top_k) < 0:
            raise ValueError(f"hidden and top_k must be >= 0, got hidden={hidden}, top_k={top_k}")
        self.hidden = int(hidden)
        self.top_k = int(top_k)
        self.lam: float | None = None
        self.classifiers = nn.ModuleList()

    @property
    def feature_dim(self) -> int:
        return 3 + self.top_k

    def bind_graph(self, successors):
        super().bind_graph(successors)
        shapes = [1 + len(s) for s in self.successors[:-1]]
        current = [self._out_dim(c) for c in self.classifiers]
        if current != shapes:  # a different graph: new (untrained) classifiers
            self.classifiers = nn.ModuleList(_small_net(self.feature_dim, r, self.hidden) for r in shapes)
        return self

    @staticmethod
    def _out_dim(classifier: nn.Module) -> int:
        return classifier[-1].out_features

    def choose(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Route per row at node ``k`` from its logits (non-finite rows go to the next node)."""
        if k >= len(self.classifiers):
            return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        feats = prob_features(logits, self.top_k)
        scores = self.classifiers[k](feats.to(self._dtype()))
        route = scores.argmax(dim=1)
        finite = torch.isfinite(feats).all(dim=1)
        return torch.where(finite, route, torch.ones_like(route))

    def _dtype(self) -> torch.dtype:
        return next(self.classifiers.parameters()).dtype

    def decide_route(self, k, head, h, state):
        logits, _, _ = head.gate(h, "maxprob", math.inf)  # the fused kernel: pool + linear + softmax
        return logits, self.choose(k, logits), state

    @torch.no_grad()
    def _values(self, outputs: ExitOutputs, lam: float, loss: str):
        """Per-node loss [K, N] and normalised step costs [K]."""
        labels = outputs.labels
        if loss == "error":
            losses = torch.stack([(lg.argmax(1) != labels).float() for lg in outputs.logits])
        elif loss == "ce":
            losses = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in outputs.logits])
        else:
            raise ValueError(f"loss must be 'error' or 'ce', got {loss!r}")
        step = torch.tensor(outputs.step_costs, dtype=torch.float32) / (outputs.reference_cost or 1.0)
        return losses.cpu(), step

    def fit(
        self,
        cascade: AdaptiveModel,
        data,
        lam: float,
        *,
        cost: str = "flops",
        loss: str = "error",
        epochs: int = 300,
        lr: float = 0.05,
    ) -> "NetworkSelectionPolicy":
        """Fit every node's classifier on ``data``, from the last decision back to the first.

        Args:
            cascade: the cascade the policy will route (its graph; the policy is bound to it but not set:
                call ``cascade.set_policy(policy)``).
            data: ``(x, y)`` tensors, an iterable of ``(x, y)`` batches, or :class:`~adaexit.evaluation.ExitOutputs`
                from :func:`~adaexit.evaluation.collect` (reuse them when sweeping ``lam``).
            lam: cost multiplier (>= 0): choice cost = loss + ``lam`` * cost / reference cost.
            loss: per-node loss, ``"error"`` (0-1) or ``"ce"`` (cross-entropy).
            epochs, lr: full-batch Adam steps per node classifier.
        """
        if not lam >= 0 or math.isinf(lam):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        outputs = data if isinstance(data, ExitOutputs) else collect(cascade, data, cost=cost)
        if len(outputs.logits) != cascade.num_exits:
            raise ValueError(
                f"data holds outputs of {len(outputs.logits)} nodes but the cascade has {cascade.num_exits}"
            )
        self.bind_graph(cascade.successors)
        self.to(outputs.logits[0].device)
        self.lam = float(lam)
        losses, step = self._values(outputs, lam, loss)
        K = len(outputs.logits)
        # value[j]: cost-plus-loss from node j on (j already run) under the policy fitted downstream.
        value: list[torch.Tensor | None] = [None] * K
        value[K - 1] = losses[K - 1]
        for k in reversed(range(K - 1)):
            succ = self.successors[k]
            choice_costs = torch.stack([losses[k]] + [lam * step[j] + value[j] for j in succ], dim=1)
            logits_k = outputs.logits[k].cpu()
            self._fit_node(k, prob_features(logits_k, self.top_k), choice_costs, epochs, lr)
            with torch.no_grad():
                route = self.choose(k, logits_k.to(outputs.logits[k].device)).cpu()
            value[k] = choice_costs.gather(1, route[:, None]).squeeze(1)
        return self

    def _fit_node(self, k: int, feats: torch.Tensor, choice_costs: torch.Tensor, epochs: int, lr: float) -> None:
        classifier = self.classifiers[k]
        keep = torch.isfinite(feats).all(dim=1)
        feats, choice_costs = feats[keep], choice_costs[keep]
        for m in classifier.modules():  # refit from scratch: the result depends on the data only
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        if feats.shape[0] == 0:
            return
        device, dtype = classifier[-1].weight.device, classifier[-1].weight.dtype
        feats, choice_costs = feats.to(device, dtype), choice_costs.to(device, dtype)
        classifier[0].fit(feats)
        # Importance-weighted classification: label = the cheapest choice (ties -> the lowest route:
        # exit first), weight = the mean regret of the other choices. With two choices the weight is
        # |c_exit - c_continue|, Bolukbasi et al.'s weighted binary classification; with more, a row
        # where exiting would be very wrong weighs more than one where only the successor differs.
        # (Weighted cross-entropy is convex for the linear classifier; an expected-regret loss is not
        # and can saturate on a wrong choice.)
        regret = choice_costs - choice_costs.min(dim=1, keepdim=True).values
        target = choice_costs.argmin(dim=1)
        weight = regret.sum(dim=1) / max(1, regret.shape[1] - 1)
        weight = weight + 1e-3 * (weight.mean() + 1e-6)  # ties still pull towards the cheaper route
        weight = weight / weight.sum()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(max(1, int(epochs))):
                optimizer.zero_grad()
                loss = (weight * F.cross_entropy(classifier(feats), target, reduction="none")).sum()
                loss.backward()
                optimizer.step()

    def get_extra_state(self):
        return {"hidden": self.hidden, "top_k": self.top_k, "lam": self.lam}

    def set_extra_state(self, state):
        self.hidden, self.top_k, self.lam = int(state["hidden"]), int(state["top_k"]), state["lam"]

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, top_k={self.top_k}, lam={self.lam}"


class SelectorPolicy(Policy):
    """Guan et al.'s selection modules: a small network per node gives P(exit) from the node's output.

    Input: :func:`prob_features` of the node's logits. A row exits at the first node where
    ``P(exit) >= threshold``; the last node always exits; rows with non-finite logits never exit early.
    Train with :func:`train_reinforce` (jointly with the cascade's networks).

    Args:
        hidden: hidden width of each selector (``0`` = logistic regression).
        top_k: sorted probabilities added to the statistics (see :func:`prob_features`).
        threshold: exit when ``P(exit) >= threshold`` at inference (0.5 by default).
    """

    def __init__(self, hidden: int = 16, top_k: int = 3, threshold: float = 0.5):
        super().__init__()
        if int(hidden) < 0 or int(top_k) < 0:
            raise ValueError(f"hidden and top_k must be >= 0, got hidden={hidden}, top_k={top_k}")
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold is NaN")
        self.hidden, self.top_k, self.threshold = int(hidden), int(top_k), threshold
        self.selectors = nn.ModuleList()

    def bind(self, num_exits: int) -> "SelectorPolicy":
        if num_exits < 1:
            raise ValueError(f"SelectorPolicy needs a model with >= 1 exit, got {num_exits}")
        if len(self.selectors) != num_exits - 1:
            self.selectors = nn.ModuleList(
                _small_net(3 + self.top_k, 1, self.hidden) for _ in range(num_exits - 1)
            )
        return super().bind(num_exits)

    def exit_probability(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """P(exit) ``[n]`` at node ``k`` (< last) given its logits; differentiable in the selector only."""
        feats = prob_features(logits.detach(), self.top_k)
        dtype = next(self.selectors[k].parameters()).dtype
        return torch.sigmoid(self.selectors[k](feats.to(dtype)).squeeze(1))

    def decide(self, k, head, h, state):
        logits, _, _ = head.gate(h, "maxprob", math.inf)
        if self._is_last(k):
            return logits, torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), state
        return logits, self.exit_probability(k, logits) >= self.threshold, state  # NaN never exits

    def get_extra_state(self):
        return {"hidden": self.hidden, "top_k": self.top_k, "threshold": self.threshold}

    def set_extra_state(self, state):
        self.hidden, self.top_k, self.threshold = int(state["hidden"]), int(state["top_k"]), float(state["threshold"])

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, top_k={self.top_k}, threshold={self.threshold}"
