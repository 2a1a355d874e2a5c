"""Cascades and network selection: whole networks as the nodes of the conditional-execution graph.

A :class:`Cascade` holds networks of increasing cost that share the input and the label space. Every
network reads the original input rows (``takes="source"``) and outputs logits (its head is a
:class:`~adaexit.heads.LogitsHead`, so the fused :func:`~adaexit.kernels.exit_gate` kernel turns its
output into a confidence). After node ``k`` the policy routes each row to

* route ``0``: exit with node ``k``'s prediction, or
* route ``j >= 1``: ``cascade.successors[k][j - 1]``, i.e. the next node (``j == 1``) or *any later
  network* (Bolukbasi et al.'s network selection, gamma_1: X -> {N1, N2, N3}, so a row can skip a network).

The sparse execution itself is :func:`adaexit.executor.execute`: only the rows routed to a network run it.

**Early-exit networks as nodes.** An :class:`~adaexit.EarlyExitNet` in ``models`` is *flattened*: each of
its stages becomes a node (its first stage reads the input, the later ones carry the previous stage's
output) with that stage's exit head, so its exits are exits of the cascade. Nodes are numbered in model
order, stages in order: ``Cascade([mlp, een3, resnet])`` has nodes ``0 = mlp``, ``1..3 = een3`` exits
0..2, ``4 = resnet``; ``info.exit_index``, ``num_exits``, ``exit_logits``, ``exit_costs`` and the policy all
use this numbering (see :attr:`Cascade.node_names`). A row inside an early-exit net can exit, go on to the
net's next stage (always ``successors[k][0]``), or leave for any later network; it cannot jump into the
middle of a net (those nodes need the previous stage's output). The early-exit net's own policy is not
used: the cascade's policy decides at every node.

**Policies.** Any :class:`~adaexit.policies.Policy` works: its exit mask maps to routes ``0`` (exit) /
``1`` (next node). Multi-way policies subclass :class:`RoutingPolicy` and return a route from
``decide_route``. Provided here:

* :class:`NetworkSelectionPolicy` - Bolukbasi et al.'s learned network selection: one small classifier
  per node over {exit, each successor}, trained from the last decision back to the first as
  cost-sensitive classification with one multiplier ``lam`` trading cost for loss.
* :class:`SelectorPolicy` + :func:`train_reinforce` - Guan et al.'s selection modules, trained jointly
  with the networks by REINFORCE on ``accuracy - lam * cost``.

Plus the oracle (:func:`cascade_oracle`) and frontier helpers (:func:`cascade_frontier`,
:func:`frontier_table`, :func:`plot_frontier`).

**Costs.** ``exit_costs(x, cost)`` follows the calibration protocol: ``stage_costs[k]`` is what running
node ``k``'s module costs per example (a whole network's FLOPs, or one stage of an early-exit net), and
``head_costs[k]`` its head (0 for a ``LogitsHead``: the network's own classifier is in its module).
Learned policies normalise costs by :attr:`CascadeOutputs.reference_cost`, the cost of the last node's
network run alone, so ``lam = 1`` means "spending the biggest network once is worth one error".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import batches as _batches
from .cost import chain_flops, chain_latency, count_flops, eval_mode, module_device, time_call
from .early_exit import EarlyExitNet, ExitInfo, restore_policy_class, trace_flops
from .executor import CARRY, SOURCE, Node, execute, validate_graph
from .heads import LogitsHead
from .policies import NeverExitPolicy, Policy, RoutingPolicy

__all__ = [
    "Cascade",
    "CascadeInfo",
    "CascadeOracle",
    "CascadeOutputs",
    "FrontierPoint",
    "NetworkSelectionPolicy",
    "RoutingPolicy",
    "SelectorPolicy",
    "cascade_frontier",
    "cascade_oracle",
    "collect_outputs",
    "evaluate_policy",
    "frontier_table",
    "plot_frontier",
    "prob_features",
    "train_reinforce",
]


# =============================================================================================
# helpers
# =============================================================================================
def prob_features(logits: torch.Tensor, top_k: int = 3) -> torch.Tensor:
    """Class-agnostic statistics of a node's softmax output, the input of the learned policies.

    Columns: top-1 probability, top-1 minus top-2 probability, ``1 - H(p)/log C``, then the ``top_k``
    largest probabilities in decreasing order (zero-padded when there are fewer classes). Rows with
    non-finite logits give non-finite features (the policies never let such a row exit).
    """
    logits = logits.float()
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError(f"prob_features: need >= 2 classes, got logits of shape {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    top = p.topk(min(max(top_k, 2), classes), dim=1).values
    entropy = -torch.special.xlogy(p, p).sum(dim=1)  # xlogy: 0 * log 0 = 0
    cols = [top[:, 0], top[:, 0] - top[:, 1], 1.0 - entropy / math.log(classes)]
    feats = torch.stack(cols, dim=1)
    if top_k:
        sorted_top = top[:, :top_k]
        if sorted_top.shape[1] < top_k:
            sorted_top = F.pad(sorted_top, (0, top_k - sorted_top.shape[1]))
        feats = torch.cat([feats, sorted_top], dim=1)
    finite = torch.isfinite(logits).all(dim=1, keepdim=True)
    return torch.where(finite, feats, torch.full_like(feats, float("nan")))


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
    def _values(self, outputs: "CascadeOutputs", lam: float, loss: str):
        """Per-node loss [K, N] and normalised step costs [K]."""
        labels = outputs.labels
        if loss == "error":
            losses = torch.stack([(lg.argmax(1) != labels).float() for lg in outputs.logits])
        elif loss == "ce":
            losses = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in outputs.logits])
        else:
            raise ValueError(f"loss must be 'error' or 'ce', got {loss!r}")
        step = torch.tensor(outputs.step_costs, dtype=torch.float32) / outputs.reference_cost
        return losses.cpu(), step

    def fit(
        self,
        cascade: "Cascade",
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
            data: ``(x, y)`` tensors, an iterable of ``(x, y)`` batches, or :class:`CascadeOutputs` from
                :func:`collect_outputs` (reuse them when sweeping ``lam``).
            lam: cost multiplier (>= 0): choice cost = loss + ``lam`` * cost / reference cost.
            loss: per-node loss, ``"error"`` (0-1) or ``"ce"`` (cross-entropy).
            epochs, lr: full-batch Adam steps per node classifier.
        """
        if not lam >= 0 or math.isinf(lam):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        outputs = data if isinstance(data, CascadeOutputs) else collect_outputs(cascade, data, cost=cost)
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


