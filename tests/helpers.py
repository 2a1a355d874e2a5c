"""Shared test helpers: model builders, input generators and reference computations.

One module instead of a copy per test file (Liger's ``test/utils.py``, FlagGems' ``accuracy_utils.py``).
Fixtures and the tolerance table stay in ``conftest.py``. Test files import these with
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``, as for ``from conftest import ...``).

Every builder is parameterised and seeded: a test file passes its own widths, classes and seeds, so the
model it builds is the one it always built. Builders seed the global RNG (``torch.manual_seed``) before
creating any module, stages first, then heads.
"""

from __future__ import annotations

import io
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
# Small models of every adaptive kind (the contract suite, tests/test_contract.py)
# ---------------------------------------------------------------------------------------------
# Each builder returns ``(adaptive model in eval mode, its underlying model)``: the callable whose output a
# never-exit policy must reproduce (``None`` where there is none: a D2NN's controllers always route).
# ``seed`` picks the weights (two seeds give two different models of the same shape).
VEC_DIM, IMAGE_SHAPE, HF_SHAPE, KIND_CLASSES = 8, (3, 32, 32), (1, 16, 16), 4


def chain_reference(stages, last_head) -> nn.Module:
    """The plain network an early-exit chain was built from: every stage, then the last head."""
    return nn.Sequential(*stages, last_head).eval()


def vec_stages(seed: int, width: int = 16, depth: int = 3) -> list[nn.Module]:
    torch.manual_seed(seed)
    dims = [VEC_DIM] + [width] * depth
    return [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:])]


def early_exit_kind(heads: str, seed: int = 0):
    """A 3-exit MLP :class:`EarlyExitNet` on ``VEC_DIM`` features: ``heads`` ``"exit_head"``
    (:class:`ExitHead`, fused), ``"linear"`` (plain ``nn.Linear``) or ``"mlp"`` (``Linear-ReLU-Linear``)."""
    stages = vec_stages(seed)
    make = {
        "exit_head": lambda: ExitHead(16, KIND_CLASSES),
        "linear": lambda: nn.Linear(16, KIND_CLASSES),
        "mlp": lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, KIND_CLASSES)),
    }[heads]
    head_list = [make() for _ in stages]
    return EarlyExitNet(stages, head_list).eval(), chain_reference(stages, head_list[-1])


def plain_vec_net(seed: int, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(VEC_DIM, hidden), nn.ReLU(), nn.Linear(hidden, KIND_CLASSES)).eval()


def plain_image_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, KIND_CLASSES)).eval()


def wrap_sequential_kind(seed: int = 0, example_input: bool = True):
    """``adaexit.wrap`` on an ``nn.Sequential`` MLP with exits after two of its ReLUs; without
    ``example_input`` its heads are built from the first batch."""
    import adaexit

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(VEC_DIM, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, KIND_CLASSES)).eval()
    example = randn_inputs(2, VEC_DIM, seed=99) if example_input else None
    return adaexit.wrap(model, exits=["1", "3"], example_input=example).eval(), model


def wrap_torchvision_kind(seed: int = 0):
    """``adaexit.wrap`` on torchvision's ResNet-18 (4 classes, 32 x 32 inputs) after layer1 / 2 / 3."""
    import torchvision

    import adaexit

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=KIND_CLASSES).eval()
    example = randn_inputs(2, IMAGE_SHAPE, seed=99)
    return adaexit.wrap(model, exits=["layer1", "layer2", "layer3"], example_input=example).eval(), model


def wrap_timm_kind(seed: int = 0):
    """``adaexit.wrap`` on timm's ResNet-10t (4 classes, 32 x 32 inputs) after layer1 / 2 / 3."""
    import timm

    import adaexit

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=KIND_CLASSES).eval()
    example = randn_inputs(2, IMAGE_SHAPE, seed=99)
    return adaexit.wrap(model, exits=["layer1", "layer2", "layer3"], example_input=example).eval(), model


def hf_classifier(family: str, seed: int = 0) -> nn.Module:
    """A tiny random Hugging Face classifier of ``family`` (4 layers of width 32, ``KIND_CLASSES`` labels)."""
    import transformers as tf

    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                 num_labels=KIND_CLASSES)
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, **small))
    elif family == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(vocab_size=100, **small))
    elif family == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=KIND_CLASSES))
    else:
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, num_channels=1, **small))
    return model.eval()


def hf_layer_names(model: nn.Module, ks=(0, 2)) -> list[str]:
    """Dotted names of encoder layers ``ks``: items of the model's one ``ModuleList`` (its name differs
    across families and transformers versions: ``bert.encoder.layer``, ``vit.layers``...)."""
    prefix = next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
    return [f"{prefix}.{k}" for k in ks]


def wrap_hf_kind(family: str, seed: int = 0):
    """``adaexit.wrap`` on a tiny Hugging Face classifier of ``family``, exits after encoder layers 0 and 2."""
    import adaexit

    model = hf_classifier(family, seed)
    return adaexit.wrap(model, exits=hf_layer_names(model)).eval(), model


def hf_inputs(family: str, n: int, seed: int = 0) -> dict:
    """``n`` rows the family's model takes: right-padded token ids with their attention mask (lengths 1 to
    12, token 1 is padding), or ``pixel_values`` for ViT."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn((n, *HF_SHAPE), generator=g)}
    lengths = torch.randint(1, 13, (n,), generator=g)
    width = int(lengths.max()) if n else 1
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 100, (n, width), generator=g)
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def cascade_kind(first, *rest):
    """``Cascade([first, *rest])`` of already built ``(model, reference)`` pairs; its underlying model is the
    last member's."""
    models = [m for m, _ in (first, *rest)]
    return Cascade(models).eval(), (rest[-1] if rest else first)[1]


def eann_kind(heads: str, seed: int = 0):
    """An :class:`EANN` of two MLP anytime networks (1 and 2 stages); heads as in :func:`early_exit_kind`."""
    from adaexit import EANN

    nets = []
    for i, depth in enumerate((1, 2)):
        stages = vec_stages(seed + 10 * i, depth=depth)
        make = {"exit_head": lambda: ExitHead(16, KIND_CLASSES), "linear": lambda: nn.Linear(16, KIND_CLASSES)}[heads]
        nets.append((EarlyExitNet(stages, [make() for _ in stages]), stages))
    last_net, last_stages = nets[-1]
    return EANN([n for n, _ in nets]).eval(), chain_reference(last_stages, last_net.heads[-1])


def d2nn_kind(topology: str, seed: int = 0):
    """A small D2NN (``"high_low"`` or ``"cascade"``) whose controllers are scaled so rows take every route."""
    from adaexit import cascade_d2nn, high_low_d2nn

    torch.manual_seed(seed)
    model = {"high_low": lambda: high_low_d2nn(VEC_DIM, KIND_CLASSES, width=8, high_width=16),
             "cascade": lambda: cascade_d2nn(VEC_DIM, KIND_CLASSES, widths=(8, 16, 16))}[topology]()
    with torch.no_grad():
        for controller in model.controllers.values():
            controller.out.weight.mul_(4.0)
    return model.eval(), None


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


def round_trip(state: dict) -> dict:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)`` (how users load checkpoints)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
