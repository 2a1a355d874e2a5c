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
from .heads import exit_head, head_classes
from .policies import NeverExitPolicy, Policy


def check_chain(stages, heads) -> None:
    """Raise ``ValueError`` unless ``stages`` and ``heads`` make a chain: one ``nn.Module`` head per stage,
    all predicting the same number of classes where the heads say how many."""
    if not stages:
        raise ValueError("EarlyExitNet needs at least one stage")
    if len(heads) != len(stages):
        raise ValueError(f"EarlyExitNet needs one head per stage: got {len(stages)} stages and {len(heads)} heads")
    for k, head in enumerate(heads):
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"heads[{k}] is a {type(head).__name__}: an exit head must be an nn.Module mapping stage {k}'s "
                "output to logits [N, classes]"
            )
    classes = [head_classes(head) or None for head in heads]  # 0: not known yet (a head built lazily)
    for k, c in enumerate(classes[:-1]):
        if c is not None and classes[-1] is not None and c != classes[-1]:
            raise ValueError(f"exit head {k} predicts {c} classes but the last head predicts {classes[-1]}")


def head_dtype(head: nn.Module) -> torch.dtype:
    """The dtype of a head's logits: its classifier's (an :class:`~adaexit.ExitHead`'s, a Linear's), else
    that of its last floating-point parameter; float32 for a head without parameters."""
    weight = getattr(getattr(head, "classifier", head), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    floating = [p.dtype for p in head.parameters() if p.is_floating_point()]
    return floating[-1] if floating else torch.float32


class EarlyExitNet(AdaptiveModel):
    """A chain of ``stages`` with an exit head after each; the last head's prediction is final.

    Args:
        stages: modules run in order; stage ``k`` reads stage ``k-1``'s output.
        heads: one per stage; head ``k`` reads stage ``k``'s output. Any ``nn.Module`` that maps it to
            logits ``[N, classes]``: an :class:`adaexit.ExitHead` (pool + linear, fused into the exit-gate
            kernel), an ``nn.Linear`` or ``Sequential(AdaptiveAvgPool2d(1), Flatten(), Linear)`` (fused
            too), or anything else (its logits in torch, then the gate; see :func:`adaexit.heads.exit_head`).
        policy: decides who exits where (default: never exit early, i.e. the plain model).
    """

    def __init__(self, stages, heads, policy: Policy | None = None):
        super().__init__()
        stages, heads = list(stages), list(heads)
        check_chain(stages, heads)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.set_policy(policy or NeverExitPolicy())

    def graph(self) -> list[Node]:
        """The chain as executor nodes, built from the current stages and heads (so replacing
        ``stages[k]`` or ``heads[k]`` takes effect): stage ``k`` continues to ``k + 1``. A head without a
        ``gate`` is seen through a transient :func:`~adaexit.heads.exit_head` view, rebuilt on every call
        (never registered: the model's modules and ``state_dict`` keys stay as they are)."""
        last = len(self.stages) - 1
        return [
            Node(f"stage {k}", stage, exit_head(head), (k + 1,) if k < last else (), SOURCE if k == 0 else CARRY)
            for k, (stage, head) in enumerate(zip(self.stages, self.heads))
        ]

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def output_dtype(self) -> torch.dtype:
        """The dtype the wrapped model returns: its last head's (the gate computes in fp32)."""
        return head_dtype(self.heads[-1])


__all__ = ["EarlyExitNet", "ExitInfo", "check_chain", "head_dtype", "restore_policy_class", "trace_flops"]