# =============================================================================================
# the cascade
# =============================================================================================
@dataclass
class CascadeInfo(ExitInfo):
    """:class:`~adaexit.ExitInfo` of a cascade forward; ``exit_index``/counts use the node numbering.

    Extra attribute:
        node_names: one name per node.

    ``full_flops`` is what the last node's network alone spends on the batch (the strongest single
    network), so ``ideal_speedup`` is measured against it.
    """

    node_names: list[str] = field(default_factory=list)


class Cascade(nn.Module):
    """Networks of increasing cost, run sparsely, with a policy routing rows between them.

    Args:
        models: networks that read the same input and predict the same classes, cheapest first. An
            :class:`~adaexit.EarlyExitNet` contributes one node per exit (see the module docstring).
        policy: a :class:`~adaexit.policies.Policy` (exit mask: 0 = exit, 1 = next node) or a
            :class:`RoutingPolicy` (any later node). Default: :class:`~adaexit.NeverExitPolicy` (every row
            runs every node and returns the last one's prediction).
        example_input: optional batch used to check at construction that all nodes agree on the number
            of classes; otherwise the check runs on the first forward.

    ``train()`` forward returns every node's logits (a list, dense). ``eval()`` forward runs sparse
    execution and returns ``[N, classes]`` in the original row order; ``forward(x, return_info=True)``
    also returns a :class:`CascadeInfo`.
    """

    def __init__(self, models, policy: Policy | None = None, *, example_input: torch.Tensor | None = None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("Cascade needs at least one model (models is empty)")
        nodes: list[Node] = []
        node_model: list[int] = []
        for m, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise ValueError(f"models[{m}] is a {type(model).__name__}, not an nn.Module")
            if isinstance(model, Cascade):
                raise ValueError(f"models[{m}] is a Cascade; pass its models instead (cascades do not nest)")
            if isinstance(model, EarlyExitNet):
                for s, (stage, head) in enumerate(zip(model.stages, model.heads)):
                    name = f"model {m} ({type(model).__name__}) exit {s}"
                    nodes.append(Node(name, stage, head, (), SOURCE if s == 0 else CARRY))
                    node_model.append(m)
            else:
                nodes.append(Node(f"model {m} ({type(model).__name__})", model, LogitsHead(0), (), SOURCE))
                node_model.append(m)
        # Successors: the next node first (so an exit mask maps to routes 0/1), then every later
        # network entry (a row may skip; it may not enter an early-exit net mid-way).
        for k, node in enumerate(nodes):
            later = [j for j in range(k + 2, len(nodes)) if nodes[j].takes == SOURCE]
            node.successors = tuple(([k + 1] if k + 1 < len(nodes) else []) + later)
        validate_graph(nodes)
        self.models = nn.ModuleList(models)
        self._nodes = nodes
        self.node_model = node_model
        self.num_classes: int | None = None
        self._cost_cache: dict = {}
        self.set_policy(policy if policy is not None else NeverExitPolicy())
        self.register_load_state_dict_pre_hook(restore_policy_class)
        if example_input is not None:
            self.check_classes(example_input)

    # -- graph -------------------------------------------------------------------------------
    def graph(self) -> list[Node]:
        """The cascade as executor nodes (one per network, or per exit of an early-exit member)."""
        return self._nodes

    @property
    def num_exits(self) -> int:
        """Number of nodes (every node is an exit)."""
        return len(self._nodes)

    @property
    def successors(self) -> list[tuple[int, ...]]:
        """``successors[k]``: where a row may go after node ``k`` (route ``j`` -> ``successors[k][j-1]``)."""
        return [node.successors for node in self._nodes]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self._nodes]

    def set_policy(self, policy: Policy) -> "Cascade":
        """Replace the policy (checked against the node count; routing policies get the graph)."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an adaexit Policy, got {type(policy).__name__}")
        if isinstance(policy, RoutingPolicy):
            policy.bind_graph(self.successors)
        else:
            policy.bind(self.num_exits)
        device = module_device(self)
        if device is not None:  # a learned policy's modules must sit where the logits are
            policy.to(device)
        self.policy = policy
        return self

    # -- class-count check --------------------------------------------------------------------
    def _check_logits(self, outputs: list[torch.Tensor]) -> None:
        first = None
        for k, out in enumerate(outputs):
            name = self._nodes[k].name
            if out.dim() != 2 or out.shape[1] < 2:
                raise ValueError(
                    f"node {k} ({name}) must output logits [N, classes >= 2], got shape {tuple(out.shape)}"
                )
            if first is None:
                first = (k, out.shape[1])
            elif out.shape[1] != first[1]:
                raise ValueError(
                    f"models disagree on the number of classes: node {first[0]} ({self._nodes[first[0]].name}) "
                    f"predicts {first[1]}, node {k} ({name}) predicts {out.shape[1]}"
                )
        if first is not None and self.num_classes is None:
            self.num_classes = first[1]
            for node in self._nodes:
                if isinstance(node.head, LogitsHead):
                    node.head.num_classes = first[1]

    @torch.no_grad()
    def check_classes(self, x: torch.Tensor) -> int:
        """Run every node on one row of ``x`` (eval mode) and check they agree on the class count."""
        if x.shape[0] == 0:
            raise ValueError("check_classes needs at least one row")
        with eval_mode(self):
            self._check_logits(self._dense(x[:1]))
        return self.num_classes

    @torch.no_grad()
    def _probe_empty(self, x: torch.Tensor) -> None:
        """Learn the class count from an empty batch if the networks accept one (most layers do)."""
        try:
            outputs = self._dense(x)
        except (RuntimeError, ValueError):
            return  # unknown until a non-empty batch arrives; the output is then [0, 0]
        self._check_logits(outputs)

    # -- dense paths --------------------------------------------------------------------------
    def _dense(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, h = [], x
        for k, node in enumerate(self._nodes):
            h = node.module(x if node.takes == SOURCE else h)
            try:
                outputs.append(node.head(h))
            except RuntimeError as err:
                raise ValueError(f"the head of node {k} ({node.name}) does not fit its output: {err}") from err
        return outputs

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's logits for every row (dense, in the current mode; what ``train()`` returns)."""
        outputs = self._dense(x)
        self._check_logits(outputs)
        return outputs

    # -- costs --------------------------------------------------------------------------------
    def _model_nodes(self) -> list[tuple[int, nn.Module, list[int]]]:
        groups: dict[int, list[int]] = {}
        for k, m in enumerate(self.node_model):
            groups.setdefault(m, []).append(k)
        return [(m, self.models[m], ks) for m, ks in groups.items()]

    @torch.no_grad()
    def exit_costs(self, x: torch.Tensor, cost: str = "flops") -> tuple[list[float], list[float]]:
        """Per-example ``(stage_costs, head_costs)`` of every node: ``"flops"`` (counted on one row,
        cached per input shape) or ``"latency"`` (median ms at ``x``'s batch size, divided by it).

        A whole network's cost is its stage cost; its ``LogitsHead`` costs 0. Reaching node ``k`` through
        nodes ``0..k`` in order costs ``sum(stage_costs[:k+1]) + sum(head_costs[:k+1])``.
        """
        if cost not in ("flops", "latency"):
            raise ValueError(f"cost must be 'flops' or 'latency', got {cost!r}")
        if x.shape[0] == 0:
            raise ValueError("exit_costs needs at least one row")
        key = (tuple(x.shape[1:]), x.dtype)
        if cost == "flops" and key in self._cost_cache:
            return self._cost_cache[key]
        stage_costs = [0.0] * self.num_exits
        head_costs = [0.0] * self.num_exits
        with eval_mode(self):
            for _, model, ks in self._model_nodes():
                if isinstance(model, EarlyExitNet):
                    if cost == "flops":
                        s, h = chain_flops(model.stages, model.heads, x)
                    else:
                        s, h = chain_latency(model.stages, model.heads, x)
                    for k, sc, hc in zip(ks, s, h):
                        stage_costs[k], head_costs[k] = float(sc), float(hc)
                elif cost == "flops":
                    stage_costs[ks[0]] = float(count_flops(model, x[:1]))
                else:
                    stage_costs[ks[0]] = time_call(model, x) / x.shape[0]
        result = (stage_costs, head_costs)
        if cost == "flops":
            self._cost_cache[key] = result
        return result

    def reference_cost(self, x: torch.Tensor, cost: str = "flops") -> float:
        """Per-example cost of the strongest single network (the last node) alone: what speedups of a
        cascade are measured against (optional calibration-protocol method)."""
        return self.node_costs(x, cost)[-1]

    def node_costs(self, x: torch.Tensor, cost: str = "flops") -> list[float]:
        """Per-example cost of using node ``k`` *alone*: its network from the input up to ``k`` plus
        ``k``'s head (earlier heads skipped). For a whole network, its cost; used by the oracle."""
        stage_costs, head_costs = self.exit_costs(x, cost)
        return _standalone_costs(self.node_model, stage_costs, head_costs)

    # -- sparse path --------------------------------------------------------------------------
    def _route(self, k: int, node: Node, h: torch.Tensor, state: dict):
        policy = self.policy
        terminal = not node.successors
        if not terminal and not policy.needs_head(k):
            return None, None, state
        logits, route, state = policy.decide_route(k, node.head, h, state)
        if logits is None and terminal:  # the last node always needs a prediction
            logits = node.head(h)
        return logits, route, state

    def forward(self, x: torch.Tensor, return_info: bool = False):
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return self.exit_logits(x)
        n = x.shape[0]
        if self.num_classes is None:
            if n > 0:
                self.check_classes(x)  # first forward: all nodes must agree before any row exits
            else:
                self._probe_empty(x)
        state = self.policy.init_state(n, x.device)
        logits, trace = execute(self._nodes, x, self._route, state)
        if sum(trace.exit_counts) != n:
            raise ValueError(
                f"the policy lost rows ({n - sum(trace.exit_counts)} of {n}): routes must lie in "
                "[0, 1 + len(successors[k])) at every node k"
            )
        if not return_info:
            return logits
        if n:
            stage_flops, head_flops = self.exit_costs(x, "flops")
            full = _standalone_costs(self.node_model, stage_flops, head_flops)[-1]
        else:
            stage_flops = head_flops = [0.0] * self.num_exits
            full = 0.0
        info = CascadeInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            flops=trace_flops(trace, stage_flops, head_flops),
            full_flops=float(n * full),
            rows_decided=trace.rows_decided,
            node_names=self.node_names,
        )
        return logits, info


