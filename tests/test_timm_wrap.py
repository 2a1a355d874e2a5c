"""timm models wrap as drop-ins (issue 20): one model per timm family, random init (``pretrained=False``, no
download), small variants at small inputs; never-exit output equal to the model's, bit for bit, and per-row
routing equal to the dense exits (:func:`helpers.check_wrap`), at the exits ``pick_exits`` proposes (about 1/3
and 2/3 of the FLOPs). README's timm table lists each family's exit paths and what cannot be cut
(``CANNOT_CUT`` below, each checked to be refused with a message).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from adaexit import wrap
from adaexit.wrappers import candidate_exits, pick_exits
from helpers import check_wrap

timm = pytest.importorskip("timm", reason="the timm sweep needs timm (adaexit[timm])")

BATCH = 6
# family: (model name, constructor overrides that make it small, input px, the exits pick_exits proposes,
# the layout of those exits)
FAMILIES = {
    "resnet": ("resnet10t", {}, 64, ["maxpool", "layer2"], "nchw"),
    "efficientnet": ("efficientnet_b0", {}, 64, ["blocks.2", "blocks.4"], "nchw"),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64, ["blocks.1", "blocks.3"], "nchw"),
    "convnext": ("convnext_atto", {}, 64, ["stages.1", "stages.2"], "nchw"),
    "regnet": ("regnetx_002", {}, 64, ["s2", "s3"], "nchw"),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}, 32, ["blocks.3", "blocks.7"], "tokens"),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32}, 32, ["blocks.3", "blocks.7"], "tokens"),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2, "embed_dim": 24,
                                              "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, 64,
             ["layers.0", "layers.2"], "nhwc"),
    "maxvit": ("maxvit_rmlp_pico_rw_256", {"img_size": 64}, 64, ["stages.0", "stages.2"], "nchw"),
    "coatnet": ("coatnet_nano_rw_224", {"img_size": 64}, 64, ["stages.0", "stages.2"], "nchw"),
    "densenet": ("densenet121", {}, 64, ["features.denseblock1", "features.denseblock2"], "nchw"),
    "ghostnet": ("ghostnet_050", {}, 64, ["blocks.5", "blocks.7"], "nchw"),
    "mixer": ("mixer_s16_224", {"img_size": 32}, 32, ["blocks.2", "blocks.4"], "tokens"),
    "edgenext": ("edgenext_xx_small", {}, 64, ["stages.1", "stages.2"], "nchw"),
    "pvt_v2": ("pvt_v2_b0", {}, 64, ["stages.0", "stages.1"], "nchw"),
    "fastvit": ("fastvit_t8", {}, 64, ["stages.0", "stages.2"], "nchw"),
    "levit": ("levit_128s", {"img_size": 64}, 64, ["stages.0", "stages.1"], "tokens"),
    "repvit": ("repvit_m0_9", {}, 64, ["stages.1", "stages.2"], "nchw"),
    "dla": ("dla34", {}, 64, ["level2", "level3"], "nchw"),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28}, 28, ["blocks.3", "blocks.7"], "tokens"),
    "beit": ("beit_base_patch16_224", {"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2}, 32,
             ["blocks.0", "blocks.1"], "tokens"),
    "inception_v3": ("inception_v3", {}, 96, ["Pool2", "Mixed_6b"], "nchw"),
}
# Families whose forward torch.fx cannot trace: name -> (model, overrides, px, why), each checked to be refused
# (timm's VGG too, README: left out here because its random init alone takes seconds).
CANNOT_CUT = {
    "mobilevit": ("mobilevit_xxs", {}, 64, "control flow on traced values in the root's forward"),
    "efficientvit": ("efficientvit_b0", {}, 64, "control flow on traced values in the root's forward"),
}


def build(name: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **overrides).eval()


@pytest.mark.filterwarnings("ignore:wrap.GhostNet.. the forward of the traced containers differs")
@pytest.mark.parametrize("family", FAMILIES)
def test_timm_family_wraps(family):
    name, overrides, px, exits, layout = FAMILIES[family]
    model = build(name, overrides)
    x = torch.randn(BATCH, 3, px, px, generator=torch.Generator().manual_seed(1))
    assert pick_exits(candidate_exits(model, x[:1])) == exits  # README's table
    seen = check_wrap(name, model, x, exits)
    assert sum(seen["exit_counts"]) == BATCH and set(seen["layouts"]) == {layout}


@pytest.mark.parametrize("family", CANNOT_CUT)
def test_timm_family_that_cannot_be_cut_is_refused(family):
    name, overrides, px, why = CANNOT_CUT[family]
    model = build(name, overrides)
    with pytest.raises(ValueError, match="torch.fx cannot trace.*control flow"):
        candidate_exits(model, torch.randn(1, 3, px, px))


def test_forward_parameters_with_defaults_are_not_inputs():
    """timm's ViT: ``forward(x, attn_mask=None, is_causal=False)`` is a single-input model; the pieces take
    one input and the defaults stay in force."""
    name, overrides, px, exits, _ = FAMILIES["vit"]
    assert list(inspect.signature(timm.models.VisionTransformer.forward).parameters)[1:] == [
        "x", "attn_mask", "is_causal"]
    model = build(name, overrides)
    wrapped = wrap(model, exits=exits, example_input=torch.randn(1, 3, px, px))
    assert all(list(inspect.signature(stage.forward).parameters) == ["x"] for stage in wrapped.stages[:1])


def test_a_forward_parameter_without_default_is_refused_by_name():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

        def forward(self, x, scale, bias=0.0):
            return self.b(self.a(x) * scale + bias)

    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"takes 2 inputs without defaults \(x, scale\)"):
        wrap(TwoInputs(), exits=["a"])
