"""``EarlyExitNet``: a backbone split into stages, an exit head after each, and a policy.

In ``train()`` mode ``forward`` is dense and returns every exit's logits (for multi-exit training).
In ``eval()`` mode it runs sparse execution: stage ``k`` runs only on the rows still alive at ``k``,
and one ``[N, classes]`` tensor comes back in the original row order, like the model it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cost import chain_flops, chain_latency
from .executor import CARRY, SOURCE, ExecutionTrace, Node, execute
from .policies import NeverExitPolicy, Policy, policy_from_state


@dataclass
class ExitInfo:
    """What an eval-mode forward did, from ``forward(x, return_info=True)``.

    Attributes:
        exit_index: long ``[N]``: the exit whose prediction each row returned.
        exit_counts: rows that exited at each exit.
        rows_run: rows that ran each stage (or node).
        rows_decided: rows whose exit decision (head + gate) was evaluated at each stage (or node).
        flops: FLOPs spent on the batch (stages run + heads evaluated).
        full_flops: FLOPs the plain model (every stage + the last head) spends on the same batch.
    """

    exit_index: torch.Tensor
    exit_counts: list[int]
    rows_run: list[int]
    rows_decided: list[int]
    flops: float
    full_flops: float

    @property
    def batch_size(self) -> int:
        return int(self.exit_index.shape[0])

    @property
    def flops_per_example(self) -> float:
        return self.flops / max(1, self.batch_size)

    @property
    def ideal_speedup(self) -> float:
        """Plain-model FLOPs over the FLOPs spent: the speedup if time were proportional to FLOPs."""
        return self.full_flops / self.flops if self.flops else float("nan")


def trace_flops(trace: ExecutionTrace, node_flops, head_flops) -> float:
    """FLOPs a sparse execution spent, from per-example node and head FLOPs."""
    return float(
        sum(r * f for r, f in zip(trace.rows_run, node_flops))
        + sum(r * f for r, f in zip(trace.rows_decided, head_flops))
    )


def restore_policy_class(model: nn.Module, state_dict, prefix, *args) -> None:
    """Load-state pre-hook: switch ``model.policy`` to the class its saved state was written by, so a
    freshly built model (default policy) loads a calibrated one (see :func:`policy_from_state`)."""
    saved = state_dict.get(prefix + "policy._extra_state")
    if saved is not None:
        policy = policy_from_state(saved, model.policy)
        if policy is not model.policy:
            model.set_policy(policy)


class EarlyExitNet(nn.Module):
    """A chain of ``stages`` with an exit head after each; the last head's prediction is final.

    Args:
        stages: modules run in order; stage ``k`` reads stage ``k-1``'s output.
        heads: one per stage; head ``k`` reads stage ``k``'s output (see :class:`adaexit.ExitHead`).
        policy: decides who exits where (default: never exit early, i.e. the plain model).
    """

    def __init__(self, stages, heads, policy: Policy | None = None):
        super().__init__()
        stages, heads = list(stages), list(heads)
        if not stages:
            raise ValueError("EarlyExitNet needs at least one stage")
        if len(heads) != len(stages):
            raise ValueError(
                f"EarlyExitNet needs one head per stage: got {len(stages)} stages and {len(heads)} heads"
            )
        for k, head in enumerate(heads):
            if not callable(getattr(head, "gate", None)):
                raise ValueError(
                    f"heads[{k}] is a {type(head).__name__}: exit heads must be adaexit.ExitHead (or any "
                    "module with gate(h, criterion, threshold, gate=None), which eval mode calls)"
                )
        classes = [getattr(head, "num_classes", None) for head in heads]
        for k, c in enumerate(classes[:-1]):
            if c is not None and classes[-1] is not None and c != classes[-1]:
                raise ValueError(f"exit head {k} predicts {c} classes but the last head predicts {classes[-1]}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.policy = (policy or NeverExitPolicy()).bind(len(stages))
        self._flops_cache: dict = {}
        self.register_load_state_dict_pre_hook(restore_policy_class)

    def graph(self) -> list[Node]:
        """The chain as executor nodes, built from the current stages and heads (so replacing
        ``stages[k]`` or ``heads[k]`` takes effect): stage ``k`` continues to ``k + 1``."""
        last = self.num_exits - 1
        return [
            Node(f"stage {k}", stage, head, (k + 1,) if k < last else (), SOURCE if k == 0 else CARRY)
            for k, (stage, head) in enumerate(zip(self.stages, self.heads))
        ]

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def set_policy(self, policy: Policy) -> "EarlyExitNet":
        """Replace the policy (checked against this model's number of exits)."""
        self.policy = policy.bind(self.num_exits)
        return self

    # -- dense paths --------------------------------------------------------------------------
    def _head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        try:
            return self.heads[k](h)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"exit head {k} failed on the output of stage {k} (shape {tuple(h.shape)}): {err}") from err

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for every row (dense; what ``train()`` mode returns)."""
        outputs, h = [], x
        for k, stage in enumerate(self.stages):
            h = stage(h)
            outputs.append(self._head(k, h))
        return outputs

    # -- sparse path --------------------------------------------------------------------------
    def _route(self, k: int, node: Node, h: torch.Tensor, state: dict):
        if not self.policy.needs_head(k):
            return None, None, state
        try:
            logits, route, state = self.policy.decide_route(k, node.head, h, state)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"exit head {k} failed on the output of stage {k} (shape {tuple(h.shape)}): {err}") from err
        return logits, route, state

    def flops(self, x: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per-example FLOPs of each stage and each head for inputs shaped like ``x`` (cached)."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._flops_cache:
            self._flops_cache[key] = chain_flops(self.stages, self.heads, x)
        return self._flops_cache[key]

    def _output_dtype(self) -> torch.dtype:
        """The dtype the wrapped model returns: its last classifier's (the gate computes in fp32)."""
        weight = getattr(getattr(self.heads[-1], "classifier", None), "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    def exit_costs(self, x: torch.Tensor, cost: str = "flops") -> tuple[list[float], list[float]]:
        """Per-example cost of each stage and each head: ``"flops"``, or ``"latency"`` (ms measured
        at ``x``'s batch size). The protocol :func:`adaexit.calibrate` uses on every model."""
        if cost == "flops":
            return self.flops(x)
        if cost == "latency":
            return chain_latency(self.stages, self.heads, x)
        raise ValueError(f"cost must be 'flops' or 'latency', got {cost!r}")

    def forward(self, x: torch.Tensor, return_info: bool = False):
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return self.exit_logits(x)
        state = self.policy.init_state(x.shape[0], x.device)
        if torch.jit.is_tracing() and any(self.policy.needs_head(k) for k in range(self.num_exits - 1)):
            raise ValueError(
                "EarlyExitNet: sparse execution cannot be traced (sub-batch sizes depend on the data and "
                "would be frozen into the trace); trace the plain model, or use NeverExitPolicy"
            )
        logits, trace = execute(self.graph(), x, self._route, state)
        logits = logits.to(self._output_dtype())
        if not return_info:
            return logits
        if x.shape[0]:
            stage_flops, head_flops = self.flops(x)
        else:
            stage_flops = head_flops = [0.0] * self.num_exits
        info = ExitInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            rows_decided=trace.rows_decided,
            flops=trace_flops(trace, stage_flops, head_flops),
            full_flops=float(x.shape[0] * (sum(stage_flops) + head_flops[-1])),
        )
        return logits, info
