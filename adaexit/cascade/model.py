"""Cascades and network selection: whole networks as the nodes of the conditional-execution graph.

A :class:`Cascade` holds networks of increasing cost that share the input and the label space. Every
network reads the original input rows (``takes="source"``) and outputs logits (its head is a
:class:`~adaexit.heads.LogitsHead`, so the fused :func:`~adaexit.kernels.exit_gate` kernel turns its
output into a confidence). After node ``k`` the policy routes each row to

* route ``0``: exit with node ``k``'s prediction, or
* route ``j >= 1``: ``cascade.successors[k][j - 1]``, i.e. the next node (``j == 1``) or *any later
  network* (Bolukbasi et al.'s network selection, gamma_1: X -> {N1, N2, N3}, so a row can skip a network).

The sparse execution itself is :func:`adaexit.executor.execute`: only the rows routed to a network run it.

**Early-exit networks as nodes.** An adaptive member (an :class:`~adaexit.EarlyExitNet`, a model from
:func:`adaexit.wrap`: any :class:`~adaexit.AdaptiveModel` whose graph is a chain of exits) describes its own
nodes (:meth:`~adaexit.AdaptiveModel.member_graph`): each becomes a node of the cascade (its first reads the
input, the later ones carry the previous node's output) with that node's exit head, so its exits are exits
of the cascade. Nodes are numbered in model
order, stages in order: ``Cascade([mlp, een3, resnet])`` has nodes ``0 = mlp``, ``1..3 = een3`` exits
0..2, ``4 = resnet``; ``info.exit_index``, ``num_exits``, ``exit_logits``, ``exit_costs`` and the policy all
use this numbering (see :attr:`Cascade.node_names`). A row inside an early-exit net can exit, go on to the
net's next stage (always ``successors[k][0]``), or leave for any later network; it cannot jump into the
middle of a net (those nodes need the previous stage's output). The early-exit net's own policy is not
used: the cascade's policy decides at every node.

**Policies.** Any :class:`~adaexit.policies.Policy` works: its exit mask maps to routes ``0`` (exit) /
``1`` (next node). Multi-way policies subclass :class:`RoutingPolicy` and return a route from
``decide_route``. Provided in :mod:`adaexit.cascade.policies`:

* :class:`NetworkSelectionPolicy` - Bolukbasi et al.'s learned network selection: one small classifier
  per node over {exit, each successor}, trained from the last decision back to the first as
  cost-sensitive classification with one multiplier ``lam`` trading cost for loss.
* :class:`SelectorPolicy` + :func:`train_reinforce` - Guan et al.'s selection modules, trained jointly
  with the networks by REINFORCE on ``accuracy - lam * cost``.

**Costs.** ``exit_costs(x, cost)`` follows the calibration protocol: ``stage_costs[k]`` is what running
node ``k``'s module costs per example (a whole network's FLOPs, or one stage of an early-exit net), and
``head_costs[k]`` its head (0 for a ``LogitsHead``: the network's own classifier is in its module).
Learned policies normalise costs by the reference cost (:meth:`Cascade.reference_cost`: the last
node's network run alone), so ``lam = 1`` means "spending the biggest network once is worth one error".
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..base import AdaptiveModel
from ..cost import eval_mode
from ..executor import CARRY, SOURCE, Node, validate_graph
from ..heads import LogitsHead
from ..policies import NeverExitPolicy, Policy

# What a cascade learns from its first batch (members' lazily built heads, the class count) is written
# once, under this lock (module-level: a lock attribute would break copy.deepcopy and pickling).
_FIRST_BATCH = threading.RLock()


class Cascade(AdaptiveModel):
    """Networks of increasing cost, run sparsely, with a policy routing rows between them.

    Args:
        models: networks that read the same input and predict the same classes, cheapest first. An
            adaptive member whose graph is a chain of exits (an :class:`~adaexit.EarlyExitNet`, a model from
            :func:`adaexit.wrap` of a vision model) contributes one node per exit (see the module docstring).
        policy: a :class:`~adaexit.policies.Policy` (exit mask: 0 = exit, 1 = next node) or a
            :class:`RoutingPolicy` (any later node). Default: :class:`~adaexit.NeverExitPolicy` (every row
            runs every node and returns the last one's prediction).
        example_input: optional batch used to check at construction that all nodes agree on the number
            of classes; otherwise the check runs on the first forward.

    ``train()`` forward returns every node's logits (a list, dense). ``eval()`` forward runs sparse
    execution and returns ``[N, classes]`` in the original row order; ``forward(x, return_info=True)``
    also returns an :class:`~adaexit.ExitInfo` (node numbering; ``node_names`` names the nodes).
    """

    def __init__(self, models, policy: Policy | None = None, *, example_input: torch.Tensor | None = None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("Cascade needs at least one model (models is empty)")
        logits_heads: list[LogitsHead | None] = []
        for m, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise ValueError(f"models[{m}] is a {type(model).__name__}, not an nn.Module")
            if isinstance(model, Cascade):
                raise ValueError(f"models[{m}] is a Cascade; pass its models instead (cascades do not nest)")
            if isinstance(model, AdaptiveModel):
                try:
                    model.member_graph()
                except ValueError as err:
                    raise ValueError(f"models[{m}]: {err}") from err
                logits_heads.append(None)
            else:
                logits_heads.append(LogitsHead(None))  # the class count is learnt on the first batch
        self.models = nn.ModuleList(models)
        self._logits_heads = logits_heads  # a plain list: parameter-free, nothing to save
        self.num_classes: int | None = None
        validate_graph(self.graph())
        self.set_policy(policy if policy is not None else NeverExitPolicy())
        if example_input is not None:
            self.check_classes(example_input)

    # -- graph -------------------------------------------------------------------------------
    def graph(self) -> list[Node]:
        """The cascade as executor nodes: one per plain network, and an adaptive member's own nodes
        (:meth:`~adaexit.AdaptiveModel.member_graph`), built on every call from the current members.

        Successors: the next node first (so an exit mask maps to routes 0/1), then every later network
        entry (a row may skip; it may not enter an early-exit member mid-way)."""
        nodes: list[Node] = []
        for m, (model, logits_head) in enumerate(zip(self.models, self._logits_heads)):
            label = f"model {m} ({type(model).__name__})"
            if logits_head is not None:
                nodes.append(Node(label, model, logits_head, (), SOURCE))
                continue
            member = model.member_graph()
            for s, node in enumerate(member):
                nodes.append(Node(f"{label} exit {s}", node.module, node.head, (), SOURCE if s == 0 else CARRY))
        for k, node in enumerate(nodes):
            later = [j for j in range(k + 2, len(nodes)) if nodes[j].takes == SOURCE]
            node.successors = tuple(([k + 1] if k + 1 < len(nodes) else []) + later)
        return nodes

    def node_members(self) -> list[int]:
        """The model (index into ``models``) each node belongs to."""
        return [
            m for m, (model, head) in enumerate(zip(self.models, self._logits_heads))
            for _ in range(1 if head is not None else len(model.member_graph()))
        ]  # fmt: skip

    def output_dtype(self) -> torch.dtype | None:
        """The last member's logits dtype where it says (an adaptive member), else as computed."""
        last = self.models[-1]
        return last.output_dtype() if isinstance(last, AdaptiveModel) else None

    # -- class-count check --------------------------------------------------------------------
    def _check_logits(self, outputs: list[torch.Tensor]) -> None:
        nodes = self.graph()
        first = None
        for k, out in enumerate(outputs):
            name = nodes[k].name
            if out.dim() != 2 or out.shape[1] < 2:
                raise ValueError(
                    f"node {k} ({name}) must output logits [N, classes >= 2], got shape {tuple(out.shape)}"
                )
            if first is None:
                first = (k, out.shape[1])
            elif out.shape[1] != first[1]:
                raise ValueError(
                    f"models disagree on the number of classes: node {first[0]} ({nodes[first[0]].name}) "
                    f"predicts {first[1]}, node {k} ({name}) predicts {out.shape[1]}"
                )
        if first is not None and self.num_classes is None:
            self.num_classes = first[1]
            for head in self._logits_heads:
                if head is not None:
                    head.num_classes = first[1]

    def _prepare_members(self, x: torch.Tensor) -> None:
        """Let every adaptive member see the input as it would alone (:meth:`AdaptiveModel.prepare_input`:
        checks, heads built from the first batch); its nodes must read that same tensor."""
        for m, (model, head) in enumerate(zip(self.models, self._logits_heads)):
            if head is None:
                prepared = model.prepare_input(x)
                if prepared is not x:
                    raise ValueError(
                        f"models[{m}] ({type(model).__name__}) reads its input as a {type(prepared).__name__}, "
                        "not the input tensor itself; a cascade's members must all read the same input tensor"
                    )

    @torch.no_grad()
    def check_classes(self, x: torch.Tensor) -> int:
        """Run every node on one row of ``x`` (eval mode) and check they agree on the class count."""
        if x.shape[0] == 0:
            raise ValueError("check_classes needs at least one row")
        self._prepare_members(x[:1])
        with eval_mode(self):
            self._check_logits(super().exit_logits(x[:1]))
        return self.num_classes

    @torch.no_grad()
    def _probe_empty(self, x: torch.Tensor) -> None:
        """Learn the class count from an empty batch if the networks accept one (most layers do)."""
        try:
            outputs = super().exit_logits(x)
        except (RuntimeError, ValueError):
            return  # unknown until a non-empty batch arrives; the output is then [0, 0]
        self._check_logits(outputs)

    # -- dense path ---------------------------------------------------------------------------
    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's logits for every row (dense, in the current mode; what ``train()`` returns),
        checked to agree on the number of classes."""
        self._prepare_members(x)
        outputs = super().exit_logits(x)
        self._check_logits(outputs)
        return outputs

    # -- sparse path ------------------------------------------------------------------------
    def exit_costs(self, x: torch.Tensor, cost: str = "flops"):
        self._prepare_members(x)
        return super().exit_costs(x, cost)

    def prepare_input(self, x):
        """Check ``x``; on the first batch, let members build what they build from it and check that all
        nodes agree on the class count. Under a lock: :class:`adaexit.Server` calls this on client threads."""
        x = super().prepare_input(x)
        with _FIRST_BATCH:
            self._prepare_members(x)
            if self.num_classes is None:
                if x.shape[0] > 0:
                    self.check_classes(x)  # first sparse run: all nodes must agree before any row exits
                else:
                    self._probe_empty(x)
        return x

