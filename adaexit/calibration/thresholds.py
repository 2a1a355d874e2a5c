"""Threshold search over simulated policies: one uniform threshold, or one threshold per exit.

* :func:`uniform_thresholds`: the shared-threshold candidates (Bolukbasi et al.'s uniform baseline):
  gap midpoints near a grid of quantiles of the early exits' scores.
* :func:`per_exit_thresholds`: for a multiplier ``mu`` trading cost for errors, thresholds chosen from
  the last early exit to the first, each minimising ``errors + mu * cost`` against the already-fixed
  downstream thresholds, then refined by exact coordinate descent (of that Lagrangian).
* :class:`ChainSearch` + :func:`refine_thresholds`: the least cost within a loss budget, directly: an
  exact coordinate search (one threshold re-chosen at a time over every cut of the rows that reach
  it, then pairs of thresholds trading errors between exits), never worse than its start. The same
  search runs on learned gates' offsets and on network selection's exit decisions (rows may skip
  nodes: ``cont_to``).

Robustness: the sparse executor evaluates heads on sub-batches, whose logits can differ from the dense
ones by float rounding (~1e-7). Thresholds are therefore placed in the middle of gaps between scores,
never on a score, and scores closer than :data:`TIE_TOL` are treated as ties, so the deployed policy
makes the decisions the simulation predicted.
"""

from __future__ import annotations

import math

import numpy as np
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


