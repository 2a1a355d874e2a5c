"""Any nn.Module as an exit head (issue 10): the gate views of ``adaexit.heads.exit_head``, fused where that is
exact, and EarlyExitNet with plain-module heads row by row."""

import pytest
import torch
from torch import nn

from adaexit import AdaptiveModel, ConfidencePolicy, EarlyExitNet, ExitHead, LogitsHead, anytime_predict
from adaexit.heads import (
    ChannelsFirst,
    FusedLinearView,
    HeadView,
    SelectToken,
    TokensAsChannels,
    exit_head,
    logits_gate,
)
from adaexit.kernels import exit_gate
from adaexit.kernels.ops.exit_gate import _collapse_spatial
from helpers import dense_scores, first_exit, randn_inputs

CLASSES = 5


def pooled_head(channels: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES))


def test_exit_head_picks_the_view():
    head = ExitHead(8, CLASSES)
    assert exit_head(head) is head and exit_head(LogitsHead(CLASSES)).num_classes == CLASSES
    assert isinstance(exit_head(nn.Linear(8, CLASSES)), FusedLinearView)
    assert isinstance(exit_head(pooled_head()), FusedLinearView)
    with_dropout = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, CLASSES))
    assert isinstance(exit_head(with_dropout), FusedLinearView)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    view = exit_head(mlp)
    assert type(view) is HeadView and view.num_classes == CLASSES
    assert type(exit_head(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)))) is HeadView
    with pytest.raises(ValueError, match="must be an nn.Module"):
        exit_head(lambda h: h)


@pytest.mark.parametrize("criterion", ["maxprob", "margin", "entropy"])
def test_linear_view_is_the_fused_gate_and_exact_on_the_torch_path(criterion):
    linear = nn.Linear(16, CLASSES)
    h = torch.randn(9, 16)
    with torch.no_grad():
        logits, score, mask = exit_head(linear).gate(h, criterion, 0.3)
        ref_logits, ref_score, ref_mask = logits_gate(linear(h), criterion, 0.3)
    assert torch.equal(logits, ref_logits) and torch.equal(score, ref_score) and torch.equal(mask, ref_mask)


def test_pooled_sequential_view_equals_the_torch_head():
    """The kernel mean-pools the map itself: equal to AdaptiveAvgPool2d + Flatten + Linear up to rounding."""
    head = pooled_head(8)
    h = torch.randn(7, 8, 5, 3)
    with torch.no_grad():
        logits, score, _ = exit_head(head).gate(h, "entropy", 0.5)
        ref_logits, ref_score, _ = logits_gate(head(h), "entropy", 0.5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["linear", "pooled", "nhwc", "token"])
def test_views_through_the_triton_kernel(triton_backend, kind):
    """Under the interpreter the fused views run the Triton kernel on strided views, with no copy."""
    if kind == "linear":
        head, h = nn.Linear(16, CLASSES), torch.randn(6, 16)
    elif kind == "pooled":
        head, h = pooled_head(8), torch.randn(6, 8, 4, 4)
    elif kind == "nhwc":  # Swin's channels-last map, read through a channels-first view
        head, h = ExitHead(8, CLASSES, features=ChannelsFirst()), torch.randn(6, 3, 5, 8)
        view = head.features(h)
        assert view.data_ptr() == h.data_ptr() and _collapse_spatial(view)[0] is view  # pooled in place
    else:  # a ViT's class token, a [N, D] strided view
        head, h = ExitHead(8, CLASSES, features=SelectToken(0)), torch.randn(6, 5, 8)
    with torch.no_grad():
        logits, score, _ = exit_head(head).gate(h, "maxprob", 0.5)
        ref = head(h)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, torch.softmax(ref, 1).max(1).values, rtol=1e-4, atol=1e-5)


def test_layout_readers_are_views():
    h = torch.randn(2, 3, 4, 5)
    assert ChannelsFirst()(h).shape == (2, 5, 3, 4) and ChannelsFirst()(h).data_ptr() == h.data_ptr()
    t = torch.randn(2, 7, 6)
    assert torch.equal(SelectToken(0)(t), t[:, 0]) and TokensAsChannels()(t).shape == (2, 6, 7)
    head = ExitHead(6, CLASSES, features=TokensAsChannels())  # no class token: the mean over the tokens
    torch.testing.assert_close(head(t), head.classifier(t.mean(1)))


