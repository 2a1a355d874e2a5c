"""Threshold search over simulated policies: one uniform threshold, or one threshold per exit.

* :func:`uniform_thresholds`: the shared-threshold candidates (Bolukbasi et al.'s uniform baseline):
  gap midpoints near a grid of quantiles of the early exits' scores.
* :func:`per_exit_thresholds`: for a multiplier ``mu`` trading cost for errors, thresholds chosen from
  the last early exit to the first, each minimising ``errors + mu * cost`` against the already-fixed
  downstream thresholds, then refined by exact coordinate descent.

Robustness: the sparse executor evaluates heads on sub-batches, whose logits can differ from the dense
ones by float rounding (~1e-7). Thresholds are therefore placed in the middle of gaps between scores,
never on a score, and scores closer than :data:`TIE_TOL` are treated as ties, so the deployed policy
makes the decisions the simulation predicted.
"""

from __future__ import annotations

import math

import torch

from ..simulation import check_costs, exit_value, fire_mask, relative_costs

#: Scores closer than this are ties: no threshold is placed between them (see the module docstring).
TIE_TOL = 1e-5
UNIFORM_GRID = 64  # quantile positions per criterion


def _cuts(sorted_desc: torch.Tensor) -> torch.Tensor:
    """Allowed numbers of exiting rows ``i`` (1..m) for scores sorted descending: a cut may not
    split a group of ties (scores within :data:`TIE_TOL`)."""
    m = sorted_desc.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    gap_ok = (sorted_desc[:-1] - sorted_desc[1:]) > TIE_TOL
    return torch.cat([torch.nonzero(gap_ok).flatten() + 1, torch.tensor([m])])


def _threshold_for_cut(sorted_desc: torch.Tensor, i: int) -> float:
    """A threshold letting exactly the top ``i`` rows through, in the middle of the gap below them."""
    if i >= sorted_desc.shape[0]:
        return 0.0  # every finite score is >= 0
    return float((sorted_desc[i - 1] + sorted_desc[i]) / 2)


def _best_threshold(score, exit_val, cont_val, reach, head_penalty: float) -> float:
    """The threshold for one exit minimising ``sum over reaching rows`` of (exit ? exit_val :
    cont_val) plus the head's cost if the exit is enabled; ``inf`` (disabled) when nothing beats it."""
    candidates = reach & torch.isfinite(score)
    s = score[candidates].double()
    order = torch.sort(s, descending=True, stable=True).indices
    s = s[order]
    gain = (exit_val - cont_val)[candidates][order]  # change in the objective when a row exits
    if s.numel() == 0:
        return math.inf
    cuts = _cuts(s)
    objective = torch.cumsum(gain, 0)[cuts - 1] + head_penalty * float(reach.sum())
    best = int(torch.argmin(objective))
    if not float(objective[best]) < 0.0:  # disabled (0 change, no head cost) is at least as good
        return math.inf
    return _threshold_for_cut(s, int(cuts[best]))


def per_exit_thresholds(scores, losses, stage_costs, head_costs, cost_weight: float, passes: int = 4) -> list[float]:
    """Per-exit thresholds minimising ``sum(loss) + cost_weight * sum(cost / full_cost)`` on the data.

    Pass 1 is Bolukbasi's bottom-up order: from the last early exit to the first, each threshold is
    chosen against the already-fixed downstream thresholds, over every example (the upstream policy is
    not known yet). Later passes are exact coordinate descent: each threshold is re-chosen for the rows
    that really reach it, so the objective never increases; they stop when nothing changes.

    Args:
        scores: ``[K, N]`` float32 confidences (:func:`exit_scores`).
        losses: ``[K, N]`` per-example loss of each exit (:func:`exit_losses`).
        cost_weight: ``mu >= 0``.
    Returns ``K - 1`` thresholds (``inf`` = exit disabled).
    """
    scores, losses = torch.as_tensor(scores), torch.as_tensor(losses, dtype=torch.float64)
    k_exits, n = losses.shape
    rel_stage, rel_head = relative_costs(*check_costs(stage_costs, head_costs, k_exits))
    mu = float(cost_weight)
    thresholds = [math.inf] * (k_exits - 1)
    for pass_ in range(max(1, passes)):
        previous = list(thresholds)
        fires = [fire_mask(scores[k], t) for k, t in enumerate(thresholds)]
        value = exit_value(losses, k_exits - 1, None, True, rel_stage, rel_head, mu, None)
        for k in range(k_exits - 2, -1, -1):
            reach = torch.ones(n, dtype=torch.bool)
            if pass_ > 0:  # rows the current upstream thresholds let through to exit k
                for j in range(k):
                    reach &= ~fires[j]
            cont = mu * rel_stage[k] + value  # the stage runs either way; only the choice differs
            here = mu * rel_stage[k] + losses[k]
            thresholds[k] = _best_threshold(scores[k], here, cont, reach, mu * rel_head[k])
            fires[k] = fire_mask(scores[k], thresholds[k])
            value = exit_value(losses, k, fires[k], thresholds[k] <= 1.0, rel_stage, rel_head, mu, value)
        if thresholds == previous:
            break
    return thresholds


def uniform_thresholds(scores: torch.Tensor, grid: int = UNIFORM_GRID) -> list[float]:
    """One shared threshold per candidate: gap midpoints near ``grid`` quantiles of the early exits' scores."""
    pooled = scores[:-1].flatten()
    pooled = torch.unique(pooled[torch.isfinite(pooled)].double())  # sorted ascending
    if pooled.numel() == 0:
        return []
    gaps = torch.nonzero((pooled[1:] - pooled[:-1]) > TIE_TOL).flatten()
    mids = (pooled[gaps] + pooled[gaps + 1]) / 2
    out = {0.0}
    if mids.numel():
        ranks = torch.linspace(0, pooled.numel() - 1, grid).round().long()
        targets = pooled[ranks]  # the grid's quantiles of the pooled scores
        pos = torch.searchsorted(mids, targets).clamp(max=mids.numel() - 1)
        out.update(float(v) for v in mids[pos])
    return sorted(out)
