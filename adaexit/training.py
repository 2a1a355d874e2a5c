"""Training multi-exit models: :class:`MultiExitLoss`, its weighting schedules, and ``train`` loops.

A multi-exit model (an :class:`~adaexit.EarlyExitNet`, a cascade) returns, in ``train()`` mode, the
list of every exit's logits. :class:`MultiExitLoss` turns that list into one scalar::

    loss = sum_k w_k * [ (1 - a) * CE(z_k, y) + a * T^2 * KL(softmax(z_K / T) || softmax(z_k / T)) ]

where ``w`` comes from a *weighting schedule* (mean weight 1, so the learning rate means the same
thing whatever the schedule), ``a = distill`` is the self-distillation share for the early exits and
``z_K`` is the last exit's logits, detached (the teacher is never pulled towards its students). The
last exit then gets plain cross-entropy. When the targets carry an outside teacher's logits
(``(labels, teacher_logits)``, e.g. from :func:`teacher_logits`), every exit, the last included,
distils from those instead (knowledge distillation, Hinton et al. 2015): this is how the cheap
members of a cascade learn to agree with the strongest network, which is what lets more rows leave
them within an accuracy budget measured against it.

Weighting schedules are small stateful objects (one call per training step) so other modules can
reuse them (the anytime-prediction module imports :class:`OscillatingWeighting` and
:class:`AdaLossWeighting`):

* :class:`ConstantWeighting` -- every exit weighs 1.
* :class:`LinearWeighting` -- weights grow linearly with depth, ``w_k ∝ k + 1``.
* :class:`AdaLossWeighting` -- AdaLoss (Hu et al., *Anytime Neural Networks*): ``w_k ∝ 1 / mean
  loss of exit k``, the mean being an exponential running average. Minimising ``sum_k L_k / L̄_k`` is
  (to first order) minimising ``sum_k log L_k``: every exit's *relative* improvement counts the same,
  so the cheap, high-loss exits do not drown the deep ones and vice versa.
* :class:`OscillatingWeighting` -- the anytime-network trick of emphasising a different exit over
  the course of training so that no single exit dominates the shared features for long. Three
  schedules: ``"cycle"`` (the emphasised exit goes round-robin, changing every ``period`` steps),
  ``"sample"`` (a seeded random exit per period) and ``"sine"`` (every exit's weight follows a
  cosine of the step with phases spread evenly over the exits, so the weights sum to ``K`` at every
  step).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdaptiveModel
from .cost import module_device
from .data import to_device

try:  # tqdm is a dependency, but training must not break if a minimal install lacks it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

WEIGHTINGS = ("constant", "linear", "adaloss", "oscillating")


# -- weighting schedules ----------------------------------------------------------------------------
class Weighting:
    """A per-step weighting of ``K`` exit losses. Weights are non-negative with mean 1.

    Call it once per training step with the detached per-exit losses (a ``[K]`` tensor); it returns
    the ``[K]`` weights for that step and advances its own state (step count, running means).
    """

    def __init__(self):
        self.step = 0

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"losses must be a non-empty 1-D tensor of per-exit losses, got {tuple(losses.shape)}")
        w = self.weights(losses.detach().float())
        self.step += 1
        return w

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class ConstantWeighting(Weighting):
    """Every exit weighs 1."""

    def weights(self, losses):
        return torch.ones_like(losses)


class LinearWeighting(Weighting):
    """``w_k = 2 (k + 1) / (K + 1)``: grows with depth, mean 1 (the last exit weighs about twice the mean)."""

    def weights(self, losses):
        k = losses.numel()
        return torch.arange(1, k + 1, dtype=losses.dtype, device=losses.device) * (2.0 / (k + 1))


class AdaLossWeighting(Weighting):
    """AdaLoss: ``w_k ∝ 1 / running mean of exit k's loss``, normalised to mean 1.

    Args:
        momentum: weight of the past in the exponential running mean (0 = use this step's losses).
        eps: floor on the running mean, so an exit that reaches zero loss does not get infinite weight.
    """

    def __init__(self, momentum: float = 0.99, eps: float = 1e-3):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.running: torch.Tensor | None = None

    def weights(self, losses):
        finite = torch.isfinite(losses)
        if self.running is None or self.running.shape != losses.shape:
            self.running = torch.where(finite, losses, torch.ones_like(losses))
        else:
            # A non-finite loss (a diverging step) must not poison the running mean.
            update = self.momentum * self.running + (1 - self.momentum) * losses
            self.running = torch.where(finite, update, self.running)
        inv = 1.0 / self.running.clamp_min(self.eps)
        return inv * (inv.numel() / inv.sum())

    def state_dict(self):
        running = None if self.running is None else self.running.tolist()
        return {"step": self.step, "running": running}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.running = None if state.get("running") is None else torch.tensor(state["running"])


class OscillatingWeighting(Weighting):
    """Weights that oscillate over training steps, emphasising one exit (or phase) at a time.

    With ``K`` exits, at step ``t``:

    * ``"cycle"``: the emphasised exit is ``e = (t // period) % K``;
    * ``"sample"``: ``e`` is drawn uniformly (seeded generator) once per ``period`` steps;
    * for both, ``w = (1 - emphasis) + emphasis * K * onehot(e)``;
    * ``"sine"``: ``w_k = 1 + emphasis * cos(2 pi (t / period - k / K))`` (here ``period`` is the
      length of one full oscillation; the phases are spread evenly, so the weights sum to ``K``).

    ``emphasis`` in [0, 1]: 0 is constant weighting, 1 trains only the emphasised exit.
    """

    SCHEDULES = ("cycle", "sample", "sine")

    def __init__(self, schedule: str = "cycle", period: int = 1, emphasis: float = 0.5, seed: int = 0):
        super().__init__()
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        if int(period) < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        if not 0.0 <= emphasis <= 1.0:
            raise ValueError(f"emphasis must be in [0, 1], got {emphasis}")
        self.schedule, self.period, self.emphasis, self.seed = schedule, int(period), float(emphasis), int(seed)
        self._drawn: tuple[int, int] | None = None  # (period index, exit) of the last draw

    def emphasised(self, num_exits: int) -> int:
        """The exit emphasised at the current step (``"cycle"`` and ``"sample"`` schedules)."""
        phase = self.step // self.period
        if self.schedule == "cycle":
            return phase % num_exits
        if self._drawn is None or self._drawn[0] != phase:
            # Seeded by (seed, phase): a resumed run draws the same sequence.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + phase)
            self._drawn = (phase, int(torch.randint(num_exits, (1,), generator=g)))
        return self._drawn[1]

    def weights(self, losses):
        k = losses.numel()
        if self.schedule == "sine":
            phase = self.step / self.period - torch.arange(k, dtype=torch.float64) / k
            w = 1.0 + self.emphasis * torch.cos(2 * math.pi * phase)
            return w.to(losses.dtype).to(losses.device)
        w = torch.full_like(losses, 1.0 - self.emphasis)
        w[self.emphasised(k)] += self.emphasis * k
        return w


def make_weighting(weighting: str | Weighting, **kwargs) -> Weighting:
    """A :class:`Weighting` from its name (``constant``, ``linear``, ``adaloss``, ``oscillating``)."""
    if isinstance(weighting, Weighting):
        if kwargs:
            raise ValueError("weighting options go to the Weighting's constructor when passing an instance")
        return weighting
    classes = {
        "constant": ConstantWeighting,
        "linear": LinearWeighting,
        "adaloss": AdaLossWeighting,
        "oscillating": OscillatingWeighting,
    }
    if weighting not in classes:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a Weighting, got {weighting!r}")
    return classes[weighting](**kwargs)


# -- the loss -------------------------------------------------------------------------------------
def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over rows; the teacher is detached."""
    t = temperature
    log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=1)
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


class MultiExitLoss(nn.Module):
    """Weighted sum of per-exit cross-entropies, with optional self-distillation from the last exit.

    Args:
        num_exits: how many exits the model returns (the loss checks the list it gets).
        weighting: ``"constant"``, ``"linear"``, ``"adaloss"``, ``"oscillating"`` or a :class:`Weighting`.
        distill: share ``a`` in [0, 1] of the early exits' loss that is KL to the last exit's
            (detached) softened prediction instead of cross-entropy. 0 disables distillation.
        temperature: softmax temperature ``T`` of the distillation term (scaled by ``T^2``).
        label_smoothing: passed to the cross-entropy.
        **weighting_kwargs: options of the named weighting (``momentum=``, ``schedule=``, ``period=``...).

    After each call, ``self.last`` holds the detached per-exit cross-entropies, the weights used and
    the distillation terms (for logging).
    """

    def __init__(
        self,
        num_exits: int,
        weighting: str | Weighting = "constant",
        distill: float = 0.0,
        temperature: float = 3.0,
        label_smoothing: float = 0.0,
        **weighting_kwargs,
    ):
        super().__init__()
        if int(num_exits) < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {distill}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_exits = int(num_exits)
        self.weighting = make_weighting(weighting, **weighting_kwargs)
        self.distill, self.temperature, self.label_smoothing = float(distill), float(temperature), label_smoothing
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, outputs, target) -> torch.Tensor:
        """``target``: labels ``[N]``, or ``(labels, teacher_logits [N, C])`` to distil every exit from an
        outside teacher (needs ``distill > 0``)."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        outputs = list(outputs)
        if len(outputs) != self.num_exits:
            raise ValueError(f"MultiExitLoss expects {self.num_exits} exit outputs, got {len(outputs)}")
        labels, teacher = split_target(target)
        if teacher is not None and self.distill == 0:
            raise ValueError("MultiExitLoss: the targets carry teacher logits but distill=0; set distill > 0")
        ce = torch.stack(
            [F.cross_entropy(z.float(), labels, label_smoothing=self.label_smoothing) for z in outputs]
        )
        weights = self.weighting(ce.detach()).to(ce.device)
        per_exit = ce
        kd = torch.zeros_like(ce)
        if teacher is not None:
            if teacher.shape != outputs[-1].shape:
                raise ValueError(f"MultiExitLoss: teacher logits {tuple(teacher.shape)} do not match the "
                                 f"exits' logits {tuple(outputs[-1].shape)}")
            kd = torch.stack([distillation_kl(z, teacher, self.temperature) for z in outputs])
            per_exit = (1 - self.distill) * ce + self.distill * kd
        elif self.distill > 0 and self.num_exits > 1:
            teacher = outputs[-1]
            kd = torch.stack(
                [distillation_kl(z, teacher, self.temperature) for z in outputs[:-1]] + [ce.new_zeros(())]
            )
            mix = torch.full_like(ce, self.distill)
            mix[-1] = 0.0  # the teacher itself learns from labels only
            per_exit = (1 - mix) * ce + mix * kd
        self.last = {"ce": ce.detach(), "weights": weights.detach(), "distill": kd.detach()}
        return (weights * per_exit).sum()


def split_target(target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(labels, teacher_logits or None)`` from a batch's targets: labels, or ``(labels, teacher_logits)``."""
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"targets must be labels or (labels, teacher_logits), got a {len(target)}-tuple")
        return target[0], target[1]
    return target, None


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The teacher's eval-mode logits on every row of ``x`` (fp32, ``[N, C]``), computed once so that
    distillation costs the students nothing per epoch (no augmentation: the inputs never change)."""
    was_training = teacher.training
    teacher.eval()
    try:
        out = [teacher(x[i : i + batch_size]).float() for i in range(0, x.shape[0], batch_size)]
    finally:
        teacher.train(was_training)
    return torch.cat(out).clone()


# -- training loops -------------------------------------------------------------------------------
def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _as_list(outputs) -> list[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _fit(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float,
    loss_fn: Callable,
    *,
    params,
    frozen: nn.Module | None,
    optimizer: str,
    weight_decay: float,
    schedule: str,
    max_steps: int | None,
    progress: bool,
    device,
    desc: str,
) -> dict:
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    device = torch.device(device) if device is not None else module_device(model) or torch.device("cpu")
    model.to(device)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("train: no trainable parameters")
    opt = _optimizer(optimizer, params, lr, weight_decay)
    try:
        steps_per_epoch = len(loader)
    except TypeError:
        steps_per_epoch = None
    if max_steps is not None:
        steps_per_epoch = min(steps_per_epoch or max_steps, max_steps)
    total = (steps_per_epoch or 0) * int(epochs)
    sched = None
    if schedule == "cosine" and total > 0:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=0.15, anneal_strategy="cos",
            div_factor=10.0, final_div_factor=100.0,
        )  # fmt: skip
    history: dict = {"loss": [], "exit_loss": [], "exit_accuracy": [], "steps": 0, "seconds": 0.0}
    was_training = model.training
    start = time.perf_counter()
    try:
        model.train()
        if frozen is not None:
            frozen.eval()  # frozen BatchNorm keeps its running statistics
        for epoch in range(int(epochs)):
            sums, exit_sums, exit_correct, seen = 0.0, None, None, 0
            bar = tqdm(
                total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                disable=not progress or tqdm is None, unit="step", dynamic_ncols=True,
            ) if tqdm is not None else None  # fmt: skip
            for step, (x, y) in enumerate(loader):
                if max_steps is not None and step >= max_steps:
                    break
                x, target = to_device(x, device), to_device(y, device)
                y = split_target(target)[0]
                outputs = _as_list(model(x))
                loss = loss_fn(outputs, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None and sched.last_epoch + 1 < total:
                    sched.step()
                with torch.no_grad():
                    n = y.shape[0]
                    per_exit = torch.stack([F.cross_entropy(z.float(), y) for z in outputs]) * n
                    correct = torch.stack([(z.argmax(1) == y).sum() for z in outputs])
                    exit_sums = per_exit if exit_sums is None else exit_sums + per_exit
                    exit_correct = correct if exit_correct is None else exit_correct + correct
                sums += float(loss.detach()) * n
                seen += n
                history["steps"] += 1
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix(loss=f"{sums / seen:.4f}", acc=f"{float(correct[-1]) / n:.3f}")
            if bar is not None:
                bar.close()
            if seen:
                history["loss"].append(sums / seen)
                history["exit_loss"].append((exit_sums / seen).tolist())
                history["exit_accuracy"].append((exit_correct.double() / seen).tolist())
    finally:
        model.train(was_training)
        history["seconds"] = time.perf_counter() - start
    return history


def train(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    loss: MultiExitLoss | None = None,
    *,
    heads_only: bool = False,
    optimizer: str = "adam",
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    max_steps: int | None = None,
    progress: bool = True,
    device=None,
    desc: str = "train",
) -> dict:
    """Train a multi-exit model whose ``train()``-mode forward returns a list of logits.

    Args:
        model: an :class:`~adaexit.EarlyExitNet`, a cascade, or any module returning a list of logits.
        loader: iterable of ``(x, y)`` batches (e.g. :func:`adaexit.data.make_loader`).
        epochs, lr: passes over ``loader`` and the peak learning rate.
        loss: a :class:`MultiExitLoss` (default: constant weighting over ``model.num_exits`` exits).
        heads_only: freeze the backbone (every node module of ``model.graph()``: parameters and
            BatchNorm statistics) and train only the exit heads (the DeeBERT second stage / SDN
            "IC-only" recipe); the backbone is bit-for-bit unchanged afterwards.
        optimizer: ``"adam"`` (AdamW) or ``"sgd"`` (Nesterov momentum 0.9).
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        schedule: ``"cosine"`` (one-cycle: short warm-up, cosine decay) or ``"constant"``.
        max_steps: cap on steps per epoch (smoke runs).
        progress: show tqdm progress bars.
        device: where to train (default: where the model's parameters are).

    Returns:
        history: ``{"loss": [per epoch], "exit_loss": [per epoch, per exit], "exit_accuracy":
        [per epoch, per exit] (training batches, measured as they go), "steps", "seconds"}``.
    """
    if loss is None:
        if not isinstance(model, AdaptiveModel):
            raise ValueError("train: pass loss=MultiExitLoss(...) for a model that is not an adaexit AdaptiveModel")
        loss = MultiExitLoss(model.num_exits)
    frozen, params = None, list(model.parameters())
    saved_flags = None
    if heads_only:
        if not isinstance(model, AdaptiveModel):
            raise ValueError(f"heads_only=True needs an adaexit AdaptiveModel, got {type(model).__name__}")
        nodes = model.graph()
        heads = nn.ModuleList(dict.fromkeys(n.head for n in nodes if n.head is not None))
        head_params = {id(p) for p in heads.parameters()}
        backbone = [p for p in model.parameters() if id(p) not in head_params]
        saved_flags = [(p, p.requires_grad) for p in backbone]
        for p in backbone:
            p.requires_grad_(False)
        frozen, params = nn.ModuleList(n.module for n in nodes), list(heads.parameters())
    try:
        return _fit(
            model, loader, epochs, lr, loss, params=params, frozen=frozen, optimizer=optimizer,
            weight_decay=weight_decay, schedule=schedule, max_steps=max_steps, progress=progress,
            device=device, desc=desc,
        )  # fmt: skip
    finally:
        for p, flag in saved_flags or ():
            p.requires_grad_(flag)


def train_classifier(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    *,
    label_smoothing: float = 0.0,
    distill: float = 0.0,
    temperature: float = 3.0,
    optimizer: str = "adam",
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    max_steps: int | None = None,
    progress: bool = True,
    device=None,
    desc: str = "train",
) -> dict:
    """Train a single network (``model(x) -> logits``) with cross-entropy; same options as :func:`train`.

    To distil from a teacher, let ``loader`` yield ``(x, (labels, teacher_logits))`` (e.g.
    ``make_loader(x, (y, teacher_logits(teacher, x)))``) and set ``distill`` (the KL share) and
    ``temperature``; see :class:`MultiExitLoss`."""
    loss = MultiExitLoss(1, distill=distill, temperature=temperature, label_smoothing=label_smoothing)
    return _fit(
        model, loader, epochs, lr, loss, params=model.parameters(), frozen=None, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, max_steps=max_steps, progress=progress,
        device=device, desc=desc,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> list[float]:
    """Accuracy of every exit (dense) on ``(x, y)``: a list with one float per exit.

    Uses ``model.exit_logits`` for adaptive models (every exit), else ``model(x)``.
    """
    was_training = model.training
    model.eval()
    correct = None
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            outs = model.exit_logits(xb) if isinstance(model, AdaptiveModel) else _as_list(model(xb))
            c = torch.tensor([int((z.argmax(1) == yb).sum()) for z in outs])
            correct = c if correct is None else correct + c
    finally:
        model.train(was_training)
    if correct is None:
        return []
    return (correct.double() / x.shape[0]).tolist()
