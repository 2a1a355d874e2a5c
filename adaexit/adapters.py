"""``wrap``: turn an existing model into an :class:`EarlyExitNet` by naming where exits go.

The rule: the model's forward must be a **straight chain of its named children**, applied in
registration order, ending in an ``nn.Linear`` classifier. That covers ``nn.Sequential`` and any model
written the same way, torchvision's ResNet family included (``resnet18`` ... ``wide_resnet101_2``,
ResNeXt: ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``). A global average pool and/or
flatten right before the classifier is folded into the last exit head, whose mean-pool + linear is
exactly what the fused exit-gate kernel computes. For other models pass ``example_input`` and the wrapper checks
that the chain reproduces ``model(example_input)``, raising a clear error if the forward is not a chain.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .cost import eval_mode
from .early_exit import EarlyExitNet
from .heads import ExitHead
from .policies import Policy

HEAD_KINDS = ("linear", "conv")


def _chain_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    children = list(model.named_children())
    if not children:
        raise ValueError(f"wrap: {type(model).__name__} has no child modules to split into stages")
    return children


def _split_classifier(children: list[tuple[str, nn.Module]]):
    """Split off the final ``nn.Linear`` and a global pool/flatten just before it (folded into the head)."""
    name, classifier = children[-1]
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"wrap: the last child ({name!r}, {type(classifier).__name__}) must be an nn.Linear "
            "classifier; it becomes the last exit head"
        )
    body = children[:-1]
    # A global average pool (output 1) and the flatten after it are what the exit head's mean-pool
    # does already, so they leave the backbone. A flatten without that pool stays: the head then
    # reads the flattened [N, C*H*W] features.
    if body and isinstance(body[-1][1], nn.Flatten) and len(body) >= 2 and _is_global_pool(body[-2][1]):
        body = body[:-1]
    if body and _is_global_pool(body[-1][1]):
        body = body[:-1]
    return body, classifier


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) and all(
        s == 1 for s in _as_tuple(module.output_size)
    )


def _as_tuple(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size,)


def _out_width(modules: Sequence[nn.Module]) -> int | None:
    """Channels/width of a stage's output, read from its last layer that declares one."""
    for module in reversed(list(modules)):
        for sub in reversed(list(module.modules())):
            for attr in ("out_channels", "out_features", "num_features"):
                value = getattr(sub, attr, None)
                if isinstance(value, int):
                    return value
    return None


def wrap(
    model: nn.Module,
    exits: Sequence[str],
    *,
    head: str | Callable[[int, int], nn.Module] = "linear",
    policy: Policy | None = None,
    example_input: torch.Tensor | None = None,
) -> EarlyExitNet:
    """Wrap ``model`` as an :class:`EarlyExitNet` with an exit after each child named in ``exits``.

    Args:
        model: an ``nn.Sequential``, a torchvision ResNet-family model, or any model whose forward
            applies its named children in order and ends in an ``nn.Linear`` (see the module docstring).
        exits: names of top-level children after which an early exit is added, in forward order.
            The model's own classifier is always the last exit.
        head: ``"linear"`` (pooled linear), ``"conv"`` (conv block + pooled linear) or a callable
            ``(in_channels, num_classes) -> nn.Module``.
        policy: the exit policy (default: never exit early, which reproduces ``model``).
        example_input: a small batch; used to find each stage's output width and to check that the
            chain reproduces ``model(example_input)``.

    The model's modules are shared, not copied: the wrapper and the model hold the same weights.
    """
    exits = list(exits)
    children = _chain_children(model)
    names = [name for name, _ in children]
    body, classifier = _split_classifier(children)
    body_names = [name for name, _ in body]
    for name in exits:
        if name not in names:
            raise ValueError(f"wrap: unknown module name {name!r}; children are {names}")
        if name not in body_names or name == body_names[-1]:
            raise ValueError(
                f"wrap: cannot put an exit after {name!r}: the classifier is the last exit "
                f"(choose among {body_names[:-1]})"
            )
    positions = [body_names.index(name) for name in exits]
    if positions != sorted(set(positions)):
        raise ValueError(f"wrap: exits must be distinct and in forward order, got {exits}")
    bounds = [0] + [p + 1 for p in positions] + [len(body)]
    stages = [nn.Sequential(*[m for _, m in body[a:b]]) for a, b in zip(bounds, bounds[1:])]

    widths = _stage_widths(stages, example_input)
    heads: list[nn.Module] = []
    for k, width in enumerate(widths[:-1]):
        heads.append(_make_head(head, width, classifier.out_features, exits[k]))
    heads.append(ExitHead(classifier=classifier))

    wrapped = EarlyExitNet(stages, heads, policy)
    if example_input is not None:
        _check_chain(model, wrapped, example_input)
    return wrapped


def _stage_widths(stages: list[nn.Module], example_input: torch.Tensor | None) -> list[int]:
    if example_input is not None:
        widths, h = [], example_input[:1]
        with torch.no_grad(), eval_mode(*stages):  # a probe must not touch BatchNorm statistics
            for stage in stages:
                h = stage(h)
                widths.append(h.shape[1])
        return widths
    widths = []
    for k, stage in enumerate(stages):
        width = _out_width(stage)
        if width is None:
            raise ValueError(f"wrap: cannot infer the output width of stage {k}; pass example_input")
        widths.append(width)
    return widths


def _make_head(kind, width: int, num_classes: int, after: str) -> nn.Module:
    if callable(kind):
        return kind(width, num_classes)
    if kind == "linear":
        return ExitHead(width, num_classes)
    if kind == "conv":
        return ExitHead.conv(width, num_classes)
    raise ValueError(f"wrap: head must be one of {HEAD_KINDS} or a callable, got {kind!r} (exit after {after!r})")


def _check_chain(model: nn.Module, wrapped: EarlyExitNet, example_input: torch.Tensor) -> None:
    with torch.no_grad(), eval_mode(model, wrapped):  # a probe must not touch BatchNorm statistics
        expected = model(example_input)
        got = wrapped.exit_logits(example_input)[-1]
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or not torch.allclose(
        expected.float(), got.float(), rtol=1e-4, atol=1e-4
    ):
        raise ValueError(
            f"wrap: {type(model).__name__}.forward is not a straight chain of its named children "
            "(the chain does not reproduce model(example_input)); build an EarlyExitNet by hand"
        )
