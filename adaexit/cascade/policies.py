"""Routing policies for cascades: Bolukbasi et al.'s network selection and Guan et al.'s selectors.

Both read :func:`~adaexit.simulation.prob_features` of a node's logits (class-agnostic softmax
statistics) through a small classifier per node:

* :class:`NetworkSelectionPolicy`: at node ``k``, exit or go to any successor (a row may skip
  networks), fitted bottom-up as cost-sensitive classification (:meth:`NetworkSelectionPolicy.fit`);
* :class:`SelectorPolicy`: ``P(exit)`` per node, trained jointly with the networks by REINFORCE
  (:func:`adaexit.cascade.train_reinforce`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptiveModel
from ..evaluation import ExitOutputs, collect
from ..policies import Policy, RoutingPolicy
from ..policies.learned import newton_minimize
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
        # per node: exit where the exit margin >= exit_offsets[k]; otherwise skip where the skip margin
        # > skip_offsets[k] (see choose); set by calibrate's exact refinement, 0 after fit
        self.exit_offsets: list[float] = []
        self.skip_offsets: list[float] = []

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
        """Route per row at node ``k`` from its logits (non-finite rows go to the next node).

        With scores ``s`` of the node's classifier (route 0 = exit, 1 = the next node, 2.. = skips):
        exit where the *exit margin* ``s0 - max(s1, s2, ..)`` is ``>= exit_offsets[k]``; otherwise
        skip to the best skip route where the *skip margin* ``max(s2, ..) - s1`` is ``>
        skip_offsets[k]``, else go to the next node. With zero offsets (a fitted policy) this is the
        argmax of the scores."""
        if k >= len(self.classifiers):
            return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        feats = prob_features(logits, self.top_k)
        scores = self.classifiers[k](feats.to(self._dtype()))
        exit_margin, skip_margin, skip_route = self._margins(scores)
        t, u = self._offsets(k)
        ones = torch.ones_like(skip_route)
        route = torch.where(exit_margin >= t, torch.zeros_like(ones),
                            ones if skip_margin is None else torch.where(skip_margin > u, skip_route, ones))
        finite = torch.isfinite(feats).all(dim=1)
        return torch.where(finite, route, ones)

    @staticmethod
    def _margins(scores: torch.Tensor):
        """Exit margin ``[n]``, skip margin ``[n]`` (``None`` without skip routes) and the best skip
        route ``[n]`` (1 without skip routes) from classifier scores ``[n, routes]``."""
        exit_margin = scores[:, 0] - scores[:, 1:].max(dim=1).values
        if scores.shape[1] <= 2:
            return exit_margin, None, torch.ones(scores.shape[0], dtype=torch.long, device=scores.device)
        best_skip = scores[:, 2:].max(dim=1)
        return exit_margin, best_skip.values - scores[:, 1], best_skip.indices + 2

    def _offsets(self, k: int) -> tuple[float, float]:
        t = self.exit_offsets[k] if k < len(self.exit_offsets) else 0.0
        u = self.skip_offsets[k] if k < len(self.skip_offsets) else 0.0
        return t, u

    def _dtype(self) -> torch.dtype:
        return next(self.classifiers.parameters()).dtype

    def decide_route(self, k, head, h, state):
        logits, _, _ = head.gate(h, "maxprob", math.inf)  # the fused kernel: pool + linear + softmax
        return logits, self.choose(k, logits), state

    @torch.no_grad()
    def routes(self, node_logits) -> torch.Tensor:
        """Long ``[K, N]``: the route every node would give every row, from the dense per-node logits
        (``[K, N, C]`` or a list); the last node's row is all exits. With
        :func:`adaexit.simulation.simulate_routes` this predicts a sparse run exactly."""
        out = []
        for k, logits in enumerate(node_logits):
            if k == len(node_logits) - 1 or k >= len(self.classifiers):
                out.append(torch.zeros(logits.shape[0], dtype=torch.long))
            else:
                device = self.classifiers[k][-1].weight.device
                out.append(self.choose(k, logits.to(device)).cpu())
        return torch.stack(out)

    @torch.no_grad()
    def margins(self, node_logits) -> dict:
        """The decisions of every node on the dense per-node logits, as scores and targets (each
        ``[K - 1, N]``), for an exact search over the offsets:

        * ``exit``: the exit margin (the row exits where ``exit >= exit_offsets[k]``; NaN for rows
          with non-finite logits, which never exit);
        * ``skip``: the skip margin (the row skips where ``skip > skip_offsets[k]``; NaN where the node
          has no skip route or the logits are non-finite);
        * ``next``: the next node; ``skip_to``: the node the best skip route leads to (``next`` where
          there is none); ``target``: where the row goes if it does not exit, under the current offsets.
        """
        out = {key: [] for key in ("exit", "skip", "next", "skip_to", "target")}
        for k in range(len(node_logits) - 1):
            logits = node_logits[k]
            device = self.classifiers[k][-1].weight.device
            feats = prob_features(logits.to(device), self.top_k)
            scores = self.classifiers[k](feats.to(self._dtype()))
            exit_margin, skip_margin, skip_route = self._margins(scores)
            finite = torch.isfinite(feats).all(dim=1)
            nan = torch.full_like(exit_margin, float("nan"))
            table = torch.tensor((k,) + tuple(self.successors[k]), dtype=torch.long, device=scores.device)
            skip = nan if skip_margin is None else torch.where(finite, skip_margin, nan)
            skip_to = table[skip_route]
            target = torch.where(skip > self._offsets(k)[1], skip_to, table[1])  # NaN: the next node
            out["exit"].append(torch.where(finite, exit_margin, nan).float().cpu())
            out["skip"].append(skip.float().cpu())
            out["next"].append(torch.full_like(skip_to, int(table[1])).cpu())
            out["skip_to"].append(torch.where(finite, skip_to, table[1]).cpu())
            out["target"].append(target.cpu())
        return {key: torch.stack(v) for key, v in out.items()}

    def exit_margins(self, node_logits) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margin, target)``, each ``[K - 1, N]``: the exit margins and where each row goes if it
        does not exit (:meth:`margins`)."""
        m = self.margins(node_logits)
        return m["exit"], m["target"]

    def with_offsets(self, exit_offsets=None, skip_offsets=None) -> "NetworkSelectionPolicy":
        """A copy whose node ``k`` exits where its exit margin ``>= exit_offsets[k]`` (``inf``: never
        exits there) and skips where its skip margin ``> skip_offsets[k]`` (``inf``: never skips);
        ``None`` keeps the current offsets."""
        policy = copy.deepcopy(self)
        count = len(self.classifiers)
        current = [self._offsets(k) for k in range(count)]
        if exit_offsets is not None:
            policy.exit_offsets = [float(t) for t in exit_offsets][:count]
        else:
            policy.exit_offsets = [t for t, _ in current]
        if skip_offsets is not None:
            policy.skip_offsets = [float(u) for u in skip_offsets][:count]
        else:
            policy.skip_offsets = [u for _, u in current]
        return policy

    def shift_exits(self, thresholds) -> "NetworkSelectionPolicy":
        """A copy whose node ``k`` exits where :meth:`exit_margins` ``>= thresholds[k]``."""
        return self.with_offsets(exit_offsets=thresholds)

    @torch.no_grad()
    def _values(self, outputs: ExitOutputs, lam: float, loss):
        """Per-node loss [K, N] and normalised step costs [K]."""
        labels = outputs.labels
        if isinstance(loss, torch.Tensor):
            if tuple(loss.shape) != (len(outputs.logits), labels.shape[0]):
                raise ValueError(f"loss must be a [K, N] tensor of per-node losses, got {tuple(loss.shape)}")
            losses = loss.float()
        elif loss == "error":
            losses = torch.stack([(lg.argmax(1) != labels).float() for lg in outputs.logits])
        elif loss == "ce":
            losses = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in outputs.logits])
        else:
            raise ValueError(f"loss must be 'error', 'ce' or a [K, N] tensor, got {loss!r}")
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
            loss: per-node loss, ``"error"`` (0-1), ``"ce"`` (cross-entropy), or a ``[K, N]`` tensor
                (e.g. :func:`adaexit.simulation.budget_losses`, what a calibration budget bounds).
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
        self.exit_offsets, self.skip_offsets = [], []  # a fitted policy is its classifiers' argmax
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

        if self.hidden == 0:  # convex: Newton's method converges to the optimum in a few steps
            with torch.no_grad():
                w, b = _newton_softmax(classifier[0](feats).double(), target, weight.double(), regret.shape[1])
                classifier[-1].weight.copy_(w.to(dtype))
                classifier[-1].bias.copy_(b.to(dtype))
            return
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(max(1, int(epochs))):
                optimizer.zero_grad()
                (weight * F.cross_entropy(classifier(feats), target, reduction="none")).sum().backward()
                optimizer.step()

    def settings(self) -> dict:
        """Saved with the model (tagged with the class, so a freshly built model restores this policy:
        the classifiers' shapes follow from these settings and the graph)."""
        return {"hidden": self.hidden, "top_k": self.top_k, "lam": self.lam,
                "exit_offsets": list(self.exit_offsets), "skip_offsets": list(self.skip_offsets)}

    def load_settings(self, settings: dict) -> None:
        self.hidden, self.top_k, self.lam = int(settings["hidden"]), int(settings["top_k"]), settings["lam"]
        self.exit_offsets = [float(t) for t in settings["exit_offsets"]]
        self.skip_offsets = [float(u) for u in settings["skip_offsets"]]

    def extra_repr(self) -> str:
        extra = ""
        if any(self.exit_offsets) or any(self.skip_offsets):
            extra = f", exit_offsets={self.exit_offsets}, skip_offsets={self.skip_offsets}"
        return f"hidden={self.hidden}, top_k={self.top_k}, lam={self.lam}{extra}"


