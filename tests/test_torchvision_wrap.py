"""Every torchvision classification builder wraps (issue 10): never-exit output equal to the model's, bit for
bit, and per-row routing equal to the dense exits.

The sweep covers ``torchvision.models.list_models(module=torchvision.models)`` (random init,
``num_classes=10``, the smallest input each model accepts, batch 6). The default run takes the smallest
model of each family; the others are marked ``slow`` (README's test command runs them too, so the whole
sweep is kept short: the giant variants are skipped by parameter count, counted on the meta device, with
the reason in the skip). No builder is known that cannot be split (``CANNOT_SPLIT`` would name it and why).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from adaexit.wrappers import candidate_exits, pick_exits
from helpers import check_wrap, median_threshold

torchvision = pytest.importorskip("torchvision", reason="the torchvision sweep needs torchvision")
M = torchvision.models

BATCH = 6
CLASSES = 10
# Skipped by size: random initialisation alone takes 10-150 s on a 2-core machine for these. Every family
# keeps smaller members in the sweep.
MAX_PARAMS = 150e6
# A builder that cannot be split: name -> why (none: all 80 builders of torchvision 0.29 split).
CANNOT_SPLIT: dict[str, str] = {}

# Family of a builder: the first matching prefix (the README's families).
FAMILIES = ("efficientnet_v2", "efficientnet", "mobilenet_v2", "mobilenet_v3", "swin_v2", "swin", "wide_resnet",
            "resnext", "resnet", "regnet", "vgg", "vit", "convnext", "densenet", "mnasnet", "shufflenet_v2",
            "squeezenet", "googlenet", "inception", "maxvit", "alexnet")

# The smallest square input (px) each family accepts (batch of one, eval mode): every conv and pool padded
# (1 px) or the first unpadded pooling that would reach an empty map. ViT and MaxViT fix their input size
# at construction: ViT at its patch size (one patch plus the class token), MaxViT at 224 (every block's
# input divisible by its partition size 7).
MIN_PX = {"alexnet": 63, "convnext": 32, "densenet": 29, "googlenet": 15, "inception": 75, "maxvit": 224,
          "squeezenet1_0": 21, "squeezenet1_1": 17, "swin": 4, "swin_v2": 4, "vgg": 32}

# Exits per family (or per model): stage outputs at about 1/3 and 2/3 of the depth (README's table).
EXITS = {
    "alexnet": ["features.2", "features.5"],
    "convnext": ["features.3", "features.5"],
    "densenet": ["features.transition1", "features.transition2"],
    "efficientnet": ["features.3", "features.5"],
    "efficientnet_v2": ["features.2", "features.5"],
    "googlenet": ["maxpool2", "inception4b"],
    "inception": ["maxpool2", "Mixed_6b"],
    "maxvit": ["blocks.0", "blocks.2"],
    "mnasnet": ["layers.9", "layers.11"],
    "mobilenet_v2": ["features.5", "features.13"],
    "mobilenet_v3_large": ["features.6", "features.12"],
    "mobilenet_v3_small": ["features.3", "features.8"],
    "regnet": ["trunk_output.block1", "trunk_output.block2"],
    "resnet": ["layer1", "layer3"],
    "resnext": ["layer1", "layer3"],
    "wide_resnet": ["layer1", "layer3"],
    "shufflenet_v2": ["stage2", "stage3"],
    "squeezenet1_0": ["features.4", "features.8"],
    "squeezenet1_1": ["features.3", "features.6"],
    "swin": ["features.1", "features.5"],
    "swin_v2": ["features.1", "features.5"],
    "vgg11": ["features.5", "features.10"], "vgg13": ["features.9", "features.14"],
    "vgg16": ["features.9", "features.16"], "vgg19": ["features.9", "features.18"],
    "vgg11_bn": ["features.7", "features.14"], "vgg13_bn": ["features.13", "features.20"],
    "vgg16_bn": ["features.13", "features.23"], "vgg19_bn": ["features.13", "features.26"],
}


def family(name: str) -> str:
    return next((f for f in FAMILIES if name.startswith(f)), M.get_model_builder(name).__module__.split(".")[-1])


def input_px(name: str) -> int:
    if name.startswith("vit_"):
        return int(re.search(r"_(\d+)$", name).group(1))  # the patch size
    return MIN_PX.get(name, MIN_PX.get(family(name), 1))


def build(name: str) -> torch.nn.Module:
    kwargs = {"num_classes": CLASSES}
    if name.startswith("vit_"):
        kwargs["image_size"] = input_px(name)
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy's truncated normal: slow, and not needed here
    return M.get_model(name, **kwargs)


@contextmanager
def parameters_on_meta():
    """Every parameter created inside moves to the meta device as it is registered (so the initialisers
    run on nothing): a model's size in a fraction of a second, without its memory."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def exits_for(name: str, model, x) -> list[str]:
    if name.startswith("vit_"):
        layers = len(model.encoder.layers)
        return [f"encoder.layers.encoder_layer_{layers // 3}", f"encoder.layers.encoder_layer_{2 * layers // 3}"]
    known = EXITS.get(name, EXITS.get(family(name)))
    return known if known is not None else pick_exits(candidate_exits(model, x))  # a builder added later


