"""``AdaptiveModel``: the one base class of every adaptive model.

An adaptive model is a conditional-execution graph (:mod:`adaexit.executor`) plus a policy that
decides, per example, where each row exits. A subclass only describes its graph (:meth:`graph`) and,
where several member networks make it up (a cascade), which member each node belongs to
(:meth:`node_members`). The base gives every model the same behaviour:

* ``train()`` forward: dense, every exit's logits (a list), for multi-exit training;
* ``eval()`` forward: sparse, through the one executor; ``[N, classes]`` in the original row order,
  ``forward(x, return_info=True)`` adds an :class:`ExitInfo`;
* the policy: :meth:`set_policy` binds it to the graph; it is saved in ``state_dict`` and a freshly
  built model switches to the saved policy's class on load;
* the calibration protocol every entry point uses (:func:`adaexit.calibrate`, the anytime runner,
  the benchmarks): :attr:`num_exits`, :meth:`graph`, :meth:`exit_logits`, :meth:`exit_costs`,
  :meth:`node_costs`, :meth:`reference_cost`, :meth:`set_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .cost import chain_flops, chain_latency, module_device
from .executor import SOURCE, ExecutionTrace, Node, execute, num_rows, run_module
from .policies import Policy, RoutingPolicy, policy_from_state

COSTS = ("flops", "latency")


# Why a row stopped where it did (``ExitInfo.stop_reason``): anytime prediction adds budgets and deadlines
# to the policy as reasons to stop (:mod:`adaexit.anytime`).
STOP_REASONS = ("policy", "batch_budget", "example_budget", "deadline")
STOP_POLICY, STOP_BATCH_BUDGET, STOP_EXAMPLE_BUDGET, STOP_DEADLINE = range(len(STOP_REASONS))


@dataclass
class ExitInfo:
    """What an eval-mode forward (or an anytime prediction) did, from ``forward(x, return_info=True)``.

    Attributes:
        exit_index: long ``[N]``: the exit whose prediction each row returned.
        exit_counts: rows that exited at each exit.
        rows_run: rows that ran each stage (or node).
        rows_decided: rows whose exit decision (head + gate) was evaluated at each stage (or node).
        flops: FLOPs spent on the batch (stages run + heads evaluated).
        full_flops: FLOPs the reference model (:meth:`AdaptiveModel.reference_cost`: the plain
            network, or a cascade's strongest network) spends on the same batch.
        node_names: one name per node.
        flops_per_row: float64 ``[N]``, FLOPs spent on each row, where the caller counted them per row
            (anytime prediction); ``None`` otherwise.
        stop_reason: long ``[N]``, index into :data:`STOP_REASONS` (anytime prediction); ``None``: every
            row stopped by the policy.
        elapsed_ms: wall-clock time of the call, where it was measured (anytime prediction).
        budget_flops, deadline_ms: the anytime budgets the call ran under (``None`` = none).
    """

    exit_index: torch.Tensor
    exit_counts: list[int]
    rows_run: list[int]
    rows_decided: list[int]
    flops: float
    full_flops: float
    node_names: list[str] = field(default_factory=list)
    flops_per_row: torch.Tensor | None = None
    stop_reason: torch.Tensor | None = None
    elapsed_ms: float | None = None
    budget_flops: float | None = None
    deadline_ms: float | None = None

    @property
    def batch_size(self) -> int:
        return int(self.exit_index.shape[0])

    @property
    def flops_per_example(self) -> float:
        return self.flops / max(1, self.batch_size)

    @property
    def ideal_speedup(self) -> float:
        """Reference FLOPs over the FLOPs spent: the speedup if time were proportional to FLOPs."""
        return self.full_flops / self.flops if self.flops else float("nan")

    @property
    def deadline_met(self) -> bool:
        """Whether the call finished within its deadline (``True`` without one)."""
        return self.deadline_ms is None or (self.elapsed_ms is not None and self.elapsed_ms <= self.deadline_ms)

    @property
    def stop_counts(self) -> dict[str, int]:
        """Rows per stop reason (every row ``"policy"`` when no budget applied)."""
        if self.stop_reason is None:
            counts = [self.batch_size] + [0] * (len(STOP_REASONS) - 1)
        else:
            counts = torch.bincount(self.stop_reason.cpu(), minlength=len(STOP_REASONS)).tolist()
        return dict(zip(STOP_REASONS, counts))


def trace_flops(trace: ExecutionTrace, node_flops, head_flops) -> float:
    """FLOPs a sparse execution spent, from per-example node and head FLOPs."""
    return float(
        sum(r * f for r, f in zip(trace.rows_run, node_flops))
        + sum(r * f for r, f in zip(trace.rows_decided, head_flops))
    )


def standalone_costs(members: list[int], stage_costs, head_costs) -> list[float]:
    """Per-example cost of using node ``k`` alone: its member network from the input up to ``k``, plus
    ``k``'s head (earlier heads skipped). ``members[k]`` is the member network of node ``k``."""
    out, running, previous = [], 0.0, None
    for k, m in enumerate(members):
        running = stage_costs[k] + (running if m == previous else 0.0)
        out.append(float(running + head_costs[k]))
        previous = m
    return out


def restore_policy_class(model: nn.Module, state_dict, prefix, *args) -> None:
    """Load-state pre-hook: switch ``model.policy`` to the class its saved state was written by, so a
    freshly built model (default policy) loads a calibrated one (see :func:`policy_from_state`)."""
    saved = state_dict.get(prefix + "policy._extra_state")
    current = getattr(model, "policy", None)
    if saved is not None and isinstance(current, Policy):
        policy = policy_from_state(saved, current)
        if policy is not current:
            model.set_policy(policy)


def _shape_key(x) -> tuple:
    """Per-row shapes and dtypes of an input (a tensor or a RowBatch's tensors): what per-example costs
    depend on."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape[1:]), x.dtype)
    return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(vars(x).items()) if isinstance(v, torch.Tensor))


class AdaptiveModel(nn.Module):
    """Base of every adaptive model (see the module docstring).

    Subclasses build their modules, then call ``self.set_policy(policy or NeverExitPolicy())``, and
    implement :meth:`graph`. The default dense path, costs and router assume what early exit, cascades
    and anytime networks share: every node has an exit head, and node ``k`` reads the original input
    (``takes="source"``) or node ``k - 1``'s output. Models of another shape (D2NN) override them.
    """

    policy: Policy

    def __init__(self):
        super().__init__()
        self._flops_cache: dict = {}
        self.register_load_state_dict_pre_hook(restore_policy_class)

    # -- the graph ------------------------------------------------------------------------------
    def graph(self) -> list[Node]:
        """The model as executor nodes, in execution order (routes only go forward)."""
        raise NotImplementedError

    def node_members(self) -> list[int]:
        """The member network of each node (all 0 for one network; a cascade numbers its networks)."""
        return [0] * len(self.graph())

    def member_graph(self) -> list[Node]:
        """This model's graph as a member of a larger one (a :class:`~adaexit.Cascade`, an
        :class:`~adaexit.EANN`): its nodes in order, checked to form a chain of exits (node ``k``
        continues only to ``k + 1``, every node has an exit head). The container renames the nodes and
        sets their successors; the member's own policy is not used there."""
        nodes = self.graph()
        for k, node in enumerate(nodes):
            expected = (k + 1,) if k + 1 < len(nodes) else ()
            if node.head is None or tuple(node.successors) != expected:
                raise ValueError(
                    f"{type(self).__name__} cannot be a member of a cascade or EANN: its node {k} ({node.name}) "
                    "does not form a chain of exits (each node an exit head, continuing to the next node only)"
                )
        return nodes

    @property
    def num_exits(self) -> int:
        """Number of exits (nodes with an exit head); exit ``k`` is node ``k`` in chain models."""
        return sum(node.head is not None for node in self.graph())

    @property
    def successors(self) -> list[tuple[int, ...]]:
        """``successors[k]``: where a row may go after node ``k`` (route ``j`` -> ``successors[k][j-1]``)."""
        return [node.successors for node in self.graph()]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.graph()]

    # -- the policy -----------------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> "AdaptiveModel":
        """Replace the policy: bound to this model's exits (routing policies get the graph) and moved
        to the model's device (a learned policy's modules must sit where the logits are)."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an adaexit Policy, got {type(policy).__name__}")
        if isinstance(policy, RoutingPolicy):
            policy.bind_graph(self.successors)
        else:
            policy.bind(self.num_exits)
        device = module_device(self)
        if device is not None:
            policy.to(device)
        self.policy = policy
        return self

    # -- dense path -----------------------------------------------------------------------------
    def _dense_head(self, k: int, node: Node, h: torch.Tensor) -> torch.Tensor:
        try:
            return node.head(h)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"exit head {k} ({node.name}) failed on its input of shape {tuple(h.shape)}: {err}"
            ) from err

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for every row (dense, in the current mode; what ``train()`` returns)."""
        outputs, h = [], x
        for k, node in enumerate(self.graph()):
            inp = x if k == 0 or node.takes == SOURCE else h
            h = run_module(k, node, inp)
            outputs.append(self._dense_head(k, node, h))
        return outputs

    # -- costs ----------------------------------------------------------------------------------
    def exit_costs(self, x: torch.Tensor, cost: str = "flops") -> tuple[list[float], list[float]]:
        """Per-example ``(stage_costs, head_costs)`` of every node: ``"flops"`` (counted on one row,
        cached per input shape) or ``"latency"`` (median ms at ``x``'s batch size, divided by it).

        Reaching node ``k`` through nodes ``0..k`` in order costs ``sum(stage_costs[:k+1]) +`` the heads
        evaluated on the way.
        """
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if num_rows(x) == 0:
            raise ValueError("exit_costs needs at least one row")
        nodes = self.graph()
        stages, heads = [n.module for n in nodes], [n.head for n in nodes]
        reads_input = [k == 0 or n.takes == SOURCE for k, n in enumerate(nodes)]
        if cost == "latency":
            return chain_latency(stages, heads, x, reads_input=reads_input)
        key = _shape_key(x)
        if key not in self._flops_cache:
            self._flops_cache[key] = chain_flops(stages, heads, x, reads_input)
        return self._flops_cache[key]

    def flops(self, x: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per-example FLOPs of each stage and each head for inputs shaped like ``x`` (cached)."""
        return self.exit_costs(x, "flops")

    def node_costs(self, x: torch.Tensor, cost: str = "flops") -> list[float]:
        """Per-example cost of using exit ``k`` alone: its member network up to ``k`` plus ``k``'s head
        (what the oracle pays for a row answered at ``k``)."""
        stage_costs, head_costs = self.exit_costs(x, cost)
        return standalone_costs(self.node_members(), stage_costs, head_costs)

    def reference_cost(self, x: torch.Tensor, cost: str = "flops") -> float:
        """Per-example cost of the model speedups are measured against: the last exit's network alone
        (the plain model for early exit; a cascade's strongest network)."""
        return self.node_costs(x, cost)[-1]

    # -- sparse path ----------------------------------------------------------------------------
    def route(self, k: int, node: Node, h: torch.Tensor, state: dict):
        """The executor's router: the policy decides at node ``k``; rows at a terminal node exit."""
        terminal = not node.successors
        if not terminal and not self.policy.needs_head(k):
            return None, None, state
        try:
            logits, route, state = self.policy.decide_route(k, node.head, h, state)
            if logits is None and terminal:  # the last node always owes a prediction
                logits = node.head(h)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"exit head {k} ({node.name}) failed on its input of shape {tuple(h.shape)}: {err}"
            ) from err
        return logits, route, state

    def prepare_input(self, x):
        """What the graph's first node reads, from what ``forward`` was given (a tensor by default; a
        model taking several inputs packs them into a :class:`~adaexit.executor.RowBatch`)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"{type(self).__name__}: the input must be a tensor with a batch dimension")
        return x

    def finish_output(self, logits: torch.Tensor):
        """What ``forward`` returns for the logits (the logits by default; a wrapped model's own output type)."""
        return logits

    def init_state(self, n: int, device) -> dict:
        """The per-row state that travels with each row (the policy's: e.g. patience counters)."""
        return self.policy.init_state(n, device)

    def output_dtype(self) -> torch.dtype | None:
        """The dtype of the returned logits (``None``: as the executor produced them)."""
        return None

    def set_execution(self, *, sync: bool = True) -> "AdaptiveModel":
        """``sync=False``: the zero-sync mode (see :mod:`adaexit.executor`): no decision reads the device,
        every node runs on a buffer of the batch's size with its tail masked, so ``forward`` can be captured
        in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``; outputs equal the default
        ``sync=True`` (one host sync per decision, later nodes run on the survivors only)."""
        self.execution_sync = bool(sync)
        return self

    execution_sync: bool = True

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ExecutionTrace]:
        """Sparse execution of the batch under the policy: ``(logits [N, classes], trace)``."""
        n = num_rows(x)
        logits, trace = execute(self.graph(), x, self.route, self.init_state(n, x.device), sync=self.execution_sync)
        if trace.counts is None and sum(trace.exit_counts) != n:
            raise ValueError(
                f"the policy lost rows ({n - sum(trace.exit_counts)} of {n}): routes "
                "must lie in [0, 1 + len(successors[k])) at every node k"
            )
        dtype = self.output_dtype()
        return (logits if dtype is None else logits.to(dtype)), trace

    def exit_info(self, x: torch.Tensor, trace: ExecutionTrace) -> ExitInfo:
        """The :class:`ExitInfo` of a sparse execution of ``x``."""
        n = num_rows(x)
        trace.settle()  # zero-sync mode: the counts are read here
        if n:
            stage_flops, head_flops = self.exit_costs(x, "flops")
            reference = self.reference_cost(x, "flops")
        else:
            stage_flops = head_flops = [0.0] * len(trace.rows_run)
            reference = 0.0
        return ExitInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            rows_decided=trace.rows_decided,
            flops=trace_flops(trace, stage_flops, head_flops),
            full_flops=float(n * reference),
            node_names=self.node_names,
        )

    def forward(self, x: torch.Tensor, return_info: bool = False):
        """``train()``: every exit's logits (a list). ``eval()``: sparse execution under the policy,
        ``[N, classes]`` in the original row order (and an :class:`ExitInfo` with ``return_info``)."""
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return self.exit_logits(x)
        if torch.jit.is_tracing() and any(self.policy.needs_head(k) for k in range(self.num_exits - 1)):
            raise ValueError(
                f"{type(self).__name__}: sparse execution cannot be traced (sub-batch sizes depend on the "
                "data and would be frozen into the trace); trace the plain model, or use NeverExitPolicy"
            )
        x = self.prepare_input(x)
        logits, trace = self.run(x)
        out = self.finish_output(logits)
        return (out, self.exit_info(x, trace)) if return_info else out


__all__ = [
    "STOP_REASONS",
    "AdaptiveModel",
    "ExitInfo",
    "restore_policy_class",
    "standalone_costs",
    "trace_flops",
]
