"""MultiExitLoss, its weighting schedules, and the training loops (heads-only freezing included)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaexit import EarlyExitNet, ExitHead
from adaexit.data import make_loader
from adaexit.training import (
    AdaLossWeighting,
    ConstantWeighting,
    LinearWeighting,
    MultiExitLoss,
    OscillatingWeighting,
    distillation_kl,
    evaluate,
    make_weighting,
    train,
    train_classifier,
)


def _tiny_net(num_classes=3, width=8, in_features=6):
    stages = [
        nn.Sequential(nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    ]
    heads = [ExitHead(width, num_classes) for _ in stages]
    return EarlyExitNet(stages, heads)


def _blobs(n=240, classes=3, dim=6, seed=0):
    """Separable Gaussian blobs: a task a tiny network learns in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


# -- weightings -------------------------------------------------------------------------------------
def test_constant_weighting_is_all_ones():
    w = ConstantWeighting()(torch.tensor([3.0, 1.0, 0.2]))
    assert torch.equal(w, torch.ones(3))


def test_linear_weighting_grows_with_depth_and_has_mean_one():
    w = LinearWeighting()(torch.tensor([3.0, 1.0, 0.2, 0.1]))
    torch.testing.assert_close(w, torch.tensor([1, 2, 3, 4.0]) * 2 / 5)
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)


def test_adaloss_weights_are_inverse_to_the_losses_on_the_first_step():
    losses = torch.tensor([2.0, 1.0, 0.5])
    w = AdaLossWeighting(momentum=0.9)(losses)
    # w ∝ 1/L, mean 1: (0.5, 1, 2) / (3.5 / 3)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 2.0]) * 3 / 3.5)


def test_adaloss_follows_the_running_losses():
    ada = AdaLossWeighting(momentum=0.5)
    ada(torch.tensor([1.0, 1.0]))
    w = ada(torch.tensor([3.0, 1.0]))  # running mean becomes (2, 1)
    torch.testing.assert_close(ada.running, torch.tensor([2.0, 1.0]))
    assert w[1] > w[0]
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0]) * 2 / 1.5)
    # After many steps where exit 0 improves a lot, its weight overtakes exit 1's.
    for _ in range(50):
        w = ada(torch.tensor([0.1, 1.0]))
    assert w[0] > w[1]


def test_adaloss_ignores_non_finite_losses():
    ada = AdaLossWeighting(momentum=0.5)
    ada(torch.tensor([1.0, 2.0]))
    w = ada(torch.tensor([float("nan"), 2.0]))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(ada.running, torch.tensor([1.0, 2.0]))


def test_oscillating_cycle_emphasises_each_exit_in_turn():
    osc = OscillatingWeighting("cycle", period=2, emphasis=0.5)
    losses = torch.ones(3)
    heavy = [int(osc(losses).argmax()) for _ in range(12)]
    assert heavy == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    w = OscillatingWeighting("cycle", emphasis=0.5)(losses)
    torch.testing.assert_close(w, torch.tensor([0.5 + 1.5, 0.5, 0.5]))


def test_oscillating_sample_is_seeded_and_changes_over_steps():
    a = OscillatingWeighting("sample", period=1, emphasis=1.0, seed=3)
    b = OscillatingWeighting("sample", period=1, emphasis=1.0, seed=3)
    wa = [a(torch.ones(4)) for _ in range(30)]
    wb = [b(torch.ones(4)) for _ in range(30)]
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert len({int(w.argmax()) for w in wa}) > 1  # the emphasis moves between exits
    assert all(float(w.sum()) == pytest.approx(4.0) for w in wa)


@given(step=st.integers(0, 10_000), k=st.integers(2, 8), emphasis=st.floats(0, 1), period=st.integers(1, 50))
@settings(max_examples=60, deadline=None)
def test_oscillating_sine_weights_are_non_negative_with_mean_one(step, k, emphasis, period):
    osc = OscillatingWeighting("sine", period=period, emphasis=emphasis)
    osc.step = step
    w = osc(torch.ones(k))
    assert (w >= -1e-6).all()
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)


def test_oscillating_sine_changes_over_steps():
    osc = OscillatingWeighting("sine", period=8, emphasis=0.8)
    ws = [osc(torch.ones(3)) for _ in range(8)]
    assert not torch.allclose(ws[0], ws[2])
    assert int(ws[0].argmax()) != int(ws[3].argmax())