def check(name: str) -> dict:
    """Wrap one builder; assert never-exit equality and per-row routing. Returns what it saw."""
    torch.manual_seed(0)
    model = build(name).eval()
    px = input_px(name)
    x = torch.randn(BATCH, 3, px, px, generator=torch.Generator().manual_seed(1))
    return check_wrap(name, model, x, exits_for(name, model, x[:1]))


def parameter_count(name: str) -> int:
    with parameters_on_meta():
        return sum(p.numel() for p in build(name).parameters())


def _cases():
    names = M.list_models(module=M)
    sizes = {name: parameter_count(name) for name in names}
    smallest = {}
    for name in names:
        f = family(name)
        if sizes[name] < MAX_PARAMS and (f not in smallest or sizes[name] < sizes[smallest[f]]):
            smallest[f] = name
    cases = []
    for name in names:
        marks = []
        if name in CANNOT_SPLIT:
            marks.append(pytest.mark.skip(reason=f"{name} cannot be split: {CANNOT_SPLIT[name]}"))
        elif sizes[name] >= MAX_PARAMS:
            marks.append(pytest.mark.skip(
                reason=f"{name}: {sizes[name] / 1e6:.0f} M parameters >= {MAX_PARAMS / 1e6:.0f} M (random init alone "
                f"takes too long for the suite); family {family(name)!r} is covered by {smallest[family(name)]}"))
        if smallest.get(family(name)) != name:
            marks.append(pytest.mark.slow)
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


CASES = _cases()


def test_every_family_has_a_default_case():
    default = [c.values[0] for c in CASES if not c.marks]
    assert {family(n) for n in default} == {family(n) for n in M.list_models(module=M)}
    assert len(default) == len(FAMILIES)


@pytest.mark.filterwarnings("ignore:wrap.(GoogLeNet|Inception3).. the forward of the traced containers differs")
@pytest.mark.parametrize("name", CASES)
def test_builder_wraps(name):
    seen = check(name)
    assert sum(seen["exit_counts"]) == BATCH
    assert all(layout in ("nchw", "nhwc", "tokens") for layout in seen["layouts"])
    expected = {"swin": "nhwc", "swin_v2": "nhwc", "vit": "tokens"}.get(family(name), "nchw")
    assert set(seen["layouts"]) == {expected}


def test_median_threshold_sits_in_a_gap():
    scores = torch.tensor([0.1, 0.2, 0.2000001, 0.5, 0.6, 0.9])
    t = median_threshold(scores)
    assert 0.2000001 < t < 0.5 and not math.isclose(t, 0.2)
