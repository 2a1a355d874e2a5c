"""wrap(): existing models become early-exit models that drop into existing code.

Issue 10 replaced the chain-of-children splitter with a torch.fx split at dotted module paths
(``adaexit/wrappers/fx/``). Tests whose behaviour did not change keep their assertions; four changed by
design and say so: a residual forward now wraps at any valid cut (and names the module when a cut is
invalid), an exit after ``layer4`` is valid (the tail is avgpool + flatten + fc), a model whose last module
is not an ``nn.Linear`` wraps (its tail, whatever it holds, is the last exit), and head factories need
``example_input`` (widths are read from traced shapes, never guessed from module attributes).
The sweep over every torchvision builder is ``tests/test_torchvision_wrap.py``.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import adaexit
from adaexit import Cascade, ConfidencePolicy, EarlyExitNet, ExitHead, LogitsHead, stream, wrap
from adaexit.heads import ChannelsFirst, SelectToken
from adaexit.wrappers import ModelExits, candidate_exits, pick_exits
from helpers import round_trip

torchvision = pytest.importorskip("torchvision", reason="the torchvision adapter tests need torchvision")
M = torchvision.models


def sequential_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


class ChainNet(nn.Module):
    """A hand-written model whose forward is a chain of its children."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(20, 32)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.block(self.act(self.embed(x))))


class ResidualNet(ChainNet):
    """Not a chain: the residual connection is invisible to the children list."""

    def forward(self, x):
        h = self.act(self.embed(x))
        return self.fc(h + self.block(h))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return M.resnet18(num_classes=10).eval()


def test_wrapped_sequential_never_exit_equals_the_model():
    model = sequential_cnn()
    wrapped = wrap(model, exits=["1", "3"]).eval()
    assert isinstance(wrapped, EarlyExitNet) and wrapped.num_exits == 3
    x = torch.randn(9, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))  # was assert_close: the split is bit-exact
    # the model's own classifier path is the last exit (it now sits in the last stage, the model's tail)
    assert wrapped.stages[-1].get_submodule("8") is model[-1] and isinstance(wrapped.heads[-1], LogitsHead)


def test_wrapped_torchvision_resnet_is_a_drop_in(resnet):
    model = resnet
    wrapped = wrap(model, exits=["layer1", "layer2", "layer3"]).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        # the exit heads took their widths from the first batch's shapes
        assert [h.in_features for h in wrapped.heads[:-1]] == [64, 128, 256]
        wrapped.set_policy(ConfidencePolicy("maxprob", [0.0, 1.1, 1.1]))
        out, info = wrapped(x, return_info=True)
        first = wrapped.heads[0](wrapped.stages[0](x))
    assert info.exit_counts == [3, 0, 0, 0]
    torch.testing.assert_close(out, first)


def test_wrapped_resnet_with_conv_heads_trains_densely():
    model = torchvision.models.resnet18(num_classes=7)
    # a head factory needs the widths: example_input (they used to be guessed from module attributes)
    wrapped = wrap(model, exits=["layer2"], heads=ExitHead.conv, example_input=torch.randn(2, 3, 32, 32)).train()
    outs = wrapped(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 7), (2, 7)]
    sum(o.sum() for o in outs).backward()
    assert model.conv1.weight.grad is not None  # the wrapper shares the model's weights


def test_chain_model_with_example_input():
    model = ChainNet().eval()
    x = torch.randn(5, 20)
    wrapped = wrap(model, exits=["act"], example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))
    assert wrapped.cuts[0].layout == "flat" and wrapped.heads[0].in_features == 32