def test_weighting_state_round_trips():
    ada = AdaLossWeighting(momentum=0.7)
    for losses in ([1.0, 2.0], [0.5, 1.0]):
        ada(torch.tensor(losses))
    fresh = AdaLossWeighting(momentum=0.7)
    fresh.load_state_dict(ada.state_dict())
    torch.testing.assert_close(fresh(torch.tensor([0.3, 0.4])), ada(torch.tensor([0.3, 0.4])))
    assert fresh.step == ada.step == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: make_weighting("cubic"), "weighting must be one of"),
        (lambda: AdaLossWeighting(momentum=1.0), "momentum"),
        (lambda: OscillatingWeighting("square"), "schedule"),
        (lambda: OscillatingWeighting(period=0), "period"),
        (lambda: OscillatingWeighting(emphasis=1.5), "emphasis"),
        (lambda: MultiExitLoss(0), "num_exits"),
        (lambda: MultiExitLoss(2, distill=2.0), "distill"),
        (lambda: MultiExitLoss(2, temperature=0.0), "temperature"),
        (lambda: ConstantWeighting()(torch.ones(2, 2)), "1-D"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- the loss ---------------------------------------------------------------------------------------
def test_multi_exit_loss_is_the_weighted_sum_of_cross_entropies():
    torch.manual_seed(1)
    outs = [torch.randn(16, 5) for _ in range(3)]
    y = torch.randint(5, (16,))
    ce = torch.stack([F.cross_entropy(z, y) for z in outs])
    torch.testing.assert_close(MultiExitLoss(3)(outs, y), ce.sum())
    torch.testing.assert_close(MultiExitLoss(3, "linear")(outs, y), (ce * torch.tensor([0.5, 1.0, 1.5])).sum())
    loss = MultiExitLoss(3, "adaloss")
    torch.testing.assert_close(loss(outs, y), (ce * (1 / ce) * 3 / (1 / ce).sum()).sum())
    torch.testing.assert_close(loss.last["ce"], ce)


def test_multi_exit_loss_checks_the_number_of_exits():
    with pytest.raises(ValueError, match="expects 3 exit outputs, got 2"):
        MultiExitLoss(3)([torch.randn(4, 2)] * 2, torch.zeros(4, dtype=torch.long))


def test_distillation_term_is_zero_when_exits_agree():
    z = torch.randn(8, 4)
    y = torch.randint(4, (8,))
    assert float(distillation_kl(z, z.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    loss = MultiExitLoss(3, distill=0.5)
    value = loss([z, z.clone(), z.clone()], y)
    assert torch.allclose(loss.last["distill"], torch.zeros(3), atol=1e-6)
    # agreeing exits: the loss is (1 - a) * CE for the early exits, CE for the last
    ce = F.cross_entropy(z, y)
    torch.testing.assert_close(value, ce * (0.5 + 0.5 + 1.0))


def test_distillation_pulls_early_exits_towards_the_detached_last_exit():
    torch.manual_seed(2)
    early = torch.randn(8, 4, requires_grad=True)
    last = torch.randn(8, 4, requires_grad=True)
    y = torch.randint(4, (8,))
    loss = MultiExitLoss(2, distill=1.0)
    loss([early, last], y).backward()
    assert float(loss.last["distill"][0]) > 0
    # with distill=1 the early exit learns only from the teacher; the teacher only from the labels
    expected_last = torch.autograd.grad(F.cross_entropy(last, y), last)[0]
    torch.testing.assert_close(last.grad, expected_last)
    step = early.detach() - 0.5 * early.grad
    before = distillation_kl(early.detach(), last.detach(), 3.0)
    assert float(distillation_kl(step, last.detach(), 3.0)) < float(before)


def test_outside_teacher_distils_every_exit_the_last_included():
    torch.manual_seed(3)
    outs = [torch.randn(8, 4) for _ in range(2)]
    teacher, y = torch.randn(8, 4), torch.randint(4, (8,))
    loss = MultiExitLoss(2, distill=0.25, temperature=2.0)
    value = loss(outs, (y, teacher))
    ce = torch.stack([F.cross_entropy(z, y) for z in outs])
    kd = torch.stack([distillation_kl(z, teacher, 2.0) for z in outs])
    torch.testing.assert_close(value, (0.75 * ce + 0.25 * kd).sum())
    torch.testing.assert_close(loss.last["distill"], kd)
    with pytest.raises(ValueError, match="distill=0"):
        MultiExitLoss(2)(outs, (y, teacher))
    with pytest.raises(ValueError, match="teacher logits"):
        loss(outs, (y, torch.randn(8, 5)))


def test_train_classifier_distils_a_student_towards_its_teacher():
    """A student trained on the teacher's logits alone (distill=1) learns the teacher's decisions, even
    where the labels disagree with it."""
    x, y = _blobs(n=240)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 3))
    teacher_logits = teacher(x).detach() * 5
    wrong = (y + 1) % 3  # labels the student must ignore with distill=1
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    loader = make_loader(x, (wrong, teacher_logits), batch_size=32, seed=0)
    train_classifier(student, loader, epochs=30, lr=1e-2, distill=1.0, temperature=1.0, progress=False)
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher_logits.argmax(1)).double().mean()
        with_labels = (student(x).argmax(1) == wrong).double().mean()
    assert agree > 0.9 and with_labels < 0.5


