"""Bolukbasi et al. (2017)'s learned exit policy: one linear gate per early exit, fitted bottom-up (from
the last early exit to the first) as weighted binary classification.

Two kinds of gate, mixed freely in one policy:

* a **stats gate**, 4 floats ``(w_maxprob, w_margin, w_entropy, bias)`` on the exit's softmax
  statistics, fires when ``sigmoid(w . stats + bias) >= 0.5``. Evaluated inside the fused exit-gate
  kernel (``criterion="learned"``), so it costs what a confidence threshold costs.
* a **history gate** (exit ``k >= 1``), 8 floats ``(w_maxprob, w_margin, w_entropy, v_maxprob,
  v_margin, v_entropy, w_agree, bias)``: the exit's statistics, the previous exit's statistics and
  whether the two exits predict the same class; fires when ``w . stats + v . previous + w_agree *
  agree + bias >= 0``. The previous exit's statistics and prediction travel with the rows as per-row
  state (:meth:`LearnedPolicy.init_state`), and the gate is computed in torch from the logits
  (:func:`history_scores`). The previous exit's head is evaluated whenever a history gate reads it.

The fitting runs on dense exit logits, with the exact simulation of :mod:`adaexit.simulation`
(:func:`learned_simulation` predicts a sparse run of either kind exactly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..simulation import (
    check_costs,
    check_labels,
    exit_losses,
    exit_value,
    learned_scores,
    learned_thresholds,
    relative_costs,
    simulate,
    simulate_routes,
    softmax_statistics,
    stack_logits,
)
from .base import Policy

#: Gate that always fires (on rows with finite statistics): ``sigmoid(8) >= 0.5``.
ALWAYS_FIRE = (0.0, 0.0, 0.0, 8.0)
STATS_GATE = 4  # floats of a stats gate (fused kernel)
HISTORY_GATE = 8  # floats of a history gate (torch, reads the previous exit)
FEATURES = ("stats", "history")
#: Scores closer than this are ties: a fitted offset is never placed between them (as thresholds.TIE_TOL).
TIE_TOL = 1e-5


def _check_gate(gate, k: int):
    """A gate is ``None`` (exit disabled), 4 finite floats (a stats gate) or, for ``k >= 1``, 8 (a
    history gate)."""
    if gate is None:
        return None
    values = [float(v) for v in (gate.tolist() if isinstance(gate, torch.Tensor) else gate)]
    if len(values) != STATS_GATE and not (len(values) == HISTORY_GATE and k >= 1):
        raise ValueError(
            f"gates[{k}] must have 4 values (w_maxprob, w_margin, w_entropy, bias) or, from the second exit "
            f"on, 8 (those of the exit, then of the previous exit, w_agree, bias); got {len(values)}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"gates[{k}] must be finite, got {values}")
    # stored as the float32 values the kernel will use, so a save/load round trip is exact
    return [float(v) for v in torch.tensor(values, dtype=torch.float32)]


def is_history(gate) -> bool:
    return gate is not None and len(gate) == HISTORY_GATE


def history_scores(stats: torch.Tensor, gate, previous: torch.Tensor | None = None,
                   agree: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``[N]`` score of one gate evaluated in torch; the row exits when ``score >= 0``.

    ``stats``: the exit's :func:`~adaexit.simulation.softmax_statistics` ``[N, 3]``; for a history
    gate also ``previous`` (the previous exit's ``[N, 3]``) and ``agree`` (bool ``[N]``: same argmax).
    A stats gate scores ``sigmoid(w . stats + b) - 0.5`` computed as the kernel's reference does
    (:func:`~adaexit.kernels.exit_gate_torch`), so it decides exactly as the fused kernel's reference.
    NaN rows (non-finite logits, here or at the previous exit) never exit.
    """
    g = torch.tensor(gate, dtype=torch.float32, device=stats.device)
    if len(gate) == STATS_GATE:
        z = g[0] * stats[:, 0] + g[1] * stats[:, 1] + g[2] * stats[:, 2] + g[3]
        return torch.sigmoid(z) - 0.5
    return (
        g[0] * stats[:, 0] + g[1] * stats[:, 1] + g[2] * stats[:, 2]
        + g[3] * previous[:, 0] + g[4] * previous[:, 1] + g[5] * previous[:, 2]
        + g[6] * agree.float() + g[7]
    )  # fmt: skip


