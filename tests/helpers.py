"""Shared test helpers: model builders, input generators and reference computations.

One module instead of a copy per test file (Liger's ``test/utils.py``, FlagGems' ``accuracy_utils.py``).
Fixtures and the tolerance table stay in ``conftest.py``. Test files import these with
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``, as for ``from conftest import ...``).

Every builder is parameterised and seeded: a test file passes its own widths, classes and seeds, so the
model it builds is the one it always built. Builders seed the global RNG (``torch.manual_seed``) before
creating any module, stages first, then heads.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adaexit import Cascade, ConfidencePolicy, EarlyExitNet, ExitHead, NetworkSelectionPolicy, wrap
from adaexit.kernels import exit_gate_torch


# ---------------------------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------------------------
def _scale_heads(heads, head_scale):
    """Scale each head's classifier weights so confidences spread over (0, 1) in untrained models."""
    if head_scale is not None:
        for head in heads:
            head.classifier.weight.data *= head_scale


def mlp_net(widths: Sequence[int], classes: int, policy=None, seed: int = 0, head_scale: float | None = None):
    """An MLP :class:`EarlyExitNet` in eval mode: stage ``k`` is ``Linear(widths[k], widths[k+1]) + ReLU``,
    exit head ``k`` an :class:`ExitHead` on ``widths[k+1]`` features. ``widths[0]`` is the input width."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])]
    heads = [ExitHead(w, classes) for w in widths[1:]]
    _scale_heads(heads, head_scale)
    return EarlyExitNet(stages, heads, policy).eval()


def cnn_net(classes: int, policy=None, seed: int = 0, head_scale: float | None = None):
    """A 3-stage CNN :class:`EarlyExitNet` for ``1x8x8`` inputs, in eval mode: 4 / 8 / 8 channels at
    8 / 4 / 2 px; a pooled-linear head, a conv head and a pooled-linear head."""
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
    ]
    heads = [ExitHead(4, classes), ExitHead.conv(8, classes, width=8), ExitHead(8, classes)]
    _scale_heads(heads, head_scale)
    return EarlyExitNet(stages, heads, policy).eval()


def small_early_exit(dim: int, classes: int, policy=None):
    """A 3-exit MLP :class:`EarlyExitNet` (widths 16) with confident enough heads that every exit is used
    under its default ``maxprob`` thresholds 0.4 / 0.45 on ``randn_inputs(..., scale=3)``."""
    return mlp_net([dim, 16, 16, 16], classes, policy or ConfidencePolicy("maxprob", [0.4, 0.45]), head_scale=3.0)


def small_combination(dim: int, classes: int, policy=None):
    """A cascade MLP -> 3-exit early-exit MLP -> bigger MLP, in eval mode: whole networks (source nodes)
    and carried stages in one graph (5 exits)."""
    torch.manual_seed(1)
    small = nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, classes))
    large = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))
    policy = policy or ConfidencePolicy("maxprob", [0.35, 0.4, 0.4, 0.45])
    return Cascade([small, small_early_exit(dim, classes), large], policy, example_input=torch.zeros(1, dim)).eval()


def skipping_cascade(dim: int, classes: int):
    """A cascade of three MLPs whose routing policy sends rows to any later network (route 2 skips one)."""
    torch.manual_seed(2)
    nets = [nn.Linear(dim, classes), nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes)),
            nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))]
    cascade = Cascade(nets, example_input=torch.zeros(1, dim)).eval()
    policy = NetworkSelectionPolicy().bind_graph(cascade.successors)
    with torch.no_grad():  # random classifiers: every route is taken by some rows
        for c in policy.classifiers:
            c[-1].weight.normal_(0, 3.0)
    return cascade.set_policy(policy)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> nn.Module:
    """``steps`` full-batch Adam steps on the cross-entropy of a plain classifier; returns it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Inputs and data
# ---------------------------------------------------------------------------------------------
def randn_inputs(n: int, shape: int | Sequence[int], seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``n`` rows of standard normal values of per-row ``shape`` (an int for a feature vector), times
    ``scale``, from their own generator seeded with ``seed`` (the global RNG is untouched)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g) * scale