def _standalone_costs(node_model: list[int], stage_costs, head_costs) -> list[float]:
    out, running, prev_model = [], 0.0, None
    for k, m in enumerate(node_model):
        running = stage_costs[k] + (running if m == prev_model else 0.0)
        out.append(float(running + head_costs[k]))
        prev_model = m
    return out


# =============================================================================================
# dense outputs, oracle, evaluation and frontiers
# =============================================================================================
@dataclass
class CascadeOutputs:
    """Every node's logits on a data set, with the labels and the costs (for fitting and oracles).

    Attributes:
        logits: per node, ``[N, classes]`` (fp32).
        labels: ``[N]``.
        step_costs: per node, ``stage + head`` cost per example (what moving to that node costs).
        node_costs: per node, the cost of using it alone (see :meth:`Cascade.node_costs`).
    """

    logits: list[torch.Tensor]
    labels: torch.Tensor
    step_costs: list[float]
    node_costs: list[float]

    @property
    def reference_cost(self) -> float:
        """The last node's network alone: the unit of normalised cost (never 0)."""
        return self.node_costs[-1] if self.node_costs[-1] > 0 else 1.0

    def node_accuracy(self) -> list[float]:
        return [float((lg.argmax(1) == self.labels).float().mean()) if len(self.labels) else float("nan")
                for lg in self.logits]