class LearnedPolicy(Policy):
    """Bolukbasi et al. (2017): one learned linear gate per early exit; the last exit always fires.

    Args:
        gates: one per early exit (``len == num_exits - 1``): a stats gate (4 floats ``(w_maxprob,
            w_margin, w_entropy, b)``, exits when ``sigmoid(w . stats + b) >= 0.5``, evaluated in the
            fused kernel), a history gate (8 floats, exits ``k >= 1`` only; see the module docstring),
            or ``None`` for a gate that never fires (its head is then skipped unless the next gate is a
            history gate that reads it). ``None`` for the whole argument: every gate disabled until
            fitted (:meth:`fit`) or loaded from a ``state_dict``.

    Fit gates with :meth:`fit` (bottom-up weighted logistic regression) or let :func:`adaexit.calibrate`
    sweep the cost multiplier. Gates live in ``state_dict()`` as plain lists of float32 values (states
    saved before history gates existed load unchanged).
    """

    def __init__(self, gates=None):
        super().__init__()
        self._unset = gates is None
        self.gates = [] if gates is None else [_check_gate(g, k) for k, g in enumerate(gates)]
        self._tensors: dict = {}  # device -> [4] float32 gate tensors, so decide() copies nothing

    @property
    def history(self) -> bool:
        """Whether any gate reads the previous exit (then every gate is evaluated in torch)."""
        return any(is_history(g) for g in self.gates)

    def reads_previous(self, k: int) -> bool:
        return 0 <= k < len(self.gates) and is_history(self.gates[k])

    def bind(self, num_exits: int) -> "LearnedPolicy":
        if self._unset:
            self.gates = [None] * (num_exits - 1)
        elif len(self.gates) != num_exits - 1:
            raise ValueError(
                f"LearnedPolicy has {len(self.gates)} gates but the model has {num_exits} exits: pass "
                f"len(gates) == {num_exits - 1} (the last exit always fires)"
            )
        return super().bind(num_exits)

    @classmethod
    def fit(cls, exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss="error",
            features: str = "stats"):
        """Learn the gates bottom-up from dense exit logits (see :func:`fit_learned_gates`).

        Args:
            exit_logits: one ``[N, C]`` tensor per exit (``model.exit_logits(x)``).
            labels: ``[N]`` class indices.
            stage_costs, head_costs: per-example cost of each stage and head (``model.exit_costs``).
            cost_weight: ``mu``: the objective per example is ``loss + mu * cost / full_cost``; a larger
                ``mu`` exits earlier (cheaper, usually less accurate).
            loss: ``"error"`` (0/1), ``"ce"`` (cross-entropy) of each exit, or a ``[K, N]`` tensor.
            features: ``"stats"`` (stats gates only: the fused kernel) or ``"history"`` (a history gate
                wherever it does better on the data).
        """
        return cls(fit_learned_gates(exit_logits, labels, stage_costs, head_costs, cost_weight, loss, features))

    def needs_head(self, k: int) -> bool:
        return self._is_last(k) or self.gates[k] is not None or self.reads_previous(k + 1)

    def _gate_tensor(self, k: int, device: torch.device) -> torch.Tensor:
        cached = self._tensors.get(device)
        if cached is None:
            cached = [None if g is None else torch.tensor(g, dtype=torch.float32, device=device) for g in self.gates]
            self._tensors[device] = cached
        return cached[k]

    def init_state(self, n: int, device) -> dict:
        if not self.history:
            return {}
        return {
            "previous_stats": torch.full((n, 3), float("nan"), device=device),
            "previous_pred": torch.full((n,), -1, dtype=torch.long, device=device),
        }

    def decide(self, k, head, h, state):
        if self._is_last(k):
            logits, _, exit_mask = head.gate(h, "maxprob", -math.inf)
            return logits, torch.ones_like(exit_mask), state
        if not self.history:  # the fused kernel evaluates the gate
            logits, _, exit_mask = head.gate(h, "learned", 0.5, gate=self._gate_tensor(k, h.device))
            return logits, exit_mask, state
        logits, _, _ = head.gate(h, "maxprob", math.inf)  # pool + linear in the kernel; the gate in torch
        stats = softmax_statistics(logits)
        pred = logits.argmax(dim=1)
        gate = self.gates[k]
        if gate is None:
            exit_mask = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            agree = pred == state["previous_pred"]
            exit_mask = history_scores(stats, gate, state["previous_stats"], agree) >= 0  # NaN: False
        return logits, exit_mask, {**state, "previous_stats": stats, "previous_pred": pred}

    def settings(self):
        return {"gates": [None if g is None else list(g) for g in self.gates]}

    def load_settings(self, settings):
        if "gates" not in settings:
            raise ValueError("LearnedPolicy: the saved policy state has no gates")
        gates = [_check_gate(g, k) for k, g in enumerate(settings["gates"])]
        if self.num_exits is not None and len(gates) != self.num_exits - 1:
            raise ValueError(f"LearnedPolicy: the saved state has {len(gates)} gates, the model has "
                             f"{self.num_exits} exits (needs {self.num_exits - 1})")
        self.gates, self._unset, self._tensors = gates, False, {}

    def extra_repr(self) -> str:
        shown = [None if g is None else [round(v, 3) for v in g] for g in self.gates]
        return f"gates={shown}"


