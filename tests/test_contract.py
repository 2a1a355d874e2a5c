"""The contract every adaptive model keeps, checked on every kind the library builds (PEFT's
``PeftCommonTester`` idea: one list of model kinds, one set of checks, each kind runs all of them).

A kind is one entry of ``KINDS``: a builder from ``tests/helpers.py`` (seed -> ``(adaptive model, underlying
model)``), an input generator and an input of the wrong shape. A new kind joins by adding one entry; a check
a kind cannot pass yet is listed in its ``xfail`` with the exact failure and who owns the fix (strict: a fix
makes the case fail until the entry is removed).

The checks: a dense train-mode forward (every exit's logits, differentiable), the eval-mode forward (one
prediction per row, each equal to the dense logits at the exit it took, one ``ExitInfo``), the same on the
Triton kernels (interpreter), the zero-sync mode, anytime prediction (the same ``ExitInfo``; per-row budgets),
a never-exit policy equal to the underlying model, every row equal to running it alone (batch composition
and order do not matter), an empty batch, ``state_dict`` through ``torch.save`` +
``torch.load(weights_only=True)`` before and after the first batch (the policy's class restored),
``adaexit.stream`` and ``adaexit.Server`` equal to per-batch calls (outputs and ``ExitInfo``), ``calibrate``
running (its policy saved and restored), and bad inputs refused with a message naming the argument or module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pytest
import torch

import adaexit
from adaexit import ConfidencePolicy, ExitInfo, NeverExitPolicy
from adaexit.kernels import set_backend
from helpers import (
    IMAGE_SHAPE,
    KIND_CLASSES,
    VEC_DIM,
    cascade_kind,
    d2nn_kind,
    early_exit_kind,
    eann_kind,
    hf_inputs,
    plain_image_net,
    plain_vec_net,
    randn_inputs,
    round_trip,
    wrap_hf_kind,
    wrap_sequential_kind,
    wrap_timm_kind,
    wrap_torchvision_kind,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N = 12  # rows per test batch


# ---------------------------------------------------------------------------------------------
# The kinds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One kind of adaptive model.

    Attributes:
        name: the test id.
        build: ``seed -> (model in eval mode, underlying model or None)``.
        inputs: ``(rows, seed) -> batch`` as the model takes it (a tensor, or a mapping of keyword tensors).
        bad_input: a batch of the wrong shape.
        needs: an optional package the kind needs (skipped, with the reason, when it is not installed).
        controllers: a D2NN: its controllers route (no exit policy to set, calibrate or turn off).
        xfail: ``check name -> (reason, exception)``: checks known to fail with that exception, the reason
            quoting the failure and naming who owns the fix.
    """

    name: str
    build: Callable[[int], tuple]
    inputs: Callable[[int, int], object]
    bad_input: Callable[[], object]
    needs: str | None = None
    controllers: bool = False
    xfail: dict = field(default_factory=dict)


def vec(n, seed):
    return randn_inputs(n, VEC_DIM, seed, scale=3.0)


def image(n, seed):
    return randn_inputs(n, IMAGE_SHAPE, seed)


def bad_vec():
    return torch.randn(4, VEC_DIM + 3)  # the wrong feature width


def bad_image():
    return torch.randn(4, 5, 32, 32)  # the wrong channel count


def bad_tokens():
    batch = hf_inputs("bert", 4, seed=7)
    return {**batch, "attention_mask": batch["attention_mask"][:, None]}  # a 3-D mask


def bad_pixels():
    return {"pixel_values": torch.randn(4, 3, 16, 16)}  # 3 channels for a 1-channel ViT


EARLY_EXIT_MEMBERS = {  # early-exit kinds that take VEC_DIM features
    "early_exit/exit_heads": partial(early_exit_kind, "exit_head"),
    "early_exit/linear_heads": partial(early_exit_kind, "linear"),
    "early_exit/mlp_heads": partial(early_exit_kind, "mlp"),
    "wrap/sequential": partial(wrap_sequential_kind, example_input=True),
    "wrap/sequential_lazy_heads": partial(wrap_sequential_kind, example_input=False),
}
IMAGE_MEMBERS = {"wrap/torchvision": (wrap_torchvision_kind, "torchvision"), "wrap/timm": (wrap_timm_kind, "timm")}