@torch.no_grad()
def collect_outputs(cascade: Cascade, data, cost: str = "flops", batch_size: int = 1024) -> CascadeOutputs:
    """Run every node densely (eval mode) on ``data`` and gather logits, labels and per-node costs."""
    chunks: list[list[torch.Tensor]] = [[] for _ in range(cascade.num_exits)]
    labels, first = [], None
    with eval_mode(cascade):
        for x, y in _batches(data, batch_size, device=module_device(cascade)):
            if x.shape[0] == 0:
                continue
            first = x if first is None else first
            for k, lg in enumerate(cascade.exit_logits(x)):
                chunks[k].append(lg.float())
            labels.append(y)
    if first is None:
        raise ValueError("data is empty: no rows to collect outputs from")
    stage_costs, head_costs = cascade.exit_costs(first, cost)
    return CascadeOutputs(
        logits=[torch.cat(c) for c in chunks],
        labels=torch.cat(labels).to(chunks[0][0].device),
        step_costs=[float(s + h) for s, h in zip(stage_costs, head_costs)],
        node_costs=_standalone_costs(cascade.node_model, stage_costs, head_costs),
    )


@dataclass
class CascadeOracle:
    """The oracle's choice per example, its accuracy and its mean cost per example."""

    accuracy: float
    mean_cost: float
    choice: torch.Tensor