# =============================================================================================
# Exact simulation of a learned policy from dense exit logits
# =============================================================================================
def gate_scores(exit_logits, gates, statistics=None) -> torch.Tensor:
    """Float32 ``[K, N]``: the score each gate gives each row, the row exiting when ``score >= 0``
    (:func:`history_scores`, on the dense logits; NaN for disabled gates and the last exit).
    ``statistics``: the exits' :func:`softmax_statistics`, if already computed."""
    stack = stack_logits(exit_logits)
    out = torch.full(stack.shape[:2], float("nan"))
    stats = [softmax_statistics(z) for z in stack] if statistics is None else statistics
    preds = stack.argmax(dim=2)
    for k, gate in enumerate(gates):
        if gate is None:
            continue
        if is_history(gate):
            out[k] = history_scores(stats[k], gate, stats[k - 1], preds[k] == preds[k - 1])
        else:
            out[k] = history_scores(stats[k], gate)
    return out


def heads_evaluated(gates) -> list[bool]:
    """Per exit, whether a :class:`LearnedPolicy` with these gates evaluates its head (the last: yes)."""
    k_exits = len(gates) + 1
    return [k == k_exits - 1 or gates[k] is not None or (k + 1 < len(gates) and is_history(gates[k + 1]))
            for k in range(k_exits)]


def learned_simulation(exit_logits, gates, correct, stage_costs, head_costs, statistics=None):
    """What the executor does with a :class:`LearnedPolicy` of these ``gates``, predicted exactly from
    dense exit logits: stats gates on the kernel's gate scores (:func:`adaexit.simulation.simulate`),
    policies with history gates through :func:`adaexit.simulation.simulate_routes`."""
    gates = list(gates)
    if not any(is_history(g) for g in gates):
        return simulate(learned_scores(exit_logits, gates), learned_thresholds(gates), correct, stage_costs,
                        head_costs)
    scores = gate_scores(exit_logits, gates, statistics)
    routes = (~(scores >= 0)).long()  # NaN: continue
    k_exits = scores.shape[0]
    successors = [(k + 1,) if k + 1 < k_exits else () for k in range(k_exits)]
    return simulate_routes(routes, successors, correct, stage_costs, head_costs, decided=heads_evaluated(gates))