def plain_vec(seed, hidden=8):
    net = plain_vec_net(seed, hidden)
    return net, net


def plain_image(seed):
    net = plain_image_net(seed)
    return net, net


def cascade_of(*builders):
    """A cascade builder from member builders (each ``seed -> (model, underlying)``)."""
    return lambda seed: cascade_kind(*(b(seed + 100 * i) for i, b in enumerate(builders)))


KINDS: list[Kind] = [
    *[Kind(name, build, vec, bad_vec)
      for name, build in EARLY_EXIT_MEMBERS.items()],
    *[Kind(name, build, image, bad_image, needs=needs)
      for name, (build, needs) in IMAGE_MEMBERS.items()],
    *[Kind(f"wrap/hf_{family}", partial(wrap_hf_kind, family), partial(hf_inputs, family),
           bad_pixels if family == "vit" else bad_tokens, needs="transformers")
      for family in ("bert", "roberta", "distilbert", "vit")],
    Kind("cascade/plain", cascade_of(plain_vec, partial(plain_vec, hidden=16), partial(plain_vec, hidden=32)),
         vec, bad_vec),
    Kind("cascade/early_exit_middle", cascade_of(plain_vec, partial(early_exit_kind, "linear"),
                                                 partial(plain_vec, hidden=32)), vec, bad_vec),
    # the combination: a cascade whose last member is an early-exit model, for every early-exit kind
    *[Kind(f"combination/{name}", cascade_of(plain_vec, build), vec, bad_vec)
      for name, build in EARLY_EXIT_MEMBERS.items()],
    *[Kind(f"combination/{name}", cascade_of(plain_image, build), image, bad_image, needs=needs)
      for name, (build, needs) in IMAGE_MEMBERS.items()],
    Kind("eann/exit_heads", partial(eann_kind, "exit_head"), vec, bad_vec),
    Kind("eann/linear_heads", partial(eann_kind, "linear"), vec, bad_vec),
    Kind("d2nn/high_low", partial(d2nn_kind, "high_low"), vec, bad_vec, controllers=True),
    Kind("d2nn/cascade", partial(d2nn_kind, "cascade"), vec, bad_vec, controllers=True),
]


