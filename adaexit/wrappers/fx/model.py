"""The wrapped model (:class:`ModelExits`) and :func:`wrap` for the fx backend."""

from __future__ import annotations

import threading
import warnings
from typing import Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from ...base import AdaptiveModel
from ...cost import module_device
from ...early_exit import EarlyExitNet, check_chain
from ...heads import ExitHead, LogitsHead
from ...policies import NeverExitPolicy, Policy
from ..common import SavedExits, early_heads, follow_mode, refuse_options
from .heads import _layout_reader, default_head
from .layouts import CutPoint
from .split import Split, _check_names, split_model


class _FirstStage(nn.Module):
    """Stage 0 of a model whose default heads wait for their first batch: before running, it builds them from
    that batch (under a lock), whichever path runs the graph (forward, ``stream``, a ``Server``'s worker)."""

    def __init__(self, owner: "ModelExits", stage: nn.Module):
        super().__init__()
        self.__dict__["owner"], self.__dict__["stage"] = owner, stage  # not registered: views only

    def forward(self, x):
        self.owner._materialize(x)
        return self.stage(x)


_MATERIALIZE = threading.Lock()  # one first batch builds the heads, even when several threads bring one


class ModelExits(SavedExits, EarlyExitNet):
    """An existing model split at named modules (:func:`split_model`), with an exit head after each.

    ``stages`` are the split's stages plus its tail (the model's own path to its output); ``heads`` the exit
    heads plus, last, a :class:`~adaexit.heads.LogitsHead` that hands the model's logits to the gate. So
    with a never-exit policy the output is ``model(x)``, bit for bit, and ``train(heads_only=True)`` trains
    only the new exit heads (the whole model, its classifier included, is the frozen backbone).

    The model is registered once, as ``self.model`` (its ``state_dict`` keys prefixed ``model.``); the
    pieces are held unregistered, so nothing is counted twice; the early exits' heads are ``exit_heads``
    (keys ``exit_heads.K.``); the exit names and layouts are saved too (``_extra_state``: loading a state
    saved for other exits is refused). Without ``example_input`` the default heads are built from the first
    batch the model sees (under a lock): their parameters exist from the start (uninitialised, so an
    optimizer built before holds them; left out of ``state_dict`` until then) and take their width, and the
    heads their layout reader, from that batch's shapes.

    Attributes:
        model: the wrapped model. exits: the exit names. layouts: each exit's layout (``None`` until known).
        exit_heads: the early exits' heads. cuts: a :class:`CutPoint` per exit (shape, layout).
        notes: what differs from the model (e.g. train-mode auxiliary heads left out).
    """

    def __init__(self, model: nn.Module, split: Split, heads=None, policy: Policy | None = None):
        AdaptiveModel.__init__(self)  # not EarlyExitNet's: the stages must not be registered a second time
        self.model = model
        self.exits = [c.name for c in split.cuts]
        self._split = split
        device = module_device(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        widths = [c.feature_dim if c.feature_dim is not None else c.shape[1] for c in split.cuts] if split.probed \
            else None
        made = early_heads(heads, len(split.cuts), widths, self._classes() if split.probed else None,
                           "pass example_input (a batch of one or two inputs), from whose traced shapes the widths "
                           "are read")
        if made is not None:
            made = [h.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
                    if callable(heads) else h for h in made]
        elif split.probed:
            made = [default_head(cut, self._classes(), device, dtype) for cut in split.cuts]
        else:
            with warnings.catch_warnings():  # torch warns that lazy modules are new
                warnings.simplefilter("ignore", UserWarning)
                made = [ExitHead(classifier=nn.LazyLinear(0, device=device, dtype=dtype)) for _ in split.cuts]
        self.exit_heads = nn.ModuleList(made)
        self._logits_head = LogitsHead(self._classes() if split.probed else None)
        self._pending = not split.probed
        check_chain(self.stages, self.heads)
        self.set_policy(policy or NeverExitPolicy())
        # load_state_dict(assign=True) replaces the model's tensors: the traced code must read the new ones
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)
        self.register_state_dict_post_hook(_drop_uninitialised)

    @property
    def layouts(self) -> list[str | None]:
        return [c.layout for c in self._split.cuts]

    # -- the chain ------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[nn.Module, ...]:
        """The split's stages, then its tail (the model's own path from the last exit to its output)."""
        first = _FirstStage(self, self._split.stages[0]) if self._pending else self._split.stages[0]
        return (first, *self._split.stages[1:], self._split.tail)

    @property
    def heads(self) -> tuple[nn.Module, ...]:
        """The exit heads, then the logits head of the model's own output."""
        return (*self.exit_heads, self._logits_head)

    @property
    def cuts(self) -> list[CutPoint]:
        return self._split.cuts

    @property
    def notes(self) -> list[str]:
        return self._split.notes

    def output_dtype(self) -> torch.dtype:
        """The dtype the model returns (the gate computes in fp32): that of the last floating-point parameter
        on its own path to the output (its classifier's), read now so that it follows ``.half()``."""
        for module in (self._split.tail, self.model):
            floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
            if floating:
                return floating[-1]
        return torch.float32

    def _classes(self) -> int:
        shape = self._split.output_shape
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"wrap: {type(self.model).__name__} must return logits [N, classes]; it returned "
                f"{'a non-tensor' if shape is None else f'shape {shape}'} for the example input"
            )
        return shape[1]

    # -- heads built from the first batch (wrap without example_input) ---------------------------
    def _materialize(self, x) -> None:
        """Probe the split with one row of ``x``, then give every lazily built head its width (its
        parameters are initialised in place) and its layout reader."""
        if not self._pending:
            return
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
            return  # an empty batch tells nothing; nothing runs a head on it
        with _MATERIALIZE:
            if self._pending:  # another thread may have built them meanwhile
                self._build_heads(x[:1])

    def _build_heads(self, x: torch.Tensor) -> None:
        self._split.probe(x, what="stage 0: building the exit heads from the first batch, {model} failed on its "
                                  "first row")
        classes = self._classes()
        for cut, head in zip(self._split.cuts, self.exit_heads):
            reader = _layout_reader(cut)  # raises for a shape no default head reads, naming the exit
            if reader is not None:
                head.features = reader
            lazy = head.classifier
            lazy.in_features, lazy.out_features = cut.feature_dim, classes
            # A first call initialises the parameters in place (unless a loaded state_dict did) and makes the
            # module a Linear; never as inference tensors, even when the first batch comes in inference mode.
            with torch.inference_mode(False), torch.no_grad():
                lazy(torch.zeros(1, cut.feature_dim, device=lazy.weight.device, dtype=lazy.weight.dtype))
        self._logits_head.num_classes = classes
        self._pending = False

    def run(self, x):
        self._materialize(x)
        return super().run(x)

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._materialize(x)
        return super().exit_logits(x)

    def exit_costs(self, x: torch.Tensor, cost: str = "flops"):
        self._materialize(x)
        return super().exit_costs(x, cost)

    # -- the pieces' own references ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """After ``.to()`` / ``.half()`` / ...: the pieces follow the model (see :meth:`_resync_traced_tensors`)."""
        result = super()._apply(fn, recurse)
        self._resync_traced_tensors()
        return result

    def _resync_traced_tensors(self) -> None:
        """Tensors the traced code reads directly (``get_attr`` nodes: a ViT's class token, a root-level
        buffer) are re-read from the model, in the pieces and in the traced graph that probes the first
        batch: ``.to()`` replaces buffers, ``load_state_dict(assign=True)`` parameters too."""
        for piece in [*self._split.pieces, self._split._trace.gm]:
            for node in piece.graph.nodes:
                if node.op == "get_attr":
                    *path, attr = node.target.split(".")
                    owner, source = piece, self.model
                    for part in path:
                        owner, source = getattr(owner, part), getattr(source, part)
                    value = getattr(source, attr)
                    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                        owner._buffers[attr] = value
                    elif isinstance(value, nn.Parameter):
                        owner._parameters[attr] = value

    def extra_repr(self) -> str:
        return f"exits={self.exits}"