# =============================================================================================
# Fitting: bottom-up weighted logistic regression (Bolukbasi et al. 2017)
# =============================================================================================
def newton_minimize(objective, newton_step, theta: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Minimise a convex ``objective(theta) -> float`` from ``theta`` by Newton's method with step halving:
    ``newton_step(theta)`` returns the Newton direction (Hessian⁻¹ gradient, theta's shape). Stops after
    ``steps`` steps, when no halving down to 1e-4 decreases the objective, or when it improves by < 1e-12."""
    current = objective(theta)
    for _ in range(steps):
        step = newton_step(theta)
        scale = 1.0
        while scale > 1e-4:
            trial = theta - scale * step
            value = objective(trial)
            if value <= current:
                break
            scale /= 2
        else:
            break
        theta, improvement, current = trial, current - value, value
        if improvement < 1e-12:
            break
    return theta


def _weighted_logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float = 1e-3, steps: int = 50):
    """Fit ``sigmoid(x @ a + b)`` to labels ``y`` with example weights ``w`` (L2 ``l2`` on ``a``); returns
    ``(a, b)`` in the units of ``x`` (fitted on standardised features, then folded back).

    Newton's method (iteratively reweighted least squares) with step halving: the objective is convex
    and the features few, so it converges to the optimum in a handful of steps, deterministically."""
    x, y, w = x.double(), y.double(), w.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = torch.cat([(x - mean) / std, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    w = w / w.sum()
    pos = min(max(float((w * y).sum()), 1e-6), 1 - 1e-6)
    theta = torch.zeros(xs.shape[1], dtype=torch.float64)
    theta[-1] = math.log(pos / (1 - pos))
    reg = torch.full((xs.shape[1],), 2 * l2, dtype=torch.float64)
    reg[-1] = 1e-9  # the bias is not penalised (a tiny ridge keeps the Hessian invertible)

    def objective(t):
        z = xs @ t
        return float((w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()) + l2 * float(
            (t[:-1] * t[:-1]).sum())

    def newton_step(t):
        p = torch.sigmoid(xs @ t)
        grad = xs.T @ (w * (p - y)) + reg * t
        hess = (xs * (w * p * (1 - p))[:, None]).T @ xs + torch.diag(reg)
        return torch.linalg.solve(hess, grad)

    theta = newton_minimize(objective, newton_step, theta, steps)
    a, b = theta[:-1], theta[-1]
    return a / std, b - (a * mean / std).sum()


def _losses(stack, labels, loss) -> torch.Tensor:
    """``[K, N]`` float64 per-example losses: ``"error"``, ``"ce"`` or a given ``[K, N]`` tensor (e.g.
    :func:`adaexit.simulation.budget_losses`, what a calibration budget bounds)."""
    if isinstance(loss, str):
        return exit_losses(stack, labels, loss)
    losses = torch.as_tensor(loss, dtype=torch.float64)
    if tuple(losses.shape) != tuple(stack.shape[:2]):
        raise ValueError(f"loss must be 'error', 'ce' or a [K, N] = {tuple(stack.shape[:2])} tensor, "
                         f"got shape {tuple(losses.shape)}")
    return losses


def _best_offset(z: torch.Tensor, gain: torch.Tensor) -> float | None:
    """The offset ``t`` minimising ``sum(gain[z >= t])`` over the rows (``gain``: change in the
    objective when the row exits), placed mid-way between scores further apart than :data:`TIE_TOL`;
    ``None`` when no cut lowers the objective below 0 (exiting nobody)."""
    ok = torch.isfinite(z)
    z, gain = z[ok].double(), gain[ok]
    if z.numel() == 0:
        return None
    order = torch.sort(z, descending=True, stable=True).indices
    z, gain = z[order], gain[order]
    cuts = torch.cat([torch.nonzero((z[:-1] - z[1:]) > TIE_TOL).flatten() + 1, torch.tensor([z.numel()])])
    objective = torch.cumsum(gain, 0)[cuts - 1]
    best = int(torch.argmin(objective))
    if not float(objective[best]) < 0.0:
        return None
    i = int(cuts[best])
    return float((z[i - 1] + z[i]) / 2) if i < z.numel() else float(z[-1]) - 1.0


def _gate_direction(x, label, weight, train):
    """``(w, b)`` of a weighted logistic fit on ``x``, scaled so its largest weight is 1 (the same
    decisions; scores of order 1, far from float32 rounding at the boundary)."""
    a, b = _weighted_logistic(x[train], label[train].double(), weight[train])
    scale = float(a.abs().max())
    if scale > 0:
        a, b = a / scale, b / scale
    return [float(v) for v in torch.cat([a, b.reshape(1)])]


def fit_learned_gates(
    exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss="error", features: str = "stats",
    statistics=None,
) -> list[list[float] | tuple | None]:
    """Learn one gate per early exit, bottom-up (Bolukbasi et al. 2017); see :meth:`LearnedPolicy.fit`.

    For exit ``k``, from the last early exit to the first, with the gates below already fixed: for
    every example, ``here = loss_k`` (exit now) and ``continue = the cost of the stages and heads it
    would run next + the loss at the exit the fixed downstream gates send it to`` (costs as fractions
    of the full model, times ``mu = cost_weight``). Label: exiting is strictly better; weight:
    ``|here - continue|``. A weighted logistic regression on the gate's features gives the direction
    ``(w, b)``; the offset ``b`` is then moved to where the same weighted objective is least on the
    data (an exact one-dimensional search). With ``features="history"``, exits ``k >= 1`` also try a
    history gate (the previous exit's statistics and agreement, :class:`LearnedPolicy`), paying the
    previous head where it would not run otherwise, and keep whichever does better. A gate is disabled
    (``None``) when no example is better off exiting, or when no fitted gate pays for its head's cost.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    stack = stack_logits(exit_logits)
    k_exits, n, classes = stack.shape
    labels = check_labels(labels, n, classes)
    if n == 0:
        raise ValueError("fit_learned_gates needs at least one example")
    if not (math.isfinite(float(cost_weight)) and float(cost_weight) >= 0):
        raise ValueError(f"cost_weight must be finite and >= 0, got {cost_weight}")
    rel_stage, rel_head = relative_costs(*check_costs(stage_costs, head_costs, k_exits))
    losses = _losses(stack, labels, loss)
    mu = float(cost_weight)
    # what the gates read (as the kernel computes them); ``statistics`` if already computed
    stats32 = [softmax_statistics(z) for z in stack] if statistics is None else statistics
    stats = [st.double() for st in stats32]
    preds = stack.argmax(dim=2)

    gates: list = [None] * (k_exits - 1)
    value = exit_value(losses, k_exits - 1, None, True, rel_stage, rel_head, mu, None)
    for k in range(k_exits - 2, -1, -1):
        here, cont = losses[k], value  # the stage-k cost is paid either way
        forced = k + 1 < k_exits - 1 and is_history(gates[k + 1])  # head k runs anyway
        head_penalty = 0.0 if forced else mu * rel_head[k] * n
        label = here < cont
        weight = (here - cont).abs()
        forced_cost = mu * rel_head[k] * n if forced else 0.0
        best_gate, best_obj = None, float(cont.sum()) + forced_cost
        kinds = ["stats"] + (["history"] if features == "history" and k >= 1 else [])
        for kind in kinds:
            if kind == "stats":
                x, extra = stats[k], 0.0
            else:  # the previous head's cost, paid for every row (bottom-up: its gate is not known yet)
                agree = (preds[k] == preds[k - 1]).double()[:, None]
                x, extra = torch.cat([stats[k], stats[k - 1], agree], dim=1), mu * rel_head[k - 1] * n
            finite = torch.isfinite(x).all(dim=1)  # NaN rows never exit, whatever the gate
            train = finite & (weight > 0)  # rows with zero weight are indifferent
            if not bool((label & train).any()):
                continue
            if bool(label[train].all()):
                if kind != "stats":
                    continue
                gate = list(ALWAYS_FIRE)
            else:
                gate = _gate_direction(x, label, weight, train)
                offset = _best_offset(_candidate_scores(stack, preds, k, gate, stats32), here - cont)
                if offset is None:
                    continue
                gate = _shift(gate, offset)
            fire = _candidate_scores(stack, preds, k, gate, stats32) >= 0
            obj = float(torch.where(fire, here, cont).sum()) + head_penalty + extra + forced_cost
            if obj < best_obj:
                best_gate, best_obj = gate, obj
        gates[k] = None if best_gate is None else _check_gate(best_gate, k)
        if best_gate is None:
            fire = torch.zeros(n, dtype=torch.bool)
        else:
            fire = _candidate_scores(stack, preds, k, gates[k], stats32) >= 0
        value = exit_value(losses, k, fire, gates[k] is not None or forced, rel_stage, rel_head, mu, value)
    return [None if g is None else (tuple(g) if len(g) == STATS_GATE else list(g)) for g in gates]


def _shift(gate, offset: float) -> list[float]:
    """The gate whose score is the old one minus ``offset`` (for a stats gate: its logit)."""
    return list(gate[:-1]) + [gate[-1] - offset]


def _candidate_scores(stack, preds, k: int, gate, stats=None) -> torch.Tensor:
    """Gate ``k``'s decision score on the dense logits: the logit ``w . stats + b`` for a stats gate
    (float32, as the kernel's reference sums it), :func:`history_scores` for a history gate.
    ``stats``: the exits' float32 :func:`softmax_statistics`, if already computed."""
    g = [float(v) for v in torch.tensor(gate, dtype=torch.float32)]
    s = softmax_statistics(stack[k]) if stats is None else stats[k]
    if len(g) == STATS_GATE:
        return g[0] * s[:, 0] + g[1] * s[:, 1] + g[2] * s[:, 2] + g[3]
    prev = softmax_statistics(stack[k - 1]) if stats is None else stats[k - 1]
    return history_scores(s, g, prev, preds[k] == preds[k - 1])


def decision_scores(exit_logits, gates, statistics=None) -> torch.Tensor:
    """Float32 ``[K, N]``: each gate's score on the dense logits, the row exiting when ``score >= 0``
    (the logit ``w . stats + b`` of a stats gate, :func:`history_scores` of a history gate; NaN for
    disabled gates and the last exit). Moving a gate's bias by ``-t`` (:func:`shift_gates`) makes it
    fire where ``score >= t``: the scores a threshold search over the gates' offsets runs on."""
    stack = stack_logits(exit_logits)
    preds = stack.argmax(dim=2)
    stats = [softmax_statistics(z) for z in stack] if statistics is None else statistics
    out = torch.full(stack.shape[:2], float("nan"))
    for k, gate in enumerate(gates):
        if gate is not None:
            out[k] = _candidate_scores(stack, preds, k, gate, stats)
    return out


def shift_gates(gates, thresholds) -> list:
    """Gates firing where their :func:`decision_scores` ``>= thresholds[k]`` (``inf``: disabled)."""
    out = []
    for k, (gate, t) in enumerate(zip(gates, thresholds)):
        if gate is None or not math.isfinite(t):
            out.append(None)
        else:
            out.append(_check_gate(_shift(gate, float(t)), k))
    return out
