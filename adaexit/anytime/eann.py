"""EANN (Hu et al.): a sequence of anytime networks of exponentially increasing depth, run in order as
one executor graph, so an interrupted example returns the latest exit it reached in any network."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..base import AdaptiveModel
from ..early_exit import EarlyExitNet
from ..executor import CARRY, SOURCE, Node
from ..heads import ExitHead
from ..policies import NeverExitPolicy, Policy


class EANN(AdaptiveModel):
    """A sequence of anytime networks (each an :class:`EarlyExitNet`, or any adaptive model whose graph is
    a chain of exits: :meth:`~adaexit.AdaptiveModel.member_graph`) of increasing depth.

    The networks run in order on one executor graph: every network's first stage reads the input
    (``"source"``), its later stages read the previous stage (``"carry"``), and after a network's last
    exit the surviving rows go on to the next network. The exits are numbered across the sequence, so an
    interrupted example returns the latest exit it reached in any network. Each network's own policy is
    not used; ``policy`` (over all exits, default never-exit: only budgets stop) decides. Budgets:
    :func:`adaexit.anytime_predict`. Speedups are measured against the last (deepest) network alone.
    """

    def __init__(self, networks: Sequence[AdaptiveModel], policy: Policy | None = None):
        super().__init__()
        networks = list(networks)
        if not networks:
            raise ValueError("EANN needs at least one network")
        for i, net in enumerate(networks):
            if not isinstance(net, AdaptiveModel):
                raise ValueError(f"networks[{i}] must be an adaptive model (an EarlyExitNet), got {type(net).__name__}")
            try:
                net.member_graph()
            except ValueError as err:
                raise ValueError(f"networks[{i}]: {err}") from err
        self.networks = nn.ModuleList(networks)
        self.set_policy(policy or NeverExitPolicy())

    @property
    def num_exits(self) -> int:
        return sum(net.num_exits for net in self.networks)

    def exit_owner(self, k: int) -> tuple[int, int]:
        """``(network index, exit index inside it)`` of global exit ``k``."""
        if not 0 <= k < self.num_exits:
            raise ValueError(f"exit {k} out of range: the EANN has {self.num_exits} exits")
        for i, net in enumerate(self.networks):
            if k < net.num_exits:
                return i, k
            k -= net.num_exits
        raise AssertionError("unreachable")

    def graph(self) -> list[Node]:
        """The flattened chain of nodes (global exit ``k`` = node ``k``), from each network's own graph."""
        nodes: list[Node] = []
        total = self.num_exits
        for i, net in enumerate(self.networks):
            for k, node in enumerate(net.member_graph()):
                j = len(nodes)
                successors = (j + 1,) if j + 1 < total else ()
                nodes.append(Node(f"network {i} {node.name}", node.module, node.head, successors,
                                  SOURCE if k == 0 else CARRY))
        return nodes

    def node_members(self) -> list[int]:
        """The network each node belongs to."""
        return [i for i, net in enumerate(self.networks) for _ in range(net.num_exits)]


def exponential_networks(depths: Sequence[int], make_stage, make_head, policy_factory=None) -> list[EarlyExitNet]:
    """Anytime networks of the given depths (in blocks), an exit after every block.

    Args:
        depths: blocks per network, e.g. ``(1, 2, 4)``.
        make_stage: ``make_stage(network, block) -> nn.Module`` (block 0 reads the input).
        make_head: ``make_head(network, block) -> head``.
    """
    depths = list(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be a non-empty sequence of ints >= 1, got {depths!r}")
    nets = []
    for i, d in enumerate(depths):
        stages = [make_stage(i, b) for b in range(d)]
        heads = [make_head(i, b) for b in range(d)]
        nets.append(EarlyExitNet(stages, heads, policy_factory() if policy_factory else None))
    return nets


def exponential_mlp_networks(
    in_features: int, num_classes: int, depths: Sequence[int] = (1, 2, 4), width: int = 32
) -> list[EarlyExitNet]:
    """Small MLP anytime networks of exponentially increasing depth (for tests and demos)."""

    def make_stage(i, b):
        return nn.Sequential(nn.Linear(in_features if b == 0 else width, width), nn.ReLU())

    return exponential_networks(depths, make_stage, lambda i, b: ExitHead(width, num_classes))