def test_residual_forward_wraps_where_one_value_crosses_and_names_invalid_cuts():
    # Changed by design: this used to be refused as "not a straight chain". The fx split sees the residual
    # connection: after 'act' only h crosses (valid); after 'block' h is still needed by the addition.
    model = ResidualNet().eval()
    x = torch.randn(4, 20)
    wrapped = wrap(model, exits=["act"], example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    with pytest.raises(ValueError, match=r"cannot cut at the output of 'block': the output of 'act', computed "
                                         r"before the cut, is still used after it by 'add'"):
        wrap(model, exits=["block"], example_input=x)


def test_unknown_module_name():
    with pytest.raises(ValueError, match=r"unknown module name 'layer9' in ResNet.*close matches: 'layer4', 'layer3'"):
        wrap(torchvision.models.resnet18(), exits=["layer9"])


def test_exit_after_layer4_is_valid_and_after_the_classifier_is_not(resnet):
    # Changed by design: 'layer4' used to be refused (its output fed the folded pool + classifier); the
    # tail after it (avgpool, flatten, fc) is now the last exit.
    wrapped = wrap(resnet, exits=["layer4"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x), resnet(x))
    with pytest.raises(ValueError, match=r"'fc' produces the model's output"):
        wrap(resnet, exits=["fc"])


def test_exits_out_of_order():
    with pytest.raises(ValueError, match="forward order"):
        wrap(torchvision.models.resnet18(), exits=["layer2", "layer1"])


def test_model_without_linear_classifier():
    # Changed by design: a last module that is not an nn.Linear used to be refused; the tail (here a
    # softmax) is whatever the model computes after the last exit.
    model = nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1))
    x = torch.randn(6, 3)
    wrapped = wrap(model, exits=["0"]).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))


def test_custom_heads_factory_list_and_bad_heads():
    calls = []

    def factory(width, classes):
        calls.append((width, classes))
        return ExitHead(width, classes)

    x = torch.randn(2, 1, 12, 12)
    wrap(sequential_cnn(), exits=["1"], heads=factory, example_input=x)
    assert calls == [(8, 10)]
    mine = ExitHead(8, 10)
    wrapped = wrap(sequential_cnn(), exits=["1"], heads=[mine])  # a list needs no widths
    assert wrapped.exit_heads[0] is mine and wrapped.heads[0] is mine
    with pytest.raises(ValueError, match="heads=factory .* needs each exit's width: pass example_input"):
        wrap(sequential_cnn(), exits=["1"], heads=factory)
    with pytest.raises(ValueError, match="heads= must be None, a list of 1 modules"):
        wrap(sequential_cnn(), exits=["1"], heads="mlp", example_input=x)
    with pytest.raises(ValueError, match="got 2 heads for 1 early exits"):
        wrap(sequential_cnn(), exits=["1"], heads=[mine, ExitHead(8, 10)])
    with pytest.raises(ValueError, match="unknown keyword head=; wrap takes heads="):
        wrap(sequential_cnn(), exits=["1"], head=factory)
    with pytest.raises(ValueError, match="trim= is not supported for torch.fx-traced models"):
        wrap(sequential_cnn(), exits=["1"], trim=False)


def test_wrap_probes_do_not_touch_batchnorm_statistics():
    model = torchvision.models.resnet18(num_classes=10)  # train mode, as built
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    wrap(model, exits=["layer1"], heads=ExitHead.conv, example_input=torch.randn(2, 3, 32, 32))
    wrapped = wrap(model, exits=["layer1"])
    wrapped.exit_costs(torch.randn(2, 3, 32, 32))  # builds the heads from one row: a probe too
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.training and all(m.training for m in model.modules())  # and the modes are restored


def test_flatten_without_global_pool_stays_in_the_backbone():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    wrapped = wrap(model, exits=["1"], example_input=torch.randn(2, 1, 12, 12)).eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))


