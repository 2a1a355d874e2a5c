"""Guan et al.: joint REINFORCE training of a cascade's networks and its selection modules."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cost import module_device
from ..data import batches
from ..reinforce import RewardBaseline, policy_gradient_loss
from .model import Cascade
from .policies import SelectorPolicy


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
    REINFORCE (:mod:`adaexit.reinforce`): ``-(reward - b) * log P(trajectory)``, with ``b`` a running
    mean of the reward over earlier batches (``baseline="moving_average"``) or ``0`` (``"none"``).

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
    first_x = next(iter(batches(data, batch_size, device=device)))[0]
    stage_costs, head_costs = cascade.exit_costs(first_x, cost)
    reference = cascade.reference_cost(first_x, cost) or 1.0
    chain_cost = torch.tensor(
        [sum(stage_costs[: k + 1]) + sum(head_costs[: k + 1]) for k in range(K)], dtype=torch.float32
    ) / reference

    selector_ids = {id(p) for p in selectors.parameters()}
    net_params = [p for p in cascade.parameters() if id(p) not in selector_ids and p.requires_grad]
    net_opt = torch.optim.Adam(net_params, lr=lr) if net_params and network_loss != "none" else None
    sel_opt = torch.optim.Adam(selectors.parameters(), lr=selector_lr) if K > 1 else None
    rewards = RewardBaseline(baseline_momentum, enabled=baseline == "moving_average")
    history = []

    phases = ["warmup"] * int(warmup_epochs) + ["joint"] * int(epochs)
    for phase in tqdm(phases, desc="train_reinforce", disable=not progress):
        cascade.train()
        sums = {"loss": 0.0, "reward": 0.0, "accuracy": 0.0, "cost": 0.0, "rows": 0}
        for x, y in batches(data, batch_size, shuffle=True, generator=generator, device=device):
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
            advantage = rewards.advantage(reward)

            loss = torch.zeros((), device=dev)
            if K > 1:
                nodes = torch.arange(K - 1, device=dev)[:, None]
                log_continue = torch.log1p(-p_exit)
                log_exit = torch.log(p_exit)
                # log P(trajectory): continue at every node before the exit node, exit at it.
                logp = (log_continue * (nodes < exit_at[None])).sum(0) + (
                    log_exit * (nodes == exit_at[None])).sum(0)
                loss = loss + policy_gradient_loss(logp, advantage)
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
            "baseline": rewards.value,
        })
    cascade.eval()
    cascade.set_policy(selectors)
    return history
