"""``EarlyExitNet``: a backbone split into stages, an exit head after each, and a policy.

In ``train()`` mode ``forward`` is dense and returns every exit's logits (for multi-exit training).
In ``eval()`` mode it runs sparse execution: stage ``k`` runs only on the rows still alive at ``k``,
and one ``[N, classes]`` tensor comes back in the original row order, like the model it replaces.
Everything but the graph comes from :class:`~adaexit.base.AdaptiveModel`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdaptiveModel, ExitInfo, restore_policy_class, trace_flops
from .executor import CARRY, SOURCE, Node
from .policies import NeverExitPolicy, Policy


class EarlyExitNet(AdaptiveModel):
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
        self.set_policy(policy or NeverExitPolicy())

    def graph(self) -> list[Node]:
        """The chain as executor nodes, built from the current stages and heads (so replacing
        ``stages[k]`` or ``heads[k]`` takes effect): stage ``k`` continues to ``k + 1``."""
        last = len(self.stages) - 1
        return [
            Node(f"stage {k}", stage, head, (k + 1,) if k < last else (), SOURCE if k == 0 else CARRY)
            for k, (stage, head) in enumerate(zip(self.stages, self.heads))
        ]

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def output_dtype(self) -> torch.dtype:
        """The dtype the wrapped model returns: its last classifier's (the gate computes in fp32)."""
        weight = getattr(getattr(self.heads[-1], "classifier", None), "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


__all__ = ["EarlyExitNet", "ExitInfo", "restore_policy_class", "trace_flops"]
