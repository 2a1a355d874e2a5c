"""wrap(): existing models become early-exit models that drop into existing code."""

import pytest
import torch
from torch import nn

from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead, wrap

torchvision = pytest.importorskip("torchvision", reason="the torchvision adapter tests need torchvision")


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
    """A hand-written model whose forward is a chain of its children (the documented rule)."""

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


def test_wrapped_sequential_never_exit_equals_the_model():
    model = sequential_cnn()
    wrapped = wrap(model, exits=["1", "3"]).eval()
    assert isinstance(wrapped, EarlyExitNet) and wrapped.num_exits == 3
    x = torch.randn(9, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x), rtol=1e-5, atol=1e-6)
    assert wrapped.heads[-1].classifier is model[-1]  # the model's own classifier is the last exit


def test_wrapped_torchvision_resnet_is_a_drop_in():
    model = torchvision.models.resnet18(num_classes=10).eval()
    wrapped = wrap(model, exits=["layer1", "layer2", "layer3"]).eval()
    assert [h.in_features for h in wrapped.heads] == [64, 128, 256, 512]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x), rtol=1e-4, atol=1e-5)
        wrapped.set_policy(ConfidencePolicy("maxprob", [0.0, 1.1, 1.1]))
        out, info = wrapped(x, return_info=True)
        first = wrapped.heads[0](wrapped.stages[0](x))
    assert info.exit_counts == [3, 0, 0, 0]
    torch.testing.assert_close(out, first)


def test_wrapped_resnet_with_conv_heads_trains_densely():
    model = torchvision.models.resnet18(num_classes=7)
    wrapped = wrap(model, exits=["layer2"], head="conv").train()
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


def test_non_chain_forward_is_detected():
    with pytest.raises(ValueError, match="not a straight chain"):
        wrap(ResidualNet().eval(), exits=["act"], example_input=torch.randn(4, 20))


def test_unknown_module_name():
    with pytest.raises(ValueError, match="unknown module name 'layer9'"):
        wrap(torchvision.models.resnet18(), exits=["layer9"])


def test_exit_after_the_classifier_input_is_rejected():
    with pytest.raises(ValueError, match="cannot put an exit after 'layer4'"):
        wrap(torchvision.models.resnet18(), exits=["layer4"])


def test_exits_out_of_order():
    with pytest.raises(ValueError, match="forward order"):
        wrap(torchvision.models.resnet18(), exits=["layer2", "layer1"])


def test_model_without_linear_classifier():
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        wrap(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), exits=["0"])


def test_custom_head_factory_and_bad_head_kind():
    calls = []

    def factory(width, classes):
        calls.append((width, classes))
        return ExitHead(width, classes)

    wrap(sequential_cnn(), exits=["1"], head=factory)
    assert calls == [(8, 10)]
    with pytest.raises(ValueError, match="head must be one of"):
        wrap(sequential_cnn(), exits=["1"], head="mlp")


def test_wrap_probes_do_not_touch_batchnorm_statistics():
    model = torchvision.models.resnet18(num_classes=10)  # train mode, as built
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    wrap(model, exits=["layer1"], head="conv", example_input=torch.randn(2, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.training  # and the mode is restored


def test_flatten_without_global_pool_stays_in_the_backbone():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    wrapped = wrap(model, exits=["1"], example_input=torch.randn(2, 1, 12, 12)).eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))