# ---------------------------------------------------------------------------------------------
# The model's modules are shared, registered once
# ---------------------------------------------------------------------------------------------
def test_parameters_are_shared_and_registered_once(resnet):
    wrapped = wrap(resnet, exits=["layer1", "layer3"], example_input=torch.randn(1, 3, 32, 32))
    assert isinstance(wrapped, ModelExits) and wrapped.model is resnet
    assert wrapped.stages[0].conv1 is resnet.conv1 and wrapped.stages[-1].fc is resnet.fc
    keys = list(wrapped.state_dict())
    own = [k for k in keys if not k.startswith("model.")]
    assert [k[len("model."):] for k in keys if k.startswith("model.")] == list(resnet.state_dict())
    assert own == ["_extra_state"] + [f"exit_heads.{k}.classifier.{p}" for k in range(2)
                                      for p in ("weight", "bias")] + ["policy._extra_state"]
    n_heads = sum(p.numel() for p in wrapped.exit_heads.parameters())
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in resnet.parameters()) + n_heads
    assert {id(p) for p in wrapped.stages[1].parameters()} <= {id(p) for p in resnet.parameters()}


def test_state_dict_round_trip_and_deepcopy(resnet):
    x = torch.randn(8, 3, 32, 32)
    wrapped = wrap(resnet, exits=["layer2"], example_input=x[:1]).eval()
    with torch.no_grad():  # a threshold between the rows' exit-0 scores: some rows exit there, some do not
        scores = wrapped.exit_logits(x)[0].softmax(1).max(1).values.sort().values
    threshold = float((scores[3] + scores[4]) / 2)
    wrapped.set_policy(ConfidencePolicy("maxprob", [threshold]))
    with torch.no_grad():
        _, info = wrapped(x, return_info=True)
    assert min(info.exit_counts) > 0, info.exit_counts
    state = round_trip(wrapped.state_dict())
    twin_model = M.resnet18(num_classes=10).eval()
    twin = wrap(twin_model, exits=["layer2"]).eval()  # heads not built yet: the state gives their shapes
    twin.load_state_dict(state)
    assert isinstance(twin.policy, ConfidencePolicy) and twin.policy.thresholds == pytest.approx([threshold])
    copied = copy.deepcopy(wrapped)
    assert copied.stages[0].conv1 is copied.model.conv1 and copied.model.conv1 is not resnet.conv1
    with torch.no_grad():
        assert torch.equal(twin(x), wrapped(x)) and torch.equal(copied(x), wrapped(x))
        assert torch.equal(twin_model(x), resnet(x))


def test_modes_and_gradients_follow_the_model(resnet):
    wrapped = wrap(resnet, exits=["layer2"], example_input=torch.randn(1, 3, 32, 32))
    wrapped.train()
    assert resnet.training and wrapped.stages[0].bn1.training
    x = torch.randn(2, 3, 32, 32)
    resnet.zero_grad()
    wrapped(x)[-1].sum().backward()  # the dense train() forward: every exit's logits; the last is the model's
    ref = {n: p.grad.clone() for n, p in resnet.named_parameters()}
    resnet.zero_grad()
    resnet(x).sum().backward()
    assert all(torch.equal(ref[n], p.grad) for n, p in resnet.named_parameters())
    resnet.zero_grad()
    wrapped.eval()
    assert not resnet.training and not wrapped.stages[0].bn1.training


def test_heads_only_training_freezes_the_whole_model():
    torch.manual_seed(0)
    model = M.resnet18(num_classes=4)
    wrapped = wrap(model, exits=["layer1", "layer3"], example_input=torch.randn(1, 3, 32, 32))
    before = copy.deepcopy(model.state_dict())
    heads_before = [p.clone() for p in wrapped.exit_heads.parameters()]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    adaexit.train(wrapped, [(x, y)], epochs=1, heads_only=True, progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights and BatchNorm statistics
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, wrapped.exit_heads.parameters()))