# =============================================================================================
# Exact constrained refinement: the least cost within a loss budget, one or two thresholds at a time
# =============================================================================================
#: Offsets (in allowed cuts) tried for the first threshold of a pair move.
PAIR_OFFSETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ChainSearch:
    """Exact evaluation of threshold policies on a graph of exits, for coordinate searches.

    At node ``k`` a row exits when ``scores[k] >= thresholds[k]`` and otherwise goes to node
    ``cont_to[k][row]`` (default: ``k + 1``, the chain of an early-exit net; a routing policy's fixed
    non-exit choice lets a row skip nodes). Holds the scores (float32, compared with each threshold in
    float32 like the kernel), the per-example losses and the relative costs. :meth:`evaluate` gives a
    policy's total ``(loss, cost)`` (cost as a fraction of the full model per example, summed over
    rows); :meth:`options` gives, for one node with every other threshold fixed, the total ``(loss,
    cost)`` of every threshold that changes the decisions (every allowed cut of the rows reaching it,
    and disabling it) in one pass.

    Args:
        bounded: scores lie in [0, 1] and a threshold above 1 disables the exit (confidence
            thresholds); otherwise only ``inf`` does.
        always_head: per node, whether its head is evaluated whatever its threshold (a later gate reads
            it, or a routing policy decides there anyway); otherwise only while its exit is enabled.
        cont_to: long ``[K - 1, N]``, where each row goes from node ``k`` when it does not exit.
    """

    def __init__(self, scores, losses, stage_costs, head_costs, bounded: bool = True, always_head=None,
                 cont_to=None):
        scores = torch.as_tensor(scores).float()
        self.bounded = bounded
        losses = torch.as_tensor(losses, dtype=torch.float64)
        self.k_exits, self.n = losses.shape
        rel_stage, rel_head = relative_costs(*check_costs(stage_costs, head_costs, self.k_exits))
        self.stage, self.head = np.array(rel_stage), np.array(rel_head)
        self.always = [False] * self.k_exits if always_head is None else [bool(a) for a in always_head]
        self.scores = scores.numpy()
        self.losses = losses.numpy()
        rows = np.arange(self.n)
        if cont_to is None:
            self.cont_to = [np.full(self.n, k + 1) for k in range(self.k_exits - 1)]
        else:
            self.cont_to = [np.asarray(torch.as_tensor(c).long()) for c in cont_to]
            for k, c in enumerate(self.cont_to):
                if c.shape != (self.n,) or bool(((c <= k) | (c >= self.k_exits)).any()):
                    raise ValueError(f"cont_to[{k}] must send every row to a later node")
        self.rows = rows
        self.order, self.sorted = [], []
        for k in range(self.k_exits - 1):
            s = self.scores[k].astype(np.float64)
            order = np.argsort(np.where(np.isfinite(s), -s, np.inf), kind="stable")  # NaN last
            self.order.append(order)
            self.sorted.append(s[order])

    def enabled(self, t: float) -> bool:
        return t <= 1.0 if self.bounded else math.isfinite(t)

    def head_cost(self, k: int, t: float) -> float:
        return self.head[k] if (self.always[k] or self.enabled(t)) else 0.0

    def fires(self, thresholds) -> list[np.ndarray]:
        out = []
        for k, t in enumerate(thresholds):
            if self.enabled(t):
                with np.errstate(invalid="ignore"):
                    out.append(self.scores[k] >= np.float32(t))  # NaN compares False
            else:
                out.append(np.zeros(self.n, dtype=bool))
        return out

    def _forward(self, thresholds, fires, stop: int):
        """Rows at node ``stop``, per row the cost spent before it and where it is (``at``), and the
        loss and cost of the rows that exit before ``stop``. Rows that skip past ``stop`` are at a
        later node (``at > stop``): :meth:`_passed` adds what they spend from there."""
        at = np.zeros(self.n, dtype=np.int64)
        done = np.zeros(self.n, dtype=bool)
        spent = np.zeros(self.n)
        out_loss = out_cost = 0.0
        for k in range(stop):
            here = ~done & (at == k)
            if not here.any():
                continue
            spent[here] += self.stage[k] + self.head_cost(k, thresholds[k])
            leave = here & fires[k]
            out_loss += float(self.losses[k][leave].sum())
            out_cost += float(spent[leave].sum())
            done |= leave
            go = here & ~fires[k]
            at[go] = self.cont_to[k][go]
        self._at, self._done = at, done
        return ~done & (at == stop), spent, out_loss, out_cost

    def _passed(self, stop: int, spent, values_loss, values_cost) -> tuple[float, float]:
        """Loss and cost of the rows that skip past node ``stop`` (after :meth:`_forward`): their path
        from the node they jumped to does not depend on ``stop``'s decisions."""
        past = ~self._done & (self._at > stop)
        if not past.any():
            return 0.0, 0.0
        idx = np.nonzero(past)[0]
        at = self._at[idx]
        return float(values_loss[at, idx].sum()), float((spent[idx] + values_cost[at, idx]).sum())

    def _values(self, thresholds, fires, start: int):
        """Per node ``j > start`` and row: the loss and cost from node ``j`` on (``j`` included)."""
        last = self.k_exits - 1
        loss = np.zeros((self.k_exits, self.n))
        cost = np.zeros((self.k_exits, self.n))
        loss[last] = self.losses[last]
        cost[last] = self.stage[last] + self.head[last]
        for j in range(last - 1, start, -1):
            nxt = self.cont_to[j]
            loss[j] = np.where(fires[j], self.losses[j], loss[nxt, self.rows])
            cost[j] = self.stage[j] + self.head_cost(j, thresholds[j]) + np.where(fires[j], 0.0, cost[nxt, self.rows])
        return loss, cost

    def evaluate(self, thresholds) -> tuple[float, float]:
        """Total loss and total relative cost of a threshold policy."""
        fires = self.fires(thresholds)
        loss, cost = self._values(thresholds, fires, -1)
        at0 = np.ones(self.n, dtype=bool)
        return float(loss[0][at0].sum()), float(cost[0][at0].sum())

    def options(self, k: int, thresholds):
        """For node ``k`` with the other thresholds fixed: ``(thresholds, losses, costs)`` arrays of the
        candidates (``inf`` = disabled first, then every allowed cut, most rows exiting last)."""
        fires = self.fires(thresholds)
        reach, spent, out_loss, out_cost = self._forward(thresholds, fires, k)
        values_loss, values_cost = self._values(thresholds, fires, k)
        passed = self._passed(k, spent, values_loss, values_cost)
        out_loss, out_cost = out_loss + passed[0], out_cost + passed[1]
        nxt = self.cont_to[k]
        cont_loss = values_loss[nxt, self.rows]
        cont_cost = values_cost[nxt, self.rows]
        prefix = spent + self.stage[k] + (self.head[k] if self.always[k] else 0.0)
        m = int(reach.sum())
        base_loss = out_loss + float(cont_loss[reach].sum())
        base_cost = out_cost + float(prefix[reach].sum()) + float(cont_cost[reach].sum())
        order = self.order[k]
        cand = reach[order] & np.isfinite(self.sorted[k])
        rows = order[cand]
        s = self.sorted[k][cand]
        if s.shape[0] == 0:
            return np.array([math.inf]), np.array([base_loss]), np.array([base_cost])
        cuts = np.concatenate([np.nonzero((s[:-1] - s[1:]) > TIE_TOL)[0] + 1, [s.shape[0]]])
        cl = np.cumsum(self.losses[k][rows] - cont_loss[rows])[cuts - 1]
        cc = np.cumsum(cont_cost[rows])[cuts - 1]
        lowest = 0.0 if self.bounded else s[-1] - 1.0  # below every score: all rows exit
        mids = np.append((s[:-1] + s[1:]) / 2, lowest)[cuts - 1]
        ts = np.append(math.inf, mids)
        ls = np.append(base_loss, base_loss + cl)
        cs = np.append(base_cost, base_cost + (0.0 if self.always[k] else m * self.head[k]) - cc)
        return ts, ls, cs