def cases(check: str) -> list:
    """``KINDS`` as pytest parameters for ``check``: each kind's known failure of it marked strict xfail."""
    out = []
    for kind in KINDS:
        marks = []
        if check in kind.xfail:
            reason, raises = kind.xfail[check]
            marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
        out.append(pytest.param(kind, id=kind.name, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def build(kind: Kind, seed: int = 0):
    if kind.needs:
        pytest.importorskip(kind.needs, reason=f"the {kind.name} kind needs {kind.needs} installed")
    return kind.build(seed)


def call(model, x, **kwargs):
    """``model(x)``, or ``model(**x)`` for keyword inputs."""
    return model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)


def logits_of(out) -> torch.Tensor:
    """The logits of what a model returned (a tensor, or a Hugging Face output with ``.logits``)."""
    return out if isinstance(out, torch.Tensor) else out.logits


def take(x, index):
    """Rows ``index`` of a batch (a tensor, or a mapping of tensors)."""
    index = torch.as_tensor(index, dtype=torch.long)
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def wide_gap_threshold(scores: torch.Tensor) -> float:
    """A threshold between two neighbouring scores, at the widest gap among the middle 30-80% of them, so
    that rows exit on both sides and float rounding (batch vs. alone) cannot move a row across it."""
    s = scores.sort().values
    lo, hi = max(0, int(0.3 * len(s))), max(1, int(0.8 * len(s)))
    i = max(range(lo, hi), key=lambda j: float(s[j + 1] - s[j]))
    return float(s[i] + s[i + 1]) / 2


def spread(kind: Kind, model, x) -> None:
    """Give ``model`` a policy under which ``x``'s rows leave at different exits (a D2NN's controllers
    already spread them)."""
    if kind.controllers:
        return
    with torch.no_grad():
        dense = model.exit_logits(x)
    thresholds = [wide_gap_threshold(torch.softmax(z.float(), 1).amax(1)) for z in dense[:-1]]
    model.set_policy(ConfidencePolicy("maxprob", thresholds))


def same_info(got, want: ExitInfo) -> None:
    """``got`` is the one info type and reports what ``want`` (a per-batch call's) reports."""
    assert isinstance(got, ExitInfo)
    assert torch.equal(got.exit_index, want.exit_index) and got.exit_counts == want.exit_counts
    assert got.flops == pytest.approx(want.flops) and got.full_flops == pytest.approx(want.full_flops)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", cases("train"))
def test_train_forward_is_dense_and_differentiable(kind):
    model, _ = build(kind)
    model.train()
    out = call(model, kind.inputs(N, 0))
    outputs = [out.logits] if kind.controllers else out  # a D2NN trains on sampled rollouts
    assert isinstance(outputs, list) and len(outputs) == (1 if kind.controllers else model.num_exits)
    for z in outputs:
        assert z.shape == (N, KIND_CLASSES) and torch.isfinite(z).all()
    sum(z.sum() for z in outputs).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", cases("eval"))
def test_eval_forward_one_prediction_per_row_at_its_exit(kind):
    model, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        out, info = call(model, x, return_info=True)
    logits = logits_of(out)
    assert isinstance(info, ExitInfo)  # the one info type
    assert logits.shape == (N, KIND_CLASSES)
    assert info.exit_index.shape == (N,) and sum(info.exit_counts) == N
    assert info.exit_counts == torch.bincount(info.exit_index, minlength=len(info.exit_counts)).tolist()
    assert any(0 < r < N for r in info.rows_run), "the test policy should send rows different ways"
    assert 0 < info.flops and 0 < info.full_flops
    if not kind.controllers:  # each row's logits are the dense logits of the exit it took
        with torch.no_grad():
            dense = torch.stack([z.float() for z in model.exit_logits(x)])
        close(logits, dense[info.exit_index, torch.arange(N)])


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", cases("triton"))
def test_the_triton_kernels_route_every_row_as_the_torch_path_does(kind):
    """The same forward on the Triton kernels (the interpreter on CPU): same exits, same logits."""
    pytest.importorskip("triton", reason="the Triton kernels need triton installed")
    model, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        with set_backend("torch"):
            want, want_info = call(model, x, return_info=True)
        with set_backend("triton"):
            got, got_info = call(model, x, return_info=True)
    assert torch.equal(got_info.exit_index, want_info.exit_index)
    close(logits_of(got), logits_of(want))


@pytest.mark.parametrize("kind", cases("anytime"))
def test_anytime_prediction_reports_the_one_info_type(kind):
    if kind.controllers:
        pytest.skip("a D2NN's graph is not a chain of exits, which anytime prediction needs")
    model, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        want, want_info = call(model, x, return_info=True)
        dense = model.exit_logits(x)
    logits, info = adaexit.anytime_predict(model, x)  # no budget: the policy alone decides
    assert isinstance(info, ExitInfo) and info.stop_counts["policy"] == N
    assert torch.equal(info.exit_index, want_info.exit_index)
    assert info.flops == pytest.approx(want_info.flops) and info.full_flops == pytest.approx(want_info.full_flops)
    close(logits, logits_of(want))
    budget = adaexit.AnytimeRunner(model).min_budget(x)  # each row can pay for the first exit only
    logits, info = adaexit.anytime_predict(model, x, per_example_budget=[budget] * N)
    assert (info.exit_index == 0).all() and (info.flops_per_row <= budget).all()
    close(logits, dense[0])
    # never exit by policy (heads skipped on the way): odd rows stop at the first exit for their budget
    model.set_policy(NeverExitPolicy())
    odd = torch.arange(N) % 2 == 1
    budgets = torch.where(odd, budget, float("inf"))
    logits, info = adaexit.anytime_predict(model, x, per_example_budget=budgets)
    assert torch.equal(info.exit_index, torch.where(odd, 0, model.num_exits - 1))
    assert info.stop_counts["example_budget"] == int(odd.sum())
    close(logits, torch.where(odd[:, None], dense[0].float(), dense[-1].float()))


@pytest.mark.parametrize("kind", cases("zero_sync"))
def test_zero_sync_execution_equals_the_default(kind):
    """``set_execution(sync=False)`` (no host sync: buffers of the batch's size, tails masked) changes no
    output and no exit."""
    model, _ = build(kind)
    if kind.controllers:  # refused by name rather than run with corrupted per-row costs
        with pytest.raises(ValueError, match="D2NN.set_execution"):
            model.set_execution(sync=False)
        return
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        want, want_info = call(model, x, return_info=True)
        model.set_execution(sync=False)
        got, got_info = call(model, x, return_info=True)
    assert torch.equal(got_info.exit_index, want_info.exit_index)
    assert got_info.exit_counts == want_info.exit_counts and got_info.flops == pytest.approx(want_info.flops)
    close(logits_of(got), logits_of(want))


@pytest.mark.parametrize("kind", cases("never_exit"))
def test_never_exit_equals_the_underlying_model(kind):
    if kind.controllers:
        pytest.skip("a D2NN has no exit policy to turn off: its controllers always route, so no underlying model")
    model, underlying = build(kind)
    x = kind.inputs(N, 0)
    model.set_policy(NeverExitPolicy())
    with torch.no_grad():
        close(logits_of(call(model, x)), logits_of(call(underlying, x)))


@pytest.mark.parametrize("kind", cases("rows_alone"))
def test_every_row_equals_running_it_alone_in_any_order(kind):
    model, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        out, info = call(model, x, return_info=True)
        logits = logits_of(out)
        for i in range(N):
            alone, alone_info = call(model, take(x, [i]), return_info=True)
            assert int(alone_info.exit_index[0]) == int(info.exit_index[i]), f"row {i}"
            close(logits_of(alone)[0], logits[i])
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
        shuffled, shuffled_info = call(model, take(x, perm), return_info=True)
    assert torch.equal(shuffled_info.exit_index, info.exit_index[perm])
    close(logits_of(shuffled), logits[perm])


@pytest.mark.parametrize("kind", cases("empty"))
def test_empty_batch_gives_empty_output(kind):
    model, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, model, x)
    with torch.no_grad():
        out, info = call(model, take(x, []), return_info=True)
    assert logits_of(out).shape[0] == 0 and info.exit_index.shape == (0,) and sum(info.exit_counts) == 0