def test_a_training_dropout_falls_back_to_torch():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, CLASSES)).train()
    h = torch.randn(64, 8, 2, 2)
    torch.manual_seed(3)
    logits, _, _ = exit_head(head).gate(h, "maxprob", 0.5)
    torch.manual_seed(3)
    assert torch.equal(logits, head(h))  # the same dropout draw: computed by the head itself


def test_a_head_must_give_two_dim_logits():
    with pytest.raises(ValueError, match=r"must map its features to logits \[N, classes\]; got \(3, 4, 5\)"):
        exit_head(nn.Sequential(nn.ReLU(), nn.Linear(4, 5))).gate(torch.randn(3, 4, 4), "maxprob", 0.5)


def mixed_head_net(policy=None) -> EarlyExitNet:
    """Three stages on [N, 1, 8, 8] images; heads: a Linear on flattened features, the user's pooled
    Sequential and an MLP (torch logits, then the gate)."""
    torch.manual_seed(0)
    stages = [
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten()),
    ]
    heads = [pooled_head(8), nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES)),
             nn.Sequential(nn.Linear(12 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, CLASSES))]
    return EarlyExitNet(stages, heads, policy).eval()


def test_early_exit_net_with_plain_module_heads_row_by_row():
    """Issue 10's done-when: EarlyExitNet(stages, [nn.Linear ...], policy) in eval mode gives each row the
    result of running it alone; nothing is lost."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(12, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
              nn.Linear(16, 16)]
    model = EarlyExitNet(stages, [nn.Linear(16, CLASSES) for _ in stages]).eval()
    assert [k for k in model.state_dict() if k.startswith("heads.0")] == ["heads.0.weight", "heads.0.bias"]
    for model, shape in ((model, 12), (mixed_head_net(), (1, 8, 8))):
        x = randn_inputs(23, shape, seed=1, scale=3)
        scores, dense = dense_scores(model, x, "maxprob")
        thresholds = [float(scores[k].median()) + 1e-4 for k in range(2)]
        model.set_policy(ConfidencePolicy("maxprob", thresholds))
        with torch.no_grad():
            out, info = model(x, return_info=True)
        want = first_exit(scores, thresholds)
        assert torch.equal(info.exit_index, want) and 0 < info.exit_counts[0] < 23
        torch.testing.assert_close(out, torch.stack(dense)[want, torch.arange(23)], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for i in range(x.shape[0]):
                alone, alone_info = model(x[i : i + 1], return_info=True)
                assert alone_info.exit_index.item() == want[i].item()
                torch.testing.assert_close(alone[0], out[i], rtol=1e-5, atol=1e-6)


def test_costs_and_anytime_see_through_the_views():
    model = mixed_head_net(ConfidencePolicy("maxprob", [0.5, 0.5]))
    x = randn_inputs(6, (1, 8, 8))
    stage_flops, head_flops = model.exit_costs(x)
    assert head_flops == [2 * 8 * CLASSES, 2 * 128 * CLASSES, 2 * (48 * 16 + 16 * CLASSES)]
    assert all(f > 0 for f in stage_flops)
    assert len(model.exit_costs(x, "latency")[1]) == 3
    with torch.no_grad():  # a budget that pays for the first exit only: every row answers there
        logits, info = anytime_predict(model, x, budget_flops=6 * (stage_flops[0] + head_flops[0]))
    assert logits.shape == (6, CLASSES) and info.exit_counts[0] == 6


def test_graph_views_are_transient():
    model = mixed_head_net()
    keys = list(model.state_dict())
    nodes = model.graph()
    assert isinstance(nodes[2].head, HeadView) and nodes[2].head.head is model.heads[2]
    assert model.graph()[2].head is not nodes[2].head  # rebuilt per call, never registered
    assert list(model.state_dict()) == keys and isinstance(model, AdaptiveModel)


def test_empty_batch_and_classes_from_plain_heads():
    model = mixed_head_net()
    with torch.no_grad():
        assert model(torch.zeros(0, 1, 8, 8)).shape == (0, CLASSES)
    with pytest.raises(ValueError, match="exit head 0 predicts 3 classes but the last head predicts 5"):
        EarlyExitNet([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 5)])


def test_exit_gate_kernel_is_what_the_linear_view_calls(monkeypatch):
    calls = []
    import adaexit.heads as heads

    monkeypatch.setattr(heads, "exit_gate", lambda *a, **k: calls.append(a[0].shape) or exit_gate(*a, **k))
    exit_head(pooled_head()).gate(torch.randn(3, 8, 2, 2), "maxprob", 0.5)
    assert calls == [(3, 8, 2, 2)]  # the map itself: pool + linear + gate in one launch