def cascade_oracle(node_logits: Sequence[torch.Tensor], labels: torch.Tensor, node_costs) -> CascadeOracle:
    """Per example, the cheapest single node that classifies it correctly (skipping allowed: the cost is
    that node's own cost); if no node is right, the most expensive node (and the example is wrong).

    Args:
        node_logits: per node ``[N, classes]``.
        labels: ``[N]``.
        node_costs: per node, the cost of using that node alone (e.g. :meth:`Cascade.node_costs`).
    """
    if len(node_logits) == 0:
        raise ValueError("node_logits is empty")
    costs = torch.as_tensor(node_costs, dtype=torch.float64).flatten()
    if costs.numel() != len(node_logits):
        raise ValueError(f"node_costs has {costs.numel()} entries for {len(node_logits)} nodes")
    labels = labels.cpu()
    correct = torch.stack([lg.detach().cpu().argmax(1) == labels for lg in node_logits], dim=1)  # [N, K]
    n = correct.shape[0]
    if n == 0:
        return CascadeOracle(float("nan"), float("nan"), torch.zeros(0, dtype=torch.long))
    priced = torch.where(correct, costs[None, :], torch.full_like(costs[None, :], math.inf))
    cheapest = priced.argmin(dim=1)
    any_right = correct.any(dim=1)
    choice = torch.where(any_right, cheapest, torch.full_like(cheapest, int(costs.argmax())))
    return CascadeOracle(
        accuracy=float(any_right.double().mean()),
        mean_cost=float(costs[choice].mean()),
        choice=choice,
    )


@dataclass
class FrontierPoint:
    """One operating point: ``cost`` is the mean cost per example (FLOPs or ms)."""

    method: str
    setting: str
    accuracy: float
    cost: float


