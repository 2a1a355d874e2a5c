"""The demo's model zoo for 28x28 grey-scale images (Fashion-MNIST), sized for 2 CPU cores.

Three networks of sharply increasing cost, so that adaptive inference has something to win:

* :func:`mlp` -- a one-hidden-layer perceptron (0.4 MFLOPs per image): the cheapest cascade member.
* :func:`small_cnn` -- three strided convolutions and a linear layer (1.4 MFLOPs): cheap, and accurate
  enough (about 91.5% on the test set) that most images can stop there.
* :func:`wide_cnn` -- a wide, VGG-style early-exit network (36 MFLOPs, 25x the small CNN, 90x the
  MLP): the strongest single network of the demo, and an :class:`~adaexit.EarlyExitNet` whose first
  exit (after the stem convolution) costs a sixtieth of the whole and its second about a ninth, so
  easy images can also leave it early.

Design notes (measured on a 2-core x86 CPU with PyTorch's oneDNN convolutions, batch 256):

* Down-sampling uses stride-2 convolutions, not max-pooling: ``max_pool2d`` on NCHW tensors was
  several times slower than the convolution before it.
* The first convolution of every CNN is strided: a 1-input-channel convolution at the full 28x28
  resolution ran at ~5 GFLOP/s (6x slower than the rest of its stage for a tenth of the FLOPs).
  Both rules keep wall-clock cost close to FLOPs, which is what makes the cheap networks cheap.
* Every convolution is 3x3 + BatchNorm + ReLU (BN makes a few epochs of Adam enough).
* Exit heads and the small CNN keep the spatial layout (strided conv, flatten, linear) instead of
  global average pooling: on these images where a feature sits is most of the signal. The first
  exit of the wide CNN went from ~89% (pooled conv head) to ~91.5% this way, for a quarter of the
  head's FLOPs. The wide CNN's own classifier stays a pooled linear layer, a conventional network.
"""

from __future__ import annotations

from torch import nn

from ...early_exit import EarlyExitNet
from ...heads import ExitHead

NUM_CLASSES = 10


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (padding 1, no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def mlp(hidden: int = 256, num_classes: int = NUM_CLASSES, in_features: int = 28 * 28) -> nn.Sequential:
    """Flatten -> Linear(784, hidden) -> ReLU -> Linear(hidden, classes)."""
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
    )


def small_cnn(width: int = 16, num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """28x28 -> (conv s2) 14x14 -> (conv s2) 7x7 -> conv 7x7 -> flatten -> linear.

    Flatten, not global pooling: where on the image a feature sits (a collar, a sleeve, a heel) is
    most of what tells these classes apart, and a global pool throws it away."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return nn.Sequential(
        conv_bn(1, width, stride=2),
        conv_bn(width, 2 * width, stride=2),
        conv_bn(2 * width, 2 * width),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, num_classes),
    )


def spatial_head(in_channels: int, num_classes: int, width: int, out_size: int) -> ExitHead:
    """An exit head that keeps the layout: strided 3x3 conv + BN + ReLU, flatten, linear.

    ``out_size`` is the side of the conv's output map (input side / 2, rounded up). The flattened
    features are ``[N, width * out_size**2]``, which the exit-gate kernel reads as they are (its
    mean-pool is the identity on 2-D input)."""
    features = nn.Sequential(conv_bn(in_channels, width, stride=2), nn.Flatten())
    return ExitHead(width * out_size * out_size, num_classes, features=features)


def wide_cnn_stages(width: int = 32) -> list[nn.Sequential]:
    """The four stages of :func:`wide_cnn`: 28x28 -> 14x14 (stem) -> 14x14 -> 7x7 -> 7x7, channels w, w,
    2w, 4w.

    With ``width=32`` the stages cost about 0.11, 3.6, 10.8 and 21.7 MFLOPs per image."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    w = width
    return [
        # Strided first: a 1-input-channel conv at full 28x28 resolution ran at ~5 GFLOP/s on CPU
        # (6x slower than the rest of the stage for a tenth of its FLOPs); at 14x14 it is cheap.
        nn.Sequential(conv_bn(1, w, stride=2)),
        nn.Sequential(conv_bn(w, w)),
        nn.Sequential(conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w, stride=2)),
        nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w)),
    ]


def wide_cnn(width: int = 32, num_classes: int = NUM_CLASSES, policy=None) -> EarlyExitNet:
    """The wide early-exit CNN: four stages, :func:`spatial_head` exits after the first three, a pooled
    linear classifier after the last (so with a never-exit policy it *is* a plain wide CNN).
    ``width`` (>= 2) is the first stage's channel count.

    The first exit reads the stem (one strided convolution, 0.11 MFLOPs): with its head the exit costs
    0.6 MFLOPs, a sixtieth of the network, and answers the easy images that would otherwise pay for
    the 3.6-MFLOPs convolution before the second exit."""
    if width < 2:
        raise ValueError(f"width must be >= 2, got {width}")
    stages = wide_cnn_stages(width)
    heads = [
        spatial_head(width, num_classes, width // 2, 7),  # stem, 14x14 -> 7x7
        spatial_head(width, num_classes, width // 2, 7),  # 14x14 -> 7x7
        spatial_head(2 * width, num_classes, width, 4),  # 7x7 -> 4x4
        ExitHead(4 * width, num_classes),
    ]
    return EarlyExitNet(stages, heads, policy)


def plain_network(model: EarlyExitNet) -> nn.Sequential:
    """The single network inside an early-exit model: every stage then the last head, no exits.

    Shares the modules (weights) with ``model``. This is the baseline the demo times: a plain
    ``nn.Sequential`` forward, with no adaexit machinery in the way.
    """
    if not isinstance(model, EarlyExitNet):
        raise ValueError(f"plain_network needs an EarlyExitNet, got {type(model).__name__}")
    return nn.Sequential(*model.stages, model.heads[-1])


#: Builders of the demo's networks, by name.
ZOO = {"mlp": mlp, "small_cnn": small_cnn, "wide_cnn": wide_cnn}
