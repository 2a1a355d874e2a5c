"""Bolukbasi et al. (2017)'s learned exit policy: one linear gate per early exit on the exit's softmax
statistics, fitted bottom-up (from the last early exit to the first) as weighted binary classification.

The gate is evaluated inside the fused exit-gate kernel (``criterion="learned"``), so a learned gate
costs what a confidence threshold costs. The fitting runs on dense exit logits, with the exact
simulation of :mod:`adaexit.simulation`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..simulation import (
    check_costs,
    check_labels,
    exit_losses,
    exit_statistics,
    exit_value,
    fire_mask,
    learned_scores,
    relative_costs,
    stack_logits,
)
from .base import Policy

#: Gate that always fires (on rows with finite statistics): ``sigmoid(8) >= 0.5``.
ALWAYS_FIRE = (0.0, 0.0, 0.0, 8.0)


def _check_gate(gate, k: int):
    """A gate is ``None`` (exit disabled) or 4 finite floats ``(w_maxprob, w_margin, w_entropy, bias)``."""
    if gate is None:
        return None
    values = [float(v) for v in (gate.tolist() if isinstance(gate, torch.Tensor) else gate)]
    if len(values) != 4:
        raise ValueError(f"gates[{k}] must have 4 values (w_maxprob, w_margin, w_entropy, bias), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"gates[{k}] must be finite, got {values}")
    # stored as the float32 values the kernel will use, so a save/load round trip is exact
    return [float(v) for v in torch.tensor(values, dtype=torch.float32)]


class LearnedPolicy(Policy):
    """Bolukbasi et al. (2017): one learned linear gate per early exit; the last exit always fires.

    Gate ``k`` reads exit ``k``'s softmax statistics ``s = [maxprob, margin, entropy score]`` and exits
    a row when ``sigmoid(w . s + b) >= 0.5``. It is evaluated inside the fused exit-gate kernel
    (``criterion="learned"``), so a learned gate costs what a confidence threshold costs.

    Args:
        gates: one per early exit (``len == num_exits - 1``): 4 floats ``(w_maxprob, w_margin,
            w_entropy, b)``, or ``None`` for a gate that never fires (its head is then skipped). ``None``
            for the whole argument: every gate disabled until fitted (:meth:`fit`) or loaded from a
            ``state_dict``.

    Fit gates with :meth:`fit` (bottom-up weighted logistic regression) or let :func:`adaexit.calibrate`
    sweep the cost multiplier. Gates live in ``state_dict()`` as plain lists of float32 values.
    """

    def __init__(self, gates=None):
        super().__init__()
        self._unset = gates is None
        self.gates = [] if gates is None else [_check_gate(g, k) for k, g in enumerate(gates)]
        self._tensors: dict = {}  # device -> [4] float32 gate tensors, so decide() copies nothing

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
    def fit(cls, exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss: str = "error"):
        """Learn the gates bottom-up from dense exit logits (see
        :func:`fit_learned_gates`).

        Args:
            exit_logits: one ``[N, C]`` tensor per exit (``model.exit_logits(x)``).
            labels: ``[N]`` class indices.
            stage_costs, head_costs: per-example cost of each stage and head (``model.exit_costs``).
            cost_weight: ``mu``: the objective per example is ``loss + mu * cost / full_cost``; a larger
                ``mu`` exits earlier (cheaper, usually less accurate).
            loss: ``"error"`` (0/1) or ``"ce"`` (cross-entropy) of each exit.
        """
        return cls(fit_learned_gates(exit_logits, labels, stage_costs, head_costs, cost_weight, loss))

    def needs_head(self, k: int) -> bool:
        return self._is_last(k) or self.gates[k] is not None

    def _gate_tensor(self, k: int, device: torch.device) -> torch.Tensor:
        cached = self._tensors.get(device)
        if cached is None:
            cached = [None if g is None else torch.tensor(g, dtype=torch.float32, device=device) for g in self.gates]
            self._tensors[device] = cached
        return cached[k]

    def decide(self, k, head, h, state):
        if self._is_last(k):
            logits, _, exit_mask = head.gate(h, "maxprob", -math.inf)
            return logits, torch.ones_like(exit_mask), state
        logits, _, exit_mask = head.gate(h, "learned", 0.5, gate=self._gate_tensor(k, h.device))
        return logits, exit_mask, state

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


# ---------------------------------------------------------------------------------------------
# Fitting: bottom-up weighted logistic regression
# ---------------------------------------------------------------------------------------------
# =============================================================================================
# Learned gates (Bolukbasi et al. 2017): bottom-up weighted logistic regression
# =============================================================================================
def _weighted_logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float = 1e-3, steps: int = 200):
    """Fit ``sigmoid(x @ a + b)`` to labels ``y`` with example weights ``w``; returns ``(a, b)`` in the
    units of ``x`` (fitted on standardised features, then folded back)."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    w = w / w.sum()
    pos = min(max(float((w * y).sum()), 1e-6), 1 - 1e-6)
    a = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(math.log(pos / (1 - pos)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xs @ a + b
        loss = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() + l2 * (a * a).sum()
        loss.backward()
        return loss

    opt.step(closure)
    a, b = a.detach(), b.detach()
    return a / std, b - (a * mean / std).sum()


def _gate_objective(decide, here, cont, head_penalty: float) -> float:
    return float(torch.where(decide, here, cont).sum()) + head_penalty * decide.shape[0]


def fit_learned_gates(
    exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss: str = "error"
) -> list[tuple[float, float, float, float] | None]:
    """Learn one gate per early exit, bottom-up (Bolukbasi et al. 2017); see :meth:`LearnedPolicy.fit`.

    For exit ``k``, from the last early exit to the first, with the gates below already fixed: for
    every example, ``here = loss_k + mu * 0`` (exit now) and ``continue = the cost of the stages and
    heads it would run next + the loss at the exit the fixed downstream gates send it to`` (costs as
    fractions of the full model, times ``mu = cost_weight``). Label: exiting is strictly better; weight:
    ``|here - continue|``. A weighted logistic regression on the exit's softmax statistics
    ``[maxprob, margin, entropy score]`` gives ``(w, b)``; the gate fires when ``sigmoid(w . stats + b)
    >= 0.5``. A gate is disabled (``None``, its head never evaluated) when no example is better off
    exiting, or when the fitted gate does not pay for its head's cost on the data.
    """
    stack = stack_logits(exit_logits)
    k_exits, n, classes = stack.shape
    labels = check_labels(labels, n, classes)
    if n == 0:
        raise ValueError("fit_learned_gates needs at least one example")
    if not (math.isfinite(float(cost_weight)) and float(cost_weight) >= 0):
        raise ValueError(f"cost_weight must be finite and >= 0, got {cost_weight}")
    rel_stage, rel_head = relative_costs(*check_costs(stage_costs, head_costs, k_exits))
    losses = exit_losses(stack, labels, loss)
    mu = float(cost_weight)

    gates: list = [None] * (k_exits - 1)
    value = exit_value(losses, k_exits - 1, None, True, rel_stage, rel_head, mu, None)
    for k in range(k_exits - 2, -1, -1):
        here = losses[k]
        cont = value  # the stage-k cost is paid either way
        head_penalty = mu * rel_head[k]
        stats = exit_statistics(stack[k])
        finite = torch.isfinite(stats).all(dim=1)  # NaN rows never exit, whatever the gate
        label = (here < cont) & finite
        weight = (here - cont).abs()
        gate, fire = None, torch.zeros(n, dtype=torch.bool)
        # rows with zero weight are indifferent: they do not pull the gate either way
        train = finite & (weight > 0)
        if bool(label.any()):
            if bool(label[train].all()):
                gate = ALWAYS_FIRE
            else:
                x = stats[train].double()
                a, b = _weighted_logistic(x, label[train].double(), weight[train])
                gate = _centre_gate(a, b, stats[finite].double())
            fire = fire_mask(learned_scores(stack[k : k + 1], [gate])[0], 0.5)
            # keep the gate only if it beats never exiting here, head cost included
            if _gate_objective(fire, here, cont, head_penalty) >= float(cont.sum()):
                gate, fire = None, torch.zeros(n, dtype=torch.bool)
        value = exit_value(losses, k, fire, gate is not None, rel_stage, rel_head, mu, value)
        gates[k] = gate
    return gates


def _centre_gate(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float, float]:
    """Move the bias so the boundary sits mid-way between the nearest training rows on either side
    (same decisions on the data, the largest local margin against rounding), as float32 values."""
    z = x @ a + b
    below, above = z[z < 0], z[z >= 0]
    if below.numel() and above.numel():
        b = b - (float(below.max()) + float(above.min())) / 2
    return tuple(float(v) for v in torch.cat([a, b.reshape(1)]).float())