@torch.no_grad()
def evaluate_policy(cascade: Cascade, data, policy: Policy | None = None, cost: str = "flops",
                    batch_size: int = 1024) -> tuple[float, float, list[int]]:
    """Sparse eval-mode run on ``data``: ``(accuracy, mean cost per example, exit counts per node)``.

    The cost is the protocol's: each node's stage cost for every row that ran it plus its head cost for
    every row decided there. ``policy`` (optional) is used for this call only; the cascade's own policy
    and mode are restored afterwards.
    """
    saved = cascade.policy
    if policy is not None:
        cascade.set_policy(policy)
    right = total = 0
    rows_run = [0] * cascade.num_exits
    rows_decided = [0] * cascade.num_exits
    exits = [0] * cascade.num_exits
    first = None
    try:
        with eval_mode(cascade):
            for x, y in _batches(data, batch_size, device=module_device(cascade)):
                if x.shape[0] == 0:
                    continue
                first = x if first is None else first
                logits, info = cascade(x, return_info=True)
                right += int((logits.argmax(1) == y.to(logits.device)).sum())
                total += x.shape[0]
                for k in range(cascade.num_exits):
                    rows_run[k] += info.rows_run[k]
                    rows_decided[k] += info.rows_decided[k]
                    exits[k] += info.exit_counts[k]
    finally:
        cascade.policy = saved
    if first is None:
        raise ValueError("data is empty")
    stage_costs, head_costs = cascade.exit_costs(first, cost)
    spent = sum(r * c for r, c in zip(rows_run, stage_costs)) + sum(r * c for r, c in zip(rows_decided, head_costs))
    return right / total, spent / total, exits


def cascade_frontier(cascade: Cascade, data, policies: dict, cost: str = "flops",
                     outputs: CascadeOutputs | None = None) -> list[FrontierPoint]:
    """Each policy's operating points beside every single network and the oracle.

    Args:
        policies: ``{method name: policy}`` or ``{method name: [(setting label, policy), ...]}``
            (e.g. one entry per ``lam`` of a sweep).
        outputs: precomputed :func:`collect_outputs` of ``data`` (computed if omitted).
    """
    outputs = outputs or collect_outputs(cascade, data, cost=cost)
    points = []
    accuracy = outputs.node_accuracy()
    for m, _, ks in cascade._model_nodes():  # a single network = its last node, run alone
        k = ks[-1]
        points.append(FrontierPoint("single network", cascade.node_names[k], accuracy[k], outputs.node_costs[k]))
    oracle = cascade_oracle(outputs.logits, outputs.labels, outputs.node_costs)
    points.append(FrontierPoint("oracle", "cheapest correct node", oracle.accuracy, oracle.mean_cost))
    for method, entry in policies.items():
        entries = entry if isinstance(entry, (list, tuple)) else [("", entry)]
        for setting, policy in entries:
            acc, mean_cost, _ = evaluate_policy(cascade, data, policy, cost=cost)
            points.append(FrontierPoint(method, str(setting), acc, mean_cost))
    return points


def frontier_table(points: Sequence[FrontierPoint], reference_cost: float | None = None) -> str:
    """A Markdown table of operating points; ``relative cost`` is ``cost / reference_cost`` (default:
    the most expensive single network)."""
    if reference_cost is None:
        singles = [p.cost for p in points if p.method == "single network"]
        reference_cost = max(singles) if singles else max((p.cost for p in points), default=1.0)
    reference_cost = reference_cost or 1.0
    lines = ["| method | setting | accuracy (%) | cost / example | relative cost |", "|---|---|---:|---:|---:|"]
    for p in points:
        lines.append(
            f"| {p.method} | {p.setting} | {100 * p.accuracy:.2f} | {p.cost:.4g} | {p.cost / reference_cost:.3f} |"
        )
    return "\n".join(lines)