def test_heads_built_from_the_first_batch_are_trained():
    """Without example_input the default heads exist (uninitialised) from the start, so an optimizer built
    before the first batch holds them; widths and layouts come from that batch."""
    torch.manual_seed(0)
    model = M.swin_t(num_classes=3)
    wrapped = wrap(model, exits=["features.1"])
    params = list(wrapped.exit_heads.parameters())
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 48)
    outs = wrapped(x)
    assert isinstance(wrapped.heads[0].features, ChannelsFirst) and wrapped.cuts[0].layout == "nhwc"
    assert wrapped.heads[0].in_features == 96 and [o.shape for o in outs] == [(2, 3), (2, 3)]
    sum(o.sum() for o in outs).backward()
    before = [p.clone() for p in params]
    opt.step()
    assert all(p is q for p, q in zip(params, wrapped.exit_heads.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_heads_built_in_inference_mode_still_train():
    wrapped = wrap(M.resnet18(num_classes=10), exits=["layer1"]).eval()
    with torch.inference_mode():
        wrapped(torch.randn(2, 3, 32, 32))
    assert not any(p.is_inference() for p in wrapped.exit_heads.parameters())
    wrapped.train()
    outs = wrapped(torch.randn(2, 3, 32, 32))
    outs[0].sum().backward()
    assert wrapped.heads[0].classifier.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Layouts and widths come from traced shapes
# ---------------------------------------------------------------------------------------------
def test_shufflenet_widths_come_from_shapes():
    """ShuffleNetV2 used to wrap with a width misread from module attributes and fail inside exit head 0."""
    model = M.shufflenet_v2_x0_5(num_classes=10).eval()
    wrapped = wrap(model, exits=["stage2", "stage3"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    assert [h.in_features for h in wrapped.heads[:-1]] == [48, 96]


def test_vit_class_token_head():
    model = M.vit_b_32(num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = wrap(model, exits=["encoder.layers.encoder_layer_1"], example_input=x[:1]).eval()
    head = wrapped.heads[0]
    assert isinstance(head.features, SelectToken) and head.features.index == 0 and head.in_features == 768
    assert wrapped.cuts[0].layout == "tokens" and wrapped.cuts[0].shape == (1, 2, 768)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        h = wrapped.stages[0](x)
        torch.testing.assert_close(head(h), head.classifier(h[:, 0]))


def test_buffers_read_by_the_traced_forward_follow_to():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.register_buffer("shift", torch.linspace(-1, 1, 8))

        def forward(self, x):
            return self.b(torch.relu(self.a(x) + self.shift))

    model = Shifted().eval()
    wrapped = wrap(model, exits=["a"], example_input=torch.randn(1, 4)).eval().to(torch.bfloat16)
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        out = wrapped(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, model(x))


# ---------------------------------------------------------------------------------------------
# Errors name the module and why
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exits, match", [
    (["layer1.0.conv1"], r"'layer1.0.conv1': the output of 'maxpool'.*used after it by 'add'.*inside 'layer1.0'"),
    (["layer2", "layer2"], r"listed twice"),
    (["layer1.0.relu"], r"'layer1.0.relu' is called 2 times"),
    (["layer4", "layer4.1"], r"same point"),
    ([""], r"whole model"),
    ([], r"exits is empty"),
    ("layer1", r"not the string 'layer1'"),
])
def test_errors(resnet, exits, match):
    with pytest.raises(ValueError, match=match):
        wrap(resnet, exits=exits)


def test_container_and_train_only_modules_are_named():
    with pytest.raises(ValueError, match=r"ModuleList is a container that is never called.*'blocks.0'"):
        wrap(M.maxvit_t(num_classes=10).eval(), exits=["blocks"])
    with pytest.raises(ValueError, match=r"'aux1' is not called by GoogLeNet.forward in eval mode"):
        wrap(M.googlenet(num_classes=10, init_weights=False, aux_logits=True), exits=["aux1"])
    with pytest.warns(UserWarning, match=r"train mode would also call \['aux1', 'aux2'\]"):
        wrap(M.googlenet(num_classes=10, init_weights=False, aux_logits=True), exits=["inception4a"])


def test_tuple_outputs_and_non_logit_models_are_refused():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(y[:, -1])

    with pytest.raises(ValueError, match=r"'lstm' returns a tuple"):
        wrap(TupleOut(), exits=["lstm"])
    maps = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"must return logits \[N, classes\]; it returned shape \(1, 4, 4, 4\)"):
        wrap(maps, exits=["1"], example_input=torch.randn(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# The rest of the library takes a wrapped model like any other
# ---------------------------------------------------------------------------------------------
def test_a_wrapped_model_streams_and_joins_a_cascade(resnet):
    x = torch.randn(12, 3, 32, 32)
    wrapped = wrap(resnet, exits=["layer1", "layer2"], example_input=x[:1]).eval()
    with torch.no_grad():
        scores = torch.stack([torch.softmax(z, 1).max(1).values for z in wrapped.exit_logits(x)])
        wrapped.set_policy(ConfidencePolicy("maxprob", [float(s.median()) + 1e-6 for s in scores[:2]]))
        want = wrapped(x)
        got = torch.cat(list(stream(wrapped, [x[:5], x[5:]], batch_size=4)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        small = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
        cascade = Cascade([small, wrapped], example_input=x[:1]).eval()
        assert cascade(x).shape == (12, 10) and cascade.num_exits == 4


def test_candidates_and_picks(resnet):
    cands = candidate_exits(resnet, torch.randn(1, 3, 64, 64))
    names = [c.name for c in cands]
    assert names == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    fractions = [c.flops_fraction for c in cands]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] > 0.99  # layer4: the fc is left
    assert pick_exits(cands) == ["layer1", "layer3"]  # ~1/3 and ~2/3 of the FLOPs; never layer4 (saves nothing)
    assert all(c.layout == "nchw" for c in cands) and cands[2].feature_dim == 128


# ---------------------------------------------------------------------------------------------
# Review findings: side effects, train-mode code, layouts, dtypes, arguments
# ---------------------------------------------------------------------------------------------
class _InPlaceTail(nn.Module):
    """In-place ops whose results are never used: their effect lives on in the tensor they write."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.b(self.a(x))
        x.relu_()
        x.mul_(2)
        return self.fc(x)


def test_in_place_ops_with_unused_results_are_kept():
    model = _InPlaceTail().eval()
    x = torch.randn(5, 4)
    wrapped = wrap(model, exits=["a"], example_input=x[:1]).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))


class _RootDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.fc(torch.nn.functional.dropout(x, 0.5, self.training))


def test_train_mode_code_in_the_traced_forward_warns():
    with pytest.warns(UserWarning, match="differs between train and eval mode"):
        wrap(_RootDropout(), exits=["a"], example_input=torch.randn(1, 4))


def test_sequential_without_mode_dependent_code_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(sequential_cnn(), exits=["1"], example_input=torch.randn(1, 1, 28, 28))


def test_conv1d_maps_are_pooled_over_their_length():
    model = nn.Sequential(nn.Conv1d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    wrapped = wrap(model, exits=["1"], example_input=torch.randn(1, 2, 40)).eval()
    assert wrapped.cuts[0].layout == "nchw" and wrapped.cuts[0].feature_dim == 16
    x = torch.randn(4, 2, 50)  # another length: the head pools over it
    with torch.no_grad():
        logits = wrapped.exit_logits(x)
    assert logits[0].shape == (4, 3) and torch.equal(logits[-1], model(x))


def test_a_convolution_producer_decides_the_layout_over_the_aspect_ratio():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=(16, 1), padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    wrapped = wrap(model, exits=["0"], example_input=torch.randn(1, 3, 32, 32))
    cut = wrapped.cuts[0]
    assert cut.shape == (1, 16, 2, 32) and cut.layout == "nchw" and cut.feature_dim == 16 and cut.layout_ambiguous


def test_callable_heads_follow_the_model_dtype():
    model = sequential_cnn().to(torch.bfloat16)
    wrapped = wrap(model, exits=["3"], example_input=torch.randn(1, 1, 28, 28, dtype=torch.bfloat16),
                   heads=lambda width, classes: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                             nn.Linear(width, classes)))
    assert wrapped.heads[0][2].weight.dtype == torch.bfloat16
    out = wrapped.train()(torch.randn(2, 1, 28, 28, dtype=torch.bfloat16))
    assert [o.dtype for o in out] == [torch.bfloat16, torch.bfloat16]
    with pytest.raises(ValueError, match="must return an nn.Module"):
        wrap(model, exits=["3"], example_input=torch.randn(1, 1, 28, 28, dtype=torch.bfloat16),
             heads=lambda width, classes: None)


class _RootBuffer(nn.Module):
    """Reads a root-level buffer and parameter in its own forward (traced as get_attr nodes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.scale = nn.Parameter(torch.ones(1))
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c2(torch.relu(self.c1((x - self.mean) * self.scale)))
        return self.fc(x.mean(dim=(2, 3)))


def test_traced_tensors_follow_to_and_assigned_state():
    x = torch.randn(3, 3, 8, 8)
    model = _RootBuffer().eval()
    lazy = wrap(model, exits=["c1"]).eval().to(torch.bfloat16)  # heads built from the first (bf16) batch
    with torch.no_grad():
        assert lazy(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model = _RootBuffer().eval()
    wrapped = wrap(model, exits=["c1"], example_input=x[:1]).eval()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in wrapped.state_dict().items()}
    state["model.mean"] = torch.full((1, 3, 1, 1), 0.5)
    state["model.scale"] = torch.full((1,), 2.0)
    wrapped.load_state_dict(state, assign=True)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        assert model.mean.flatten()[0] == 0.5


def test_pick_exits_skips_cuts_that_save_nothing_and_bad_arguments_are_named():
    from adaexit.wrappers.fx import CutPoint

    late = [CutPoint("a", flops_fraction=0.97), CutPoint("b", flops_fraction=0.99)]
    assert pick_exits(late) == []
    with pytest.raises(ValueError, match="exits must be a list"):
        wrap(sequential_cnn(), None)
    with pytest.raises(ValueError, match="example_input of shape"):
        wrap(sequential_cnn(), exits=["1"], example_input=torch.randn(1, 3, 28, 28))


# ---------------------------------------------------------------------------------------------
# Saved state knows its exits; state before the first batch; mode; pure prepare_input (issues 20, 22)
# ---------------------------------------------------------------------------------------------
def test_a_model_wrapped_without_example_input_saves_before_its_first_batch():
    torch.manual_seed(0)
    wrapped = wrap(sequential_cnn(), exits=["1", "3"])
    state = round_trip(wrapped.state_dict())  # the heads still wait for their widths: no uninitialised weights in the file
    assert not any(k.startswith("exit_heads.") for k in state) and state["_extra_state"]["exits"] == ["1", "3"]
    twin = wrap(sequential_cnn(), exits=["1", "3"])
    twin.load_state_dict(state)  # strict: the waiting heads are not missing keys
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        out = wrapped(x)  # builds the heads
    later = round_trip(wrapped.state_dict())
    assert later["exit_heads.0.classifier.weight"].shape == (10, 8)
    fresh = wrap(sequential_cnn(), exits=["1", "3"])
    fresh.load_state_dict(later)  # the waiting heads take the saved widths and weights
    with torch.no_grad():
        for a, b in zip(fresh.exit_logits(x), wrapped.exit_logits(x)):
            assert torch.equal(a, b)
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key.*exit_heads.0.classifier.weight"):
        wrapped.load_state_dict(state)  # built heads cannot load a state without weights


def test_a_state_saved_for_other_exits_is_refused_naming_both(resnet):
    x = torch.randn(1, 3, 32, 32)
    state = round_trip(wrap(resnet, exits=["layer1", "layer2"], example_input=x).state_dict())
    other = wrap(resnet, exits=["layer2", "layer3"], example_input=x)
    with pytest.raises(ValueError, match=r"saved for exits \['layer1', 'layer2'\].*has exits \['layer2', 'layer3'\]"):
        other.load_state_dict(state)
    same = wrap(resnet, exits=["layer1", "layer2"], example_input=x)
    same.load_state_dict(state)
    assert same.get_extra_state() == {"exits": ["layer1", "layer2"], "layouts": ["nchw", "nchw"]}
    swin = M.swin_t(num_classes=3)
    saved = round_trip(wrap(swin, exits=["features.1"], example_input=torch.randn(1, 3, 32, 32)).state_dict())
    saved["_extra_state"] = {"exits": ["features.1"], "layouts": ["nchw"]}
    with pytest.raises(ValueError, match="exit 'features.1' was saved with layout 'nchw', but reads 'nhwc'"):
        wrap(swin, exits=["features.1"], example_input=torch.randn(1, 3, 32, 32)).load_state_dict(saved)


def test_wrap_returns_a_model_in_the_mode_of_the_model():
    x = torch.randn(3, 1, 12, 12)
    evaluated = wrap(sequential_cnn().eval(), exits=["1"])
    assert not evaluated.training and not any(m.training for m in evaluated.modules())
    with torch.no_grad():
        assert torch.equal(evaluated(x), evaluated.model(x))  # one tensor, not a list of every exit
    trained = wrap(sequential_cnn().train(), exits=["1"], example_input=x)
    assert trained.training and isinstance(trained(x), list)
    mixed = sequential_cnn().train()
    mixed[0].eval()  # a user's mixed modes survive
    wrapped = wrap(mixed, exits=["1"], example_input=x)
    assert wrapped.training and wrapped.exit_heads[0].training and not mixed[0].training and mixed[2].training


def test_prepare_input_builds_nothing_and_streaming_builds_the_heads_once():
    wrapped = wrap(sequential_cnn(), exits=["1", "3"])
    x = torch.randn(6, 1, 12, 12)
    assert wrapped.prepare_input(x) is x
    assert wrapped._pending and state_is_waiting(wrapped)  # validation only
    streamed = torch.cat(list(stream(wrapped, [x[:2], x[2:5], x[5:]], batch_size=4)))  # no forward before
    assert not wrapped._pending and not state_is_waiting(wrapped)
    with torch.no_grad():  # the same rows in other batches: equal to float rounding (convolutions per batch size)
        torch.testing.assert_close(streamed, wrapped(x))
        torch.testing.assert_close(streamed, wrapped.model(x))


def state_is_waiting(wrapped) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in wrapped.exit_heads.parameters())


def test_both_backends_build_the_same_shape_of_model(resnet):
    wrapped = wrap(resnet, exits=["layer1"], example_input=torch.randn(1, 3, 32, 32))
    assert wrapped.exits == ["layer1"] and wrapped.layouts == ["nchw"] and len(wrapped.exit_heads) == 1
    assert dict(wrapped.named_modules())["model"] is resnet
    assert list(wrapped.heads)[:-1] == list(wrapped.exit_heads) and len(wrapped.stages) == 2


def test_a_bad_first_batch_is_named_when_it_builds_the_heads():
    wrapped = wrap(sequential_cnn(), exits=["1"])
    with pytest.raises(ValueError, match="stage 0: building the exit heads from the first batch, Sequential failed"):
        wrapped(torch.randn(2, 3, 12, 12))  # 3 channels for a 1-channel model
    assert wrapped._pending  # nothing was built from it: a good batch still can
    with torch.no_grad():
        assert wrapped(torch.randn(2, 1, 12, 12)).shape == (2, 10)


def test_a_server_builds_the_waiting_heads_once_from_its_first_batch():
    import threading

    wrapped = wrap(sequential_cnn(), exits=["1", "3"]).eval()
    rows = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    futures, start = [None] * 8, threading.Barrier(4)
    with adaexit.Server(wrapped, batch_size=4, max_wait_ms=2) as server:
        def client(i):
            start.wait()  # four clients submit at once, before any head exists
            for j in (i, i + 4):
                futures[j] = server.submit(rows[j : j + 1])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = torch.cat([f.result(timeout=60) for f in futures])
    assert not wrapped._pending
    with torch.no_grad():  # never-exit: the model's own output, row by row (to float rounding across batch sizes)
        torch.testing.assert_close(out, wrapped.model(rows))