def _newton_softmax(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, classes: int,
                    l2: float = 1e-4, steps: int = 50):
    """Weighted multinomial logistic regression ``softmax(x @ W.T + b)`` by Newton's method with step
    halving (class 0's row fixed at zero, which removes softmax's shift invariance; L2 ``l2`` on ``W``).
    Returns ``(W [classes, d], b [classes])``."""
    n, d = x.shape
    r = classes - 1
    if r == 0:
        return torch.zeros(classes, d, dtype=x.dtype), torch.zeros(classes, dtype=x.dtype)
    xs = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # [n, d + 1]
    onehot = F.one_hot(target, classes).to(x.dtype)[:, 1:]  # [n, r]
    theta = torch.zeros(r, d + 1, dtype=x.dtype)
    reg = torch.full((r, d + 1), 2 * l2, dtype=x.dtype)
    reg[:, -1] = 1e-9

    def logits_of(t):
        return torch.cat([torch.zeros(n, 1, dtype=x.dtype), xs @ t.T], dim=1)

    def objective(t):
        return float((weight * F.cross_entropy(logits_of(t), target, reduction="none")).sum()) + l2 * float(
            (t[:, :-1] ** 2).sum())

    def newton_step(t):
        p = torch.softmax(logits_of(t), dim=1)[:, 1:]  # [n, r]
        grad = ((weight[:, None] * (p - onehot)).T @ xs + reg * t).reshape(-1)
        # Hessian blocks: sum_i w_i (diag(p_i) - p_i p_i^T)[a, c] x_i x_i^T
        cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, r, r]
        hess = torch.einsum("n,nac,ni,nj->aicj", weight, cov, xs, xs).reshape(r * (d + 1), r * (d + 1))
        hess = hess + torch.diag(reg.reshape(-1))
        return torch.linalg.solve(hess, grad).reshape(r, d + 1)

    theta = newton_minimize(objective, newton_step, theta, steps)
    w = torch.cat([torch.zeros(1, d, dtype=x.dtype), theta[:, :-1]])
    b = torch.cat([torch.zeros(1, dtype=x.dtype), theta[:, -1]])
    return w, b


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

    def settings(self) -> dict:
        return {"hidden": self.hidden, "top_k": self.top_k, "threshold": self.threshold}

    def load_settings(self, settings: dict) -> None:
        self.hidden, self.top_k = int(settings["hidden"]), int(settings["top_k"])
        self.threshold = float(settings["threshold"])

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, top_k={self.top_k}, threshold={self.threshold}"