def _check_loaded(kind, a, x) -> None:
    """A second model built with other weights loads ``a``'s state (round-tripped) and then computes what
    ``a`` computes, with ``a``'s policy class."""
    b, _ = build(kind, seed=1)
    with torch.no_grad():
        want, want_info = call(a, x, return_info=True)
        before = call(b, x)
    assert not torch.allclose(logits_of(before), logits_of(want)), "seed 1 should build other weights"
    b.load_state_dict(round_trip(a.state_dict()))
    if hasattr(a, "policy"):
        assert type(b.policy) is type(a.policy)
    with torch.no_grad():
        got, got_info = call(b, x, return_info=True)
    assert torch.equal(got_info.exit_index, want_info.exit_index)
    close(logits_of(got), logits_of(want))


@pytest.mark.parametrize("kind", cases("state_dict_fresh"))
def test_state_dict_round_trip_before_the_first_batch(kind):
    a, _ = build(kind)
    state = round_trip(a.state_dict())  # nothing has run yet
    b, _ = build(kind, seed=1)
    b.load_state_dict(state)
    x = kind.inputs(N, 0)
    with torch.no_grad():
        close(logits_of(call(b, x)), logits_of(call(a, x)))


@pytest.mark.parametrize("kind", cases("state_dict_used"))
def test_state_dict_round_trip_after_the_first_batch(kind):
    a, _ = build(kind)
    x = kind.inputs(N, 0)
    spread(kind, a, x)  # a calibrated-like policy, saved with the weights
    _check_loaded(kind, a, x)