def _before_load(module: "ModelExits", state_dict, prefix, *args) -> None:
    module.__dict__["_load_prefix"] = prefix  # where this model sits in the state being loaded (a cascade member)


def _after_load(module: "ModelExits", incompatible_keys) -> None:
    """After ``load_state_dict``: heads still waiting for their first batch were saved without weights (not
    missing); the traced code reads the model's tensors (``assign=True`` replaces them)."""
    if module._pending:
        prefix = module.__dict__.get("_load_prefix", "")
        waiting = tuple(f"{prefix}exit_heads.{k}." for k, h in enumerate(module.exit_heads) if _uninitialised(h))
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(waiting)]
    module._resync_traced_tensors()


def _uninitialised(module: nn.Module) -> bool:
    return any(isinstance(p, UninitializedParameter) for p in module.parameters())


def _drop_uninitialised(module: "ModelExits", state_dict, prefix, local_metadata) -> None:
    """Heads still waiting for their first batch have no weights to save: their uninitialised parameters are
    left out, so the state loads with ``torch.load(weights_only=True)``."""
    for key in [k for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, UninitializedParameter)]:
        del state_dict[key]


def wrap(model: nn.Module, exits: Sequence[str], **options) -> ModelExits:
    """Wrap ``model`` as an :class:`~adaexit.EarlyExitNet` with an exit after each module named in ``exits``
    (see :func:`adaexit.wrap`).

    Args:
        model: any single-input model whose forward torch.fx can trace along the way to the exits (every
            torchvision classification model; timm's). Its modules are shared, not copied. Extra forward
            parameters with defaults keep their defaults.
        exits: dotted module paths as ``model.named_modules()`` names them (``"layer2"``, ``"features.3"``,
            ``"encoder.layers.encoder_layer_5"``), in forward order. A name must be a valid cut: called
            once, returning one tensor, with nothing else live across it (not inside a residual block).
            :func:`candidate_exits` lists the valid ones. The model's own output is always the last exit.
        heads: ``None`` (default: the layout's view, then a pooled linear, fused into the exit-gate kernel:
            NCHW maps pooled, channels-last maps through a channels-first view, token sequences through their
            class token), one ``nn.Module`` per early exit (it receives the stage output as it is), or a
            callable ``(width, num_classes) -> nn.Module`` (e.g. ``ExitHead.conv``; needs ``example_input``).
        policy: the exit policy (default: never exit early, which reproduces ``model``).
        example_input: a batch of one or two inputs. Widths, layouts and the class count come from its
            traced shapes. Without it the default heads are built from the first batch the model sees.

    ``trim=`` (Hugging Face only) is refused. The result is in ``model``'s mode (train or eval).
    """
    refuse_options("torch.fx-traced models", options, ("heads", "policy", "example_input"))
    example_input = options.get("example_input")
    exits = _check_names(model, exits)
    if not exits:
        raise ValueError("wrap: exits is empty: name at least one module to put an early exit after")
    split = split_model(model, exits, example_input)
    for note in split.notes:
        warnings.warn(f"wrap({type(model).__name__}): {note}", stacklevel=3)  # the caller of adaexit.wrap
    wrapped = ModelExits(model, split, heads=options.get("heads"), policy=options.get("policy"))
    return follow_mode(wrapped, model)


__all__ = ["CutPoint", "ModelExits", "wrap"]