def route_options(search: ChainSearch, k: int, thresholds, score, alternative, base):
    """For node ``k`` of ``search`` with every threshold fixed, a second decision among the rows that do
    not exit there: go to ``alternative[row]`` where ``score > u``, else to ``base[row]``.
    Returns ``(us, losses, costs)`` of every candidate ``u`` (``inf`` = nobody takes the alternative,
    first; then every allowed cut of the rows by ``score``, most rows last) — network selection's
    skip decisions, searched exactly like the exits."""
    fires = search.fires(thresholds)
    reach, spent, out_loss, out_cost = search._forward(thresholds, fires, k)
    values_loss, values_cost = search._values(thresholds, fires, k)
    passed = search._passed(k, spent, values_loss, values_cost)
    out_loss, out_cost = out_loss + passed[0], out_cost + passed[1]
    rows = search.rows
    base = np.asarray(torch.as_tensor(base).long())
    alt = np.asarray(torch.as_tensor(alternative).long())
    score = np.asarray(torch.as_tensor(score).double())
    leave = reach & fires[k]
    stay = reach & ~fires[k]
    prefix = spent + search.stage[k] + search.head_cost(k, thresholds[k])
    base_loss = out_loss + float(search.losses[k][leave].sum()) + float(values_loss[base, rows][stay].sum())
    base_cost = out_cost + float(prefix[reach].sum()) + float(values_cost[base, rows][stay].sum())
    cand = stay & np.isfinite(score) & (alt != base)
    idx = np.nonzero(cand)[0]
    if idx.shape[0] == 0:
        return np.array([math.inf]), np.array([base_loss]), np.array([base_cost])
    order = idx[np.argsort(-score[idx], kind="stable")]
    z = score[order]
    gain_loss = values_loss[alt[order], order] - values_loss[base[order], order]
    gain_cost = values_cost[alt[order], order] - values_cost[base[order], order]
    cuts = np.concatenate([np.nonzero((z[:-1] - z[1:]) > TIE_TOL)[0] + 1, [z.shape[0]]])
    mids = np.append((z[:-1] + z[1:]) / 2, z[-1] - 1.0)[cuts - 1]
    us = np.append(math.inf, mids)
    ls = np.append(base_loss, base_loss + np.cumsum(gain_loss)[cuts - 1])
    cs = np.append(base_cost, base_cost + np.cumsum(gain_cost)[cuts - 1])
    return us, ls, cs


def _pick(ts, ls, cs, max_loss: float):
    """The least-cost candidate within ``max_loss`` (ties: the least loss), or None."""
    ok = ls <= max_loss + 1e-9
    if not ok.any():
        return None
    idx = np.nonzero(ok)[0]
    best = idx[np.lexsort((ls[idx], cs[idx]))[0]]
    return float(ts[best]), float(ls[best]), float(cs[best])


def refine_thresholds(search: ChainSearch, start, max_loss: float, pairs: bool = True, max_sweeps: int = 20):
    """Exact coordinate search from ``start``: the least total cost with total loss ``<= max_loss``.

    Each step re-chooses one threshold given all the others (every allowed cut, and disabling it),
    exactly; when no single threshold improves, pair moves try the first threshold of every ordered
    pair at cuts near its current one (:data:`PAIR_OFFSETS`) with the second re-chosen exactly, which
    trades errors between exits when the budget is binding. A move is taken only if it lowers the cost
    (or, at equal cost, the loss) within the budget, so the result is never worse than a feasible
    ``start``. Returns ``(thresholds, loss, cost)``.
    """
    t = [float(v) for v in start]
    loss, cost = search.evaluate(t)
    if loss > max_loss + 1e-9:
        raise ValueError(f"refine_thresholds: the start policy's loss {loss} exceeds max_loss {max_loss}")
    eps = 1e-12 * max(1.0, cost)

    def better(c):
        return c is not None and (c[2] < cost - eps or (abs(c[2] - cost) <= eps and c[1] < loss - 1e-9))

    k_minus = search.k_exits - 1
    for _ in range(max_sweeps):
        moved = False
        for k in range(k_minus):
            c = _pick(*search.options(k, t), max_loss)
            if better(c):
                t[k], loss, cost, moved = c[0], c[1], c[2], True
        if moved or not pairs or k_minus < 2:
            if moved:
                continue
            break
        for a in range(k_minus):
            for b in range(k_minus):
                if a == b:
                    continue
                for ta in _nearby(search, a, t):
                    trial = list(t)
                    trial[a] = ta
                    c = _pick(*search.options(b, trial), max_loss)
                    if better(c):
                        trial[b] = c[0]
                        t, loss, cost, moved = trial, c[1], c[2], True
        if not moved:
            break
    return t, loss, cost


def _nearby(search: ChainSearch, k: int, thresholds) -> list[float]:
    """Thresholds for exit ``k`` at cuts :data:`PAIR_OFFSETS` away from the current one (and disabled)."""
    ts, _, _ = search.options(k, thresholds)
    cut_ts = ts[1:]  # decreasing thresholds: more rows exit
    t = thresholds[k]
    out = [math.inf] if search.enabled(t) else []
    if cut_ts.shape[0] == 0:
        return out
    here = 0 if not search.enabled(t) else int(np.searchsorted(-cut_ts, -t, side="left"))
    for d in PAIR_OFFSETS:
        for i in (here - d, here + d):
            if 0 <= i < cut_ts.shape[0] and cut_ts[i] != t:
                out.append(float(cut_ts[i]))
    return out