def _batches(kind):
    return [kind.inputs(n, seed) for seed, n in enumerate((5, 7, 3, 1), start=1)]


@pytest.mark.parametrize("kind", cases("stream"))
def test_stream_equals_per_batch_calls(kind):
    model, _ = build(kind)
    spread(kind, model, kind.inputs(N, 0))
    batches = _batches(kind)
    with torch.no_grad():
        expected = [logits_of(call(model, b)) for b in batches]
    with torch.no_grad():
        infos = [call(model, b, return_info=True)[1] for b in batches]
    outputs = list(adaexit.stream(model, batches, batch_size=4, return_info=True))
    assert len(outputs) == len(expected)
    for (out, info), e, want in zip(outputs, expected, infos):
        close(logits_of(out), e)
        same_info(info, want)


@pytest.mark.parametrize("kind", cases("server"))
def test_server_equals_per_batch_calls(kind):
    model, _ = build(kind)
    spread(kind, model, kind.inputs(N, 0))
    batches = _batches(kind)
    with torch.no_grad():
        expected = [logits_of(call(model, b)) for b in batches]
        infos = [call(model, b, return_info=True)[1] for b in batches]
    with adaexit.Server(model, batch_size=4, max_wait_ms=1) as server:
        futures = [server.submit(b, return_info=True) for b in batches]
        got = [f.result(timeout=120) for f in futures]
    for (out, info), e, want in zip(got, expected, infos):
        close(logits_of(out), e)
        same_info(info, want)


@pytest.mark.parametrize("kind", cases("calibrate"))
def test_calibrate_runs(kind):
    model, _ = build(kind)
    x = kind.inputs(32, 5)
    y = torch.randint(0, KIND_CLASSES, (32,), generator=torch.Generator().manual_seed(5))
    if kind.controllers:
        with pytest.raises(ValueError, match="D2NN"):
            adaexit.calibrate(model, (x, y), progress=False)
        return
    # confidence=None: a point estimate, so 32 rows can calibrate exits (the guarantee needs more rows)
    result = adaexit.calibrate(model, (x, y), max_accuracy_drop=5.0, confidence=None, progress=False)
    assert model.policy is result.policy
    with torch.no_grad():
        assert logits_of(call(model, x)).shape == (32, KIND_CLASSES)
    _check_loaded(kind, model, x)  # the calibrated policy travels in the state_dict


@pytest.mark.parametrize("kind", cases("bad_input"))
def test_bad_inputs_are_refused_by_name(kind):
    model, _ = build(kind)
    names = model.node_names
    if kind.controllers:
        with pytest.raises(ValueError, match="D2NN"):
            model.set_policy(ConfidencePolicy("maxprob", [0.5]))
    else:
        with pytest.raises(ValueError, match="threshold"):
            model.set_policy(ConfidencePolicy("maxprob", [0.5] * model.num_exits))  # one too many
    with pytest.raises(ValueError):
        call(model, [[1.0, 2.0]]) if not isinstance(kind.inputs(1, 0), dict) else model([[1.0, 2.0]])
    with pytest.raises((ValueError, RuntimeError)) as err:
        with torch.no_grad():
            call(model, kind.bad_input())
    message = str(err.value)
    arguments = ("input_ids", "attention_mask", "pixel_values", "pixel values")  # what a wrapped model takes
    named = [n for n in names if n in message] + [a for a in arguments if a in message]
    assert named, f"the error should name the node or argument at fault: {message}"
    with pytest.raises(ValueError, match="eval"):
        call(model.train(), kind.inputs(2, 0), return_info=True)
