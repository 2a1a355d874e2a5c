"""Dynamic routing with controller modules (Liu & Deng, *Dynamic Deep Neural Networks*, D2NN).

A D2NN is a graph of ordinary modules in which some nodes carry a **controller**: a small sub-network
that reads the node's output and chooses, per example, what runs next (exit with this node's
prediction, or one of the node's successors). On the executor (:mod:`adaexit.executor`) a controller is
one more kind of decision: its choice becomes the row's route, the k-way
:func:`~adaexit.kernels.partition` kernel splits the batch by route, and each branch runs only on the
rows routed to it; branches that meet again are merged by the executor.

Topologies from the paper, with builders for small MLP versions:

* **high-low capacity** (:func:`high_low_d2nn`): a controller picks a cheap or an expensive branch;
  both feed the same classifier;
* **cascade** (:func:`cascade_d2nn`): classifiers of increasing capacity; after each, a controller
  returns its prediction or continues;
* **chain** (:func:`chain_d2nn`): before every block a controller decides to run it or skip it;
* **hierarchy** (:func:`hierarchy_d2nn`): a tree of controllers, each sending a row to one subtree.

Training (:class:`D2NNTrainer`) is end to end: backprop for the modules (cross-entropy of the
prediction each row returned, through the branches it took) and REINFORCE with a running-mean
baseline for the controllers, on the reward ``correct - lam * cost`` where ``cost`` is the row's FLOPs
divided by those of the most expensive path. Training rollouts sample the controllers' choices and run
on the executor as well, so modules see only their rows (BatchNorm statistics included). At inference a
controller takes its argmax: deterministic.

Autograd: training differentiates through the executor's row gathers and scatters, which the torch
reference kernels support. The Triton kernels (CUDA) have no backward yet, so a training rollout on a
device that dispatches to Triton raises ``ValueError`` (set ``ADAEXIT_BACKEND=torch`` to train there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..base import AdaptiveModel, ExitInfo
from ..cost import count_flops
from ..executor import SOURCE, Node, execute, validate_graph
from ..heads import mean_pool


class Controller(nn.Module):
    """A controller: ``mean_pool(h) -> [Linear -> ReLU] -> Linear(num_actions)``; returns action logits.

    Args:
        in_features: channels (or width) of the node output it reads.
        num_actions: choices it makes (see :meth:`D2NN.actions`).
        hidden: width of an optional hidden layer (``None``: a linear controller).
    """

    def __init__(self, in_features: int, num_actions: int, hidden: int | None = None):
        super().__init__()
        if int(num_actions) < 2:
            raise ValueError(f"a controller needs num_actions >= 2, got {num_actions}")
        self.num_actions = int(num_actions)
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions))
        else:
            self.net = nn.Linear(in_features, num_actions)

    @property
    def out(self) -> nn.Linear:
        """The last linear layer (its bias sets the initial preference between actions)."""
        return self.net[-1] if isinstance(self.net, nn.Sequential) else self.net

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(mean_pool(h))


@dataclass
class Rollout:
    """One pass of a D2NN on a batch (training or inference), every tensor in the original row order.

    Attributes:
        logits: ``[N, classes]`` the prediction each row returned.
        log_prob: ``[N]`` sum of the log-probabilities of the controller choices the row went through
            (differentiable w.r.t. the controllers when sampled in training; zeros at inference).
        cost: ``[N]`` FLOPs spent on the row divided by the most expensive path's FLOPs.
        exit_index: ``[N]`` the node whose prediction each row returned.
        exit_counts, rows_run: per node, rows that exited there / ran its module.
        rows_decided: per node, rows its controller decided on.
        flops: FLOPs spent on the batch; ``max_flops``: the most expensive path's FLOPs times ``N``.
        entropy: ``[N]`` summed entropy of the controller distributions the row met (sampled rollouts).
    """

    logits: torch.Tensor
    log_prob: torch.Tensor
    cost: torch.Tensor
    exit_index: torch.Tensor
    exit_counts: list[int]
    rows_run: list[int]
    flops: float
    max_flops: float
    entropy: torch.Tensor | None = None
    rows_decided: list[int] | None = None

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean()) if self.cost.numel() else 0.0


class D2NN(AdaptiveModel):
    """A dynamic network: executor nodes plus controllers that route each example.

    Rules per node (checked at construction, ``ValueError`` naming the node):

    * a node with no successors is a leaf and needs a head: every row reaching it exits there;
    * a node with a controller chooses among its **actions**: exit (route 0, only if it has a head),
      then each successor in order; it needs at least two actions;
    * a node without a controller must have exactly one successor and no head (rows simply go on).

    Args:
        nodes: :class:`~adaexit.executor.Node` list (routes only go forward; ``"carry"`` nodes read the
            output of the node that routed the row to them; branches merging into one node must produce
            the same shape).
        controllers: ``{node index: controller module}`` (or a list with ``None`` where there is none);
            a controller maps the node's output ``[n, ...]`` to ``[n, num_actions]`` logits.
    """

    def __init__(self, nodes: Sequence[Node], controllers: Mapping[int, nn.Module] | Sequence | None = None):
        super().__init__()
        nodes = [Node(n.name, n.module, n.head, tuple(n.successors), n.takes) for n in nodes]
        validate_graph(nodes)
        if controllers is None:
            controllers = {}
        elif not isinstance(controllers, Mapping):
            controllers = {i: c for i, c in enumerate(controllers) if c is not None}
        for i in controllers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(nodes):
                raise ValueError(f"controllers: {i!r} is not a node index in [0, {len(nodes)})")
        self.nodes = nodes
        self.blocks = nn.ModuleList([n.module for n in nodes])
        self.heads = nn.ModuleDict({str(i): n.head for i, n in enumerate(nodes) if n.head is not None})
        self.controllers = nn.ModuleDict({str(i): c for i, c in controllers.items()})
        self._routes: list[torch.Tensor | None] = []
        reached = {0}
        for i, node in enumerate(nodes):
            if i not in reached:
                raise ValueError(f"node {i} ({node.name}) is unreachable: no earlier node routes to it")
            reached.update(node.successors)
            ctrl = controllers.get(i)
            routes = ([0] if node.head is not None else []) + list(range(1, 1 + len(node.successors)))
            if not node.successors:
                if ctrl is not None:
                    raise ValueError(
                        f"node {i} ({node.name}) is a leaf: every row exits there, it cannot have a controller"
                    )
                self._routes.append(None)
            elif ctrl is not None:
                if len(routes) < 2:
                    raise ValueError(f"node {i} ({node.name}) has a controller but only one way to go")
                n_act = getattr(ctrl, "num_actions", None)
                if n_act is not None and n_act != len(routes):
                    raise ValueError(
                        f"node {i} ({node.name}): its controller has {n_act} actions, the node has "
                        f"{len(routes)} ({self._describe(node, routes)})"
                    )
                self._routes.append(torch.tensor(routes, dtype=torch.long))
            else:
                if len(node.successors) != 1 or node.head is not None:
                    raise ValueError(
                        f"node {i} ({node.name}) has {len(node.successors)} successors"
                        f"{' and a head' if node.head is not None else ''} but no controller to choose"
                    )
                self._routes.append(None)
        self._flops_cache: dict = {}

    @staticmethod
    def _describe(node: Node, routes) -> str:
        return ", ".join("exit" if r == 0 else f"node {node.successors[r - 1]}" for r in routes)

    def routes(self, i: int) -> list[int]:
        """The executor route of each action of node ``i``'s controller (0 = exit, j = ``successors[j-1]``);
        empty when the node makes no choice."""
        routes = self._routes[i]
        return [] if routes is None else routes.tolist()

    def actions(self, i: int) -> list[str]:
        """What each action of node ``i``'s controller does: ``"exit"`` or ``"node j"``."""
        routes = self._routes[i]
        return [] if routes is None else self._describe(self.nodes[i], routes.tolist()).split(", ")

    # -- costs ------------------------------------------------------------------------------------
    def node_flops(self, x: torch.Tensor) -> list[float]:
        """Per-example FLOPs of each node for inputs shaped like ``x``: module + controller + head
        (the controller and head run on every row that reaches the node). Cached per input shape."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key in self._flops_cache:
            return self._flops_cache[key]
        was_training = self.training
        self.eval()  # one example through BatchNorm in train mode would fail
        try:
            with torch.no_grad():
                x1 = x[:1]
                if x1.shape[0] == 0:
                    raise ValueError("node_flops needs at least one example to trace the shapes")
                feats: dict[int, torch.Tensor] = {}
                parent: dict[int, int] = {}
                flops = []
                for i, node in enumerate(self.nodes):
                    inp = x1 if node.takes == SOURCE else feats[parent[i]]
                    ctrl = self.controllers[str(i)] if str(i) in self.controllers else None
                    try:
                        total = float(count_flops(node.module, inp))
                        h = node.module(inp)
                        if ctrl is not None:
                            total += float(count_flops(ctrl, h))
                        if node.head is not None:
                            total += float(count_flops(node.head, h))
                    except RuntimeError as err:
                        raise ValueError(
                            f"node {i} ({node.name}), its controller or its head failed on the node's input of "
                            f"per-row shape {tuple(inp.shape[1:])}: {err}"
                        ) from err
                    flops.append(total)
                    feats[i] = h
                    for s in node.successors:
                        parent.setdefault(s, i)
        finally:
            self.train(was_training)
        self._flops_cache[key] = flops
        return flops

    def max_path_flops(self, x: torch.Tensor) -> float:
        """Per-example FLOPs of the most expensive path through the graph (the cost normaliser)."""
        flops = self.node_flops(x)
        best = [0.0] * len(self.nodes)
        for i in reversed(range(len(self.nodes))):
            after = [best[s] for s in self.nodes[i].successors]
            best[i] = flops[i] + (max(after) if after else 0.0)
        return best[0]

    # -- execution --------------------------------------------------------------------------------
    def rollout(self, x: torch.Tensor, sample: bool | None = None, uniform: bool = False) -> Rollout:
        """Run the graph sparsely on ``x`` and return what every row did (see :class:`Rollout`).

        Args:
            sample: draw each controller choice from its softmax (training) instead of the argmax;
                default: ``self.training``.
            uniform: draw choices uniformly at random (exploration / module warm-up; ``log_prob`` is
                still the controllers' log-probability of the drawn choices).
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor with a batch dimension")
        sample = self.training if sample is None else bool(sample)
        n, device = x.shape[0], x.device
        if n == 0:
            classes = getattr(self.nodes[-1].head, "num_classes", 0)
            empty = torch.zeros(0, device=device)
            return Rollout(
                torch.empty((0, classes), device=device), empty, empty,
                torch.empty(0, dtype=torch.long, device=device),
                [0] * len(self.nodes), [0] * len(self.nodes), 0.0, 0.0, empty,
            )  # fmt: skip
        flops = self.node_flops(x)
        max_path = self.max_path_flops(x)
        router = _Router(self, flops, max_path, n, device, sample, uniform)
        state = {
            "d2nn_row": torch.arange(n, device=device),
            "d2nn_logp": torch.zeros(n, device=device),
            "d2nn_cost": torch.zeros(n, device=device),
            "d2nn_entropy": torch.zeros(n, device=device),
        }
        logits, trace = execute(self.nodes, x, router, state)
        spent = float(sum(r * f for r, f in zip(trace.rows_run, flops)))
        return Rollout(
            logits=logits,
            log_prob=router.logp_out,
            cost=router.cost_out,
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            flops=spent,
            max_flops=n * max_path,
            entropy=router.entropy_out,
            rows_decided=trace.rows_decided,
        )

    # -- the AdaptiveModel protocol: controllers, not an exit policy, decide here ------------------
    def graph(self) -> list[Node]:
        return self.nodes

    def _no_exit_policy(self, what: str):
        return ValueError(
            f"D2NN.{what}: a D2NN's controllers decide its routes (train them with D2NNTrainer); it has no "
            "exit policy to set or calibrate"
        )

    def set_policy(self, policy):
        raise self._no_exit_policy("set_policy")

    def set_execution(self, *, sync: bool = True) -> "D2NN":
        """Only the default (``sync=True``): a rollout writes every row's cost and log-probability as the
        router sees it, which the zero-sync mode's padded buffers would corrupt."""
        if not sync:
            raise ValueError(
                "D2NN.set_execution: the zero-sync mode (sync=False) is not supported: a D2NN's router writes "
                "each row's cost and log-probability, which padded zero-sync buffers would corrupt"
            )
        return super().set_execution(sync=True)

    def exit_logits(self, x: torch.Tensor):
        raise self._no_exit_policy("exit_logits")

    def exit_costs(self, x: torch.Tensor, cost: str = "flops"):
        raise self._no_exit_policy("exit_costs")

    # -- routing --------------------------------------------------------------------------------
    def _routes_on(self, device) -> list[torch.Tensor | None]:
        return [None if r is None else r.to(device) for r in self._routes]

    def _head_logits(self, i: int, node: Node, h: torch.Tensor) -> torch.Tensor | None:
        if node.head is None:
            return None
        try:
            return node.head(h).float()
        except RuntimeError as err:
            raise ValueError(
                f"node {i} ({node.name}): its head does not fit the node's output {tuple(h.shape)}: {err}"
            ) from err

    def _controller_scores(self, i: int, node: Node, h: torch.Tensor) -> torch.Tensor | None:
        """Node ``i``'s controller's action logits ``[n, actions]`` (``None``: no choice here)."""
        routes = self._routes[i]
        if routes is None:
            return None
        scores = self.controllers[str(i)](h)
        if scores.dim() != 2 or scores.shape != (h.shape[0], routes.numel()):
            raise ValueError(
                f"node {i} ({node.name}): its controller returned shape {tuple(scores.shape)}, expected "
                f"[{h.shape[0]}, {routes.numel()}] (actions: {', '.join(self.actions(i))})"
            )
        return scores

    def init_state(self, n: int, device) -> dict:
        return {}

    def route(self, i: int, node: Node, h: torch.Tensor, state: dict):
        """Deterministic routing (each controller's argmax), the router of :func:`adaexit.stream`;
        equal to an ``eval()`` rollout's decisions."""
        logits = self._head_logits(i, node, h)
        scores = self._controller_scores(i, node, h)
        route = None if scores is None else self._routes[i].to(h.device)[scores.argmax(dim=1)]
        return logits, route, state

    def forward(self, x: torch.Tensor, return_info: bool = False):
        """``eval()``: deterministic routing (argmax), sparse; returns ``[N, classes]`` logits in the
        original order (and an :class:`~adaexit.ExitInfo` with ``return_info=True``: ``flops_per_row``
        holds each row's FLOPs, ``full_flops`` the most expensive path's). ``train()``: a sampled
        :class:`Rollout` (what :class:`D2NNTrainer` consumes); :meth:`rollout` gives one in eval mode too."""
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode (train() returns a Rollout)")
            return self.rollout(x, sample=True)
        with torch.no_grad():
            out = self.rollout(x, sample=False)
        if not return_info:
            return out.logits
        n = out.exit_index.shape[0]
        per_path = out.max_flops / n if n else 0.0
        info = ExitInfo(
            exit_index=out.exit_index,
            exit_counts=out.exit_counts,
            rows_run=out.rows_run,
            rows_decided=out.rows_decided or [0] * len(self.nodes),
            flops=out.flops,
            full_flops=out.max_flops,
            node_names=self.node_names,
            flops_per_row=out.cost.double() * per_path,
        )
        return out.logits, info


class _Router:
    """The executor router of one D2NN rollout: controllers pick routes; cost and log-probability
    travel with the rows as per-example state and are written out at the rows' original positions."""

    def __init__(self, model: D2NN, flops, max_path, n, device, sample, uniform):
        self.model, self.flops, self.max_path = model, flops, max(max_path, 1e-12)
        self.sample, self.uniform = sample, uniform
        self.logp_out = torch.zeros(n, device=device)
        self.cost_out = torch.zeros(n, device=device)
        self.entropy_out = torch.zeros(n, device=device)
        self.routes = model._routes_on(device)

    def __call__(self, i: int, node: Node, h: torch.Tensor, state: dict):
        state = dict(state)
        state["d2nn_cost"] = state["d2nn_cost"] + self.flops[i] / self.max_path
        logits = self.model._head_logits(i, node, h)
        scores = self.model._controller_scores(i, node, h)
        route = None
        if scores is not None:
            routes = self.routes[i]
            if self.sample:
                dist = torch.distributions.Categorical(logits=scores.float())
                if self.uniform:
                    action = torch.randint(routes.numel(), (h.shape[0],), device=h.device)
                else:
                    action = dist.sample()
                state["d2nn_logp"] = state["d2nn_logp"] + dist.log_prob(action)
                state["d2nn_entropy"] = state["d2nn_entropy"] + dist.entropy()
            else:
                action = scores.argmax(dim=1)
            route = routes[action]
        if node.head is not None:
            # Rows exiting here write their cost and log-probability now; rows that go on are written
            # again where they exit (the last write wins). Out of place, so autograd sees every write.
            rows = state["d2nn_row"]
            self.logp_out = self.logp_out.index_copy(0, rows, state["d2nn_logp"])
            self.cost_out = self.cost_out.index_copy(0, rows, state["d2nn_cost"].to(self.cost_out.dtype))
            self.entropy_out = self.entropy_out.index_copy(0, rows, state["d2nn_entropy"])
        return logits, route, state