def plot_frontier(points: Sequence[FrontierPoint], path, title: str = "accuracy vs cost",
                  cost_label: str = "cost per example") -> str:
    """Plot accuracy against cost, one series per method, to a PNG at ``path`` (matplotlib's Agg canvas,
    so no display and no global backend switch). Returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("plot_frontier needs matplotlib (pip install adaexit[bench])") from err
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods: dict[str, list[FrontierPoint]] = {}
    for p in points:
        methods.setdefault(p.method, []).append(p)
    markers = {"single network": "s", "oracle": "*"}
    for method, pts in methods.items():
        pts = sorted(pts, key=lambda p: p.cost)
        style = "none" if method in markers else "-"
        ax.plot([p.cost for p in pts], [100 * p.accuracy for p in pts], marker=markers.get(method, "o"),
                linestyle=style, label=method)
        if method == "single network":
            for p in pts:
                ax.annotate(p.setting, (p.cost, 100 * p.accuracy), fontsize=7, xytext=(3, -8),
                            textcoords="offset points")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=120)
    return str(path)


# =============================================================================================
# Guan et al.: joint REINFORCE training of the networks and the selectors
# =============================================================================================
def train_reinforce(
    cascade: Cascade,
    selectors: SelectorPolicy,
    data,
    cost_weight: float,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    selector_lr: float = 1e-2,
    batch_size: int = 128,
    baseline: str = "moving_average",
    baseline_momentum: float = 0.9,
    network_loss: str = "reach",
    warmup_epochs: int = 0,
    cost: str = "flops",
    seed: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train the cascade's networks and the selection modules jointly (Guan et al.) and set the policy.

    Per batch, every node's logits are computed densely; each selector gives P(exit) at its node; exit
    decisions are *sampled*, so a row exits at the first node whose sample says exit (the last node
    always). The reward is ``correct - cost_weight * cost``, where ``cost`` is the chain cost up to the
    exit node divided by the reference cost (the last node's network alone). The selectors follow
    REINFORCE: ``-(reward - b) * log P(trajectory)``, with ``b`` a moving average of the reward
    (``baseline="moving_average"``) or ``0`` (``"none"``).

    The networks get the supervised loss:

    * ``network_loss="reach"`` (default): node ``k``'s cross-entropy weighted by the (detached)
      probability that a row reaches it, ``prod_{j<k} (1 - P_j(exit))`` - each network specialises
      on the rows the selectors send it; node 0 always sees every row;
    * ``"plain"``: every node's cross-entropy, unweighted;
    * ``"none"``: the networks are frozen (only the selectors learn).

    The selectors read detached probabilities, so the REINFORCE signal does not shape the networks.
    ``warmup_epochs`` first train the networks alone with plain cross-entropy (useful from scratch:
    untrained networks are all at chance, which would teach the selectors to exit at once).

    Args:
        cascade: the cascade (its models are trained in place; left in eval mode at the end).
        selectors: the :class:`SelectorPolicy` to train; set as the cascade's policy at the end.
        data: ``(x, y)`` tensors (shuffled into ``batch_size`` batches) or an iterable of batches.
        cost_weight: lambda >= 0; sweeping it traces a frontier.
        epochs: joint epochs after the warm-up.
        lr, selector_lr: Adam learning rates of the networks and of the selectors.
        seed: seeds the shuffling and the sampled decisions (deterministic runs).

    Returns:
        one dict per epoch (warm-up included): ``phase`` (``"warmup"``/``"joint"``), ``loss`` (mean
        summed cross-entropy of the nodes), and for joint epochs ``reward``, ``accuracy`` (of the
        sampled exits), ``cost`` (mean normalised cost of the sampled exits) and ``baseline``.
    """
    from tqdm.auto import tqdm

    if not cost_weight >= 0 or math.isinf(cost_weight):
        raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight}")
    if baseline not in ("moving_average", "none"):
        raise ValueError(f"baseline must be 'moving_average' or 'none', got {baseline!r}")
    if network_loss not in ("reach", "plain", "none"):
        raise ValueError(f"network_loss must be 'reach', 'plain' or 'none', got {network_loss!r}")
    if not isinstance(selectors, SelectorPolicy):
        raise ValueError(f"selectors must be a SelectorPolicy, got {type(selectors).__name__}")
    cascade.set_policy(selectors)
    K = cascade.num_exits
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    device = module_device(cascade)
    first_x = next(iter(_batches(data, batch_size, device=device)))[0]
    stage_costs, head_costs = cascade.exit_costs(first_x, cost)
    reference = _standalone_costs(cascade.node_model, stage_costs, head_costs)[-1] or 1.0
    chain_cost = torch.tensor(
        [sum(stage_costs[: k + 1]) + sum(head_costs[: k + 1]) for k in range(K)], dtype=torch.float32
    ) / reference

    selector_ids = {id(p) for p in selectors.parameters()}
    net_params = [p for p in cascade.parameters() if id(p) not in selector_ids and p.requires_grad]
    net_opt = torch.optim.Adam(net_params, lr=lr) if net_params and network_loss != "none" else None
    sel_opt = torch.optim.Adam(selectors.parameters(), lr=selector_lr) if K > 1 else None
    running = None
    history = []

    phases = ["warmup"] * int(warmup_epochs) + ["joint"] * int(epochs)
    for phase in tqdm(phases, desc="train_reinforce", disable=not progress):
        cascade.train()
        sums = {"loss": 0.0, "reward": 0.0, "accuracy": 0.0, "cost": 0.0, "rows": 0}
        for x, y in _batches(data, batch_size, shuffle=True, generator=generator, device=device):
            if x.shape[0] == 0:
                continue
            logits = cascade.exit_logits(x)
            ce = torch.stack([F.cross_entropy(lg.float(), y, reduction="none") for lg in logits])  # [K, B]
            if phase == "warmup":
                if net_opt is not None:
                    net_opt.zero_grad()
                    ce.mean(dim=1).sum().backward()
                    net_opt.step()
                sums["loss"] += float(ce.detach().sum())
                sums["rows"] += x.shape[0]
                continue
            dev = logits[0].device  # where the cascade really runs
            B = x.shape[0]
            if K > 1:
                p_exit = torch.stack([selectors.exit_probability(k, logits[k]) for k in range(K - 1)])  # [K-1, B]
                p_exit = p_exit.clamp(1e-6, 1 - 1e-6)
                u = torch.rand(p_exit.shape, generator=generator).to(dev)
                sample = u < p_exit.detach()
                sample = torch.cat([sample, torch.ones(1, B, dtype=torch.bool, device=dev)])
            else:
                sample = torch.ones(1, B, dtype=torch.bool, device=dev)
            exit_at = sample.long().argmax(dim=0)  # the first node whose sample says exit
            preds = torch.stack([lg.argmax(1) for lg in logits])  # [K, B]
            correct = (preds.gather(0, exit_at[None]).squeeze(0) == y).float()
            spent = chain_cost.to(dev)[exit_at]
            reward = correct - cost_weight * spent
            mean_reward = float(reward.mean())
            if baseline == "moving_average":
                running = mean_reward if running is None else (
                    baseline_momentum * running + (1 - baseline_momentum) * mean_reward
                )
                b = running
            else:
                b = 0.0

            loss = torch.zeros((), device=dev)
            if K > 1:
                nodes = torch.arange(K - 1, device=dev)[:, None]
                log_continue = torch.log1p(-p_exit)
                log_exit = torch.log(p_exit)
                # log P(trajectory): continue at every node before the exit node, exit at it.
                logp = (log_continue * (nodes < exit_at[None])).sum(0) + (
                    log_exit * (nodes == exit_at[None])).sum(0)
                loss = loss - ((reward - b).detach() * logp).mean()
                reach = torch.cat([torch.ones(1, B, device=dev), torch.cumprod(1 - p_exit.detach(), 0)])
            else:
                reach = torch.ones(1, B, device=dev)
            if network_loss == "reach":
                loss = loss + (reach * ce).sum(0).mean()
            elif network_loss == "plain":
                loss = loss + ce.sum(0).mean()
            if net_opt is not None:
                net_opt.zero_grad()
            if sel_opt is not None:
                sel_opt.zero_grad()
            if loss.requires_grad:
                loss.backward()
            if net_opt is not None:
                net_opt.step()
            if sel_opt is not None:
                sel_opt.step()
            sums["loss"] += float(ce.detach().sum())
            sums["reward"] += float(reward.sum())
            sums["accuracy"] += float(correct.sum())
            sums["cost"] += float(spent.sum())
            sums["rows"] += B
        rows = sums["rows"] or float("nan")
        joint = phase == "joint"
        history.append({
            "phase": phase,
            "loss": sums["loss"] / rows,
            "reward": sums["reward"] / rows if joint else None,
            "accuracy": sums["accuracy"] / rows if joint else None,
            "cost": sums["cost"] / rows if joint else None,
            "baseline": running,
        })
    cascade.eval()
    cascade.set_policy(selectors)
    return history