def easy_hard(n: int, seed: int):
    """Easy rows: the label is the sign of x0 (|x0| >= 2; a linear model suffices). Hard rows: x0 ~ 0 and
    the label is XOR(x1 > 0, x2 > 0) (needs a non-linear network). Returns ``x, y, hard``."""
    g = torch.Generator().manual_seed(seed)
    hard = torch.rand(n, generator=g) < 0.5
    y_easy = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g)
    x[:, 1:3] = x[:, 1:3].sign() * (0.25 + x[:, 1:3].abs())
    y_hard = ((x[:, 1] > 0) ^ (x[:, 2] > 0)).long()
    x[:, 0] = torch.where(hard, 0.05 * torch.randn(n, generator=g), (2 * y_easy - 1) * (2 + torch.rand(n, generator=g)))
    return x, torch.where(hard, y_hard, y_easy), hard


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` against labels ``y``."""
    return float((logits.argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------------
# Reference computations
# ---------------------------------------------------------------------------------------------
def dense_scores(model, x: torch.Tensor, criterion: str):
    """Confidence of every exit for every row (``[K, N]``) from the dense ``exit_logits`` and the torch
    reference gate, and those logits."""
    with torch.no_grad():
        logits = model.exit_logits(x)
    return torch.stack([exit_gate_torch(z, None, criterion=criterion)[1] for z in logits]), logits


def first_exit(scores: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """The first exit whose score (``scores[k]``, ``[K, N]``) clears its threshold; the last exit
    always fires."""
    last = scores.shape[0] - 1
    exits = torch.full((scores.shape[1],), last, dtype=torch.long)
    for k in reversed(range(last)):
        exits = torch.where(scores[k] >= thresholds[k], torch.full_like(exits, k), exits)
    return exits


class RowCounter:
    """Forward pre-hook counting the rows (and recording the inputs) each call of ``module`` sees."""

    def __init__(self, module: nn.Module):
        self.rows, self.inputs = 0, []
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows += args[0].shape[0]
        self.inputs.append(args[0].detach().clone())

    def clear(self) -> None:
        """Forget what was seen so far (e.g. FLOP tracing or a dense reference run)."""
        self.rows, self.inputs = 0, []


# ---------------------------------------------------------------------------------------------
# Wrapped models (the torchvision and timm sweeps)
# ---------------------------------------------------------------------------------------------
def median_threshold(scores: torch.Tensor) -> float:
    """A threshold at the median score, placed in the widest gap between the middle scores, so that the
    rounding of a sub-batch cannot move a row across it."""
    s = torch.sort(scores.double()).values
    n = s.shape[0]
    # between rows j and j + 1 of the sorted scores; j = n // 2 - 1 splits them in halves
    j = max(range(n // 2 - 2, n // 2 + 1), key=lambda i: float(s[i + 1] - s[i]) if 0 <= i < n - 1 else -1.0)
    return float((s[j] + s[j + 1]) / 2)


def check_wrap(name: str, model: nn.Module, x: torch.Tensor, exits: Sequence[str]) -> dict:
    """Wrap ``model`` (in eval mode) at ``exits``; assert that the never-exit output is the model's, bit for
    bit, and that under thresholds at each exit's median confidence every row leaves at its first confident
    exit with that exit's dense logits. Returns the exits, their layouts and the exit counts."""
    wrapped = wrap(model, exits=exits, example_input=x[:1])
    assert not wrapped.training, f"{name}: wrap of an eval-mode model must be in eval mode"
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(wrapped(x), reference), f"{name}: never-exit output differs from the model's"
        dense = wrapped.exit_logits(x)
    assert torch.equal(dense[-1], reference)
    scores = torch.stack([exit_gate_torch(z.float(), None)[1] for z in dense])
    thresholds = [median_threshold(scores[k]) for k in range(len(exits))]
    wrapped.set_policy(ConfidencePolicy("maxprob", thresholds))
    with torch.no_grad():
        out, info = wrapped(x, return_info=True)
    want = first_exit(scores, thresholds)
    assert torch.equal(info.exit_index, want), f"{name}: exits {info.exit_index.tolist()} != {want.tolist()}"
    expected = torch.stack(dense)[want, torch.arange(x.shape[0])]
    # sub-batches round differently from the full batch (deep models: up to ~2e-5 on a logit)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    return {"exits": list(exits), "layouts": list(wrapped.layouts), "exit_counts": info.exit_counts}