# -- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["constant", "linear", "adaloss", "oscillating"])
def test_training_lowers_the_loss_of_every_exit(weighting):
    x, y = _blobs()
    model = _tiny_net()
    loss = MultiExitLoss(3, weighting, distill=0.3 if weighting == "linear" else 0.0)
    before = [F.cross_entropy(z, y).item() for z in model.eval().exit_logits(x)]
    hist = train(model, make_loader(x, y, 32), epochs=8, lr=2e-2, loss=loss, progress=False)
    after = [F.cross_entropy(z, y).item() for z in model.eval().exit_logits(x)]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert len(hist["loss"]) == 8 and hist["steps"] == 8 * 8
    assert len(hist["exit_accuracy"][-1]) == 3
    assert min(evaluate(model, x, y)) > 0.8


def test_heads_only_leaves_the_backbone_bit_for_bit_unchanged():
    x, y = _blobs()
    model = _tiny_net()
    backbone = {k: v.clone() for k, v in model.stages.state_dict().items()}  # BN statistics included
    heads = {k: v.clone() for k, v in model.heads.state_dict().items()}
    train(model, make_loader(x, y, 32), epochs=2, lr=1e-2, heads_only=True, progress=False)
    for k, v in model.stages.state_dict().items():
        assert torch.equal(v, backbone[k]), f"backbone tensor {k} changed"
    assert any(not torch.equal(v, heads[k]) for k, v in model.heads.state_dict().items())
    # freezing is temporary: afterwards the backbone trains again
    assert all(p.requires_grad for p in model.stages.parameters())
    assert model.training


def test_heads_only_needs_stages_and_heads():
    x, y = _blobs(32)
    with pytest.raises(ValueError, match="heads_only"):
        train(nn.Linear(6, 3), make_loader(x, y, 8), loss=MultiExitLoss(1), heads_only=True, progress=False)


def test_train_classifier_lowers_the_loss_and_respects_max_steps():
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    before = F.cross_entropy(model(x), y).item()
    hist = train_classifier(model, make_loader(x, y, 32), epochs=2, lr=1e-2, max_steps=5, progress=False)
    assert hist["steps"] == 10
    assert F.cross_entropy(model(x), y).item() < before


def test_training_is_deterministic():
    x, y = _blobs()
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        model = _tiny_net()
        train(model, make_loader(x, y, 32, seed=1), epochs=1, lr=1e-2, loss=MultiExitLoss(3, "oscillating"),
              progress=False)
        results.append({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


@pytest.mark.parametrize(
    "kwargs, message",
    [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"optimizer": "lbfgs"}, "optimizer"),
     ({"schedule": "step"}, "schedule")],
)
def test_train_rejects_bad_arguments(kwargs, message):
    x, y = _blobs(32)
    args = {"epochs": 1, "lr": 1e-2, **kwargs}
    with pytest.raises(ValueError, match=message):
        train(_tiny_net(), make_loader(x, y, 8), progress=False, **args)
