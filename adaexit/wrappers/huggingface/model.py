"""The wrapped model (:class:`TransformerExits`), its nodes (:class:`EncoderSegment`) and
:func:`wrap_transformer`."""

from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...base import AdaptiveModel
from ...executor import CARRY, SOURCE, Node
from ...policies import NeverExitPolicy, Policy
from ..common import SavedExits, early_heads, follow_mode, refuse_options
from .families import Family, HiddenStatesHead, _family, _last_linear, fresh_head, own_head
from .rows import SequenceBatch, TokenBatch


class EncoderSegment(nn.Module):
    """Consecutive encoder layers (``embed`` first for node 0), on rows that carry their 2-D mask. Its
    modules are the model's (the wrapper holds segments unregistered: the model is registered once)."""

    def __init__(self, model, family: Family, layers: Sequence[nn.Module], embed: bool, trim: bool):
        super().__init__()
        self.config = model.config
        self.family = family
        self.embeddings = getattr(model, family.base).embeddings if embed else None
        self.layers = nn.ModuleList(layers)
        self.trim = trim

    def attention_mask(self, mask: torch.Tensor | None, hidden: torch.Tensor):
        """The 4-D mask each layer takes, from the rows' 2-D mask (see the module docstring)."""
        if mask is None:
            return None
        implementation = getattr(self.config, "_attn_implementation", "eager")
        keep = mask.bool()[:, None, None, :]
        if implementation == "sdpa":
            return keep
        if implementation == "eager":
            return torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~keep, torch.finfo(hidden.dtype).min)
        from transformers.masking_utils import create_bidirectional_mask  # other kernels: the model's own builder

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)

    def forward(self, x) -> SequenceBatch:
        if self.embeddings is not None:
            hidden = self.family.embed(self.embeddings, x)
            x = SequenceBatch(hidden, x.attention_mask, self.trim)
        hidden, mask = x.hidden, x.mask
        if hidden.shape[0] == 0:  # no rows: the layers keep the shape (their attention reshapes cannot infer it)
            return SequenceBatch(hidden, mask, self.trim)
        mask4 = self.attention_mask(mask, hidden)
        for layer in self.layers:
            out = layer(hidden, mask4)
            hidden = out[0] if isinstance(out, tuple) else out
        return SequenceBatch(hidden, mask, self.trim)


def _layers(model, family: Family) -> tuple[str, nn.ModuleList]:
    path = f"{family.base}.{family.layers}"
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"wrap: {type(model).__name__}.{path} is not the ModuleList of encoder layers")
    return path, layers


def _exit_positions(model, family: Family, exits: Sequence[str]) -> list[int]:
    path, layers = _layers(model, family)
    positions = []
    valid = [f"{path}.{i}" for i in range(len(layers) - 1)]
    for name in exits:
        if not name.startswith(path + ".") or not name[len(path) + 1:].isdigit():
            raise ValueError(
                f"wrap: {name!r} is not an encoder layer of {type(model).__name__}; exits go after layers "
                f"{valid[0]} ... {valid[-1]}" if valid else f"wrap: {type(model).__name__} has one layer: no early exit"
            )
        i = int(name[len(path) + 1:])
        if i >= len(layers) - 1:
            raise ValueError(
                f"wrap: cannot put an exit after {name!r}: the model's own classifier is the last exit "
                f"(choose among {valid})"
            )
        positions.append(i)
    if positions != sorted(set(positions)):
        raise ValueError(f"wrap: exits must be distinct and in forward order, got {list(exits)}")
    return positions


_REFUSED = {
    "head_mask": "head_mask is not supported (transformers 5 ignores it too)",
    "output_attentions": "output_attentions cannot be honoured: rows that exit early skip later layers",
    "output_hidden_states": "output_hidden_states cannot be honoured: rows that exit early skip later layers",
    "past_key_values": "past_key_values is not supported by an encoder classifier",
    "encoder_hidden_states": "encoder_hidden_states is not supported (encoders only)",
}
_OPTIONS = ("labels", "return_dict", "interpolate_pos_encoding", "use_cache")  # read here, not by the embeddings


def _named_inputs(model) -> set[str]:
    """The keyword inputs the plain model's ``forward`` names."""
    params = inspect.signature(type(model).forward).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class TransformerExits(SavedExits, AdaptiveModel):
    """A Hugging Face encoder classifier with early exits after some of its layers (see the module
    docstring). Built by :func:`adaexit.wrap`; shares every module with the wrapped model.

    The wrapped model is registered once, as ``model`` (``state_dict`` keys ``model.*``); the early exits'
    heads are ``exit_heads`` (``exit_heads.K.*``); the segments of layers and the model's own head (its
    modules) are held unregistered; the exit names are saved (``_extra_state``). ``config``, ``device`` and
    ``dtype`` are the model's, so Hugging Face pipelines take the wrapped model as they take the model.

    Args:
        model: a supported ``*ForSequenceClassification`` / ``ViTForImageClassification`` model.
        exits: dotted names of encoder layers after which an early exit is added, in order.
        heads: one module per early exit (default: a fresh head with the model's own head structure). A
            head with a ``gate`` method (:class:`MeanPoolHead`) reads the rows with their mask
            (:class:`SequenceBatch`); any other module reads the hidden states ``[N, L, D]``.
        policy: who exits where (default: never exit early: the wrapped model's results).
        trim: cut the survivors' padding after each decision (same results, less work).
    """

    def __init__(self, model, exits: Sequence[str], heads: Sequence[nn.Module] | None = None,
                 policy: Policy | None = None, trim: bool = True):
        super().__init__()
        family = _family(model)
        config = model.config
        if config.num_labels < 2 or config.problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"wrap: early exit needs single-label classification (num_labels >= 2); {type(model).__name__} "
                f"has num_labels={config.num_labels}, problem_type={config.problem_type!r}"
            )
        positions = _exit_positions(model, family, list(exits))
        path, layers = _layers(model, family)
        bounds = [0] + [p + 1 for p in positions] + [len(layers)]
        segments = [
            EncoderSegment(model, family, list(layers[a:b]), embed=(k == 0), trim=trim)
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
        ]
        heads = early_heads(heads, len(positions), config.hidden_size, config.num_labels,
                            "the hidden size is known")
        if heads is None:
            heads = [fresh_head(model, family) for _ in positions]
        self.family = family
        self.model = model
        self.exits = [f"{path}.{p}" for p in positions]
        self.layouts = ["tokens"] * len(positions)
        self.exit_heads = nn.ModuleList(heads)
        self.__dict__["_segments"] = segments  # the model's own modules: registered once, under `model`
        self.__dict__["_own_head"] = own_head(model, family)
        self._inputs = (_named_inputs(model) | set(family.inputs) | set(family.ignored)) - set(_REFUSED)
        self.set_policy(policy or NeverExitPolicy())

    # -- what Hugging Face clients (pipelines) read from a model --------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def can_generate(self) -> bool:
        return False

    # -- the chain ------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[EncoderSegment, ...]:
        return tuple(self._segments)

    @property
    def heads(self) -> tuple[nn.Module, ...]:
        """The exit heads, then the model's own head."""
        return (*self.exit_heads, self._own_head)

    def graph(self) -> list[Node]:
        last = len(self._segments) - 1
        names = [f"up to {n}" for n in self.exits] + ["the remaining layers"]
        heads = [h if callable(getattr(h, "gate", None)) else HiddenStatesHead(h) for h in self.heads]
        return [
            Node(names[k], segment, head, (k + 1,) if k < last else (), SOURCE if k == 0 else CARRY)
            for k, (segment, head) in enumerate(zip(self._segments, heads))
        ]

    @property
    def num_exits(self) -> int:
        return len(self._segments)

    @property
    def trim(self) -> bool:
        """Whether survivors' padding is cut after each decision (settable)."""
        return self._segments[0].trim

    @trim.setter
    def trim(self, value: bool) -> None:
        for segment in self._segments:
            segment.trim = bool(value)

    def output_dtype(self) -> torch.dtype:
        return _last_linear(self._own_head).weight.dtype

    # -- inputs and outputs ---------------------------------------------------------------------
    def prepare_input(self, x=None, **kwargs) -> TokenBatch:
        """A :class:`TokenBatch` from the model's keyword inputs (or a mapping of them, e.g. a tokenizer's
        output), checked: right padding, no unsupported argument. Pure: it builds nothing and changes
        nothing (safe on a ``Server``'s client threads)."""
        if isinstance(x, TokenBatch):
            return x
        name = type(self.model).__name__
        if isinstance(x, Mapping) or hasattr(x, "keys"):
            kwargs = {**dict(x), **kwargs}
        elif isinstance(x, torch.Tensor):
            kwargs = {self.family.primary: x, **kwargs}
        elif x is not None:
            raise ValueError(f"{name}: inputs must be keyword tensors or a mapping of them")
        for key, why in (*_REFUSED.items(), *self.family.refused):
            if kwargs.get(key) is not None and kwargs.get(key) is not False:
                raise ValueError(f"{name}: {why}")
        for key in ("output_attentions", "output_hidden_states"):
            if getattr(self.model.config, key, False):
                raise ValueError(f"{name}: config.{key}=True cannot be honoured with early exits")
        unknown = set(kwargs) - self._inputs - set(_REFUSED) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"{name}: unexpected inputs {sorted(unknown)}; it takes {list(self.family.inputs)}")
        fields = {k: kwargs[k] for k in self.family.inputs if kwargs.get(k) is not None}
        if self.family.primary == "pixel_values":
            if "pixel_values" not in fields:
                raise ValueError(f"{name} needs pixel_values")
        elif ("input_ids" in fields) == ("inputs_embeds" in fields):
            raise ValueError(f"{name}: pass exactly one of input_ids or inputs_embeds")
        mask = fields.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, sequence] (2-D), got {tuple(mask.shape)}")
            _check_right_padded(mask)
        return TokenBatch(**fields, pad_token_id=getattr(self.model.config, "pad_token_id", None) or 0,
                          interpolate_pos_encoding=kwargs.get("interpolate_pos_encoding"))

    def finish_output(self, logits: torch.Tensor, labels: torch.Tensor | None = None, return_dict=None):
        from transformers import modeling_outputs

        loss = None if labels is None else F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        out = getattr(modeling_outputs, self.family.output)(loss=loss, logits=logits)
        use_dict = self.model.config.return_dict if return_dict is None else return_dict
        return out if use_dict else out.to_tuple()

    def exit_logits(self, x) -> list[torch.Tensor]:
        return super().exit_logits(self.prepare_input(x))

    def exit_costs(self, x, cost: str = "flops"):
        return super().exit_costs(self.prepare_input(x), cost)

    def forward(self, input_ids=None, return_info: bool = False, **kwargs):
        """The wrapped model's keyword inputs (``input_ids``, ``attention_mask``, ``token_type_ids``,
        ``position_ids``, ``inputs_embeds``; ``pixel_values`` for ViT; ``labels``, ``return_dict``), or one
        mapping of them. ``train()``: every exit's logits (a list). ``eval()``: the model's output type
        (``.logits`` in the input row order); ``return_info=True`` adds an :class:`~adaexit.ExitInfo` (FLOPs
        from the cached per-row costs of each node at the batch's padded length, as for every model)."""
        labels, return_dict = kwargs.get("labels"), kwargs.get("return_dict")
        if isinstance(input_ids, Mapping) or hasattr(input_ids, "keys"):
            labels = input_ids.get("labels", labels)
        x = self.prepare_input(input_ids, **kwargs)
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return super().exit_logits(x)
        logits, trace = self.run(x)
        out = self.finish_output(logits, labels, return_dict)
        return (out, self.exit_info(x, trace)) if return_info else out

    def extra_repr(self) -> str:
        return f"exits={self.exits}"


def _check_right_padded(mask: torch.Tensor) -> None:
    """Real tokens must be a prefix of every row (right padding, no holes)."""
    m = mask.bool()
    prefix = torch.arange(m.shape[1], device=m.device)[None, :] < m.sum(dim=1, keepdim=True)
    if not torch.equal(m, prefix):
        raise ValueError(
            "attention_mask is not right-padded (every row's real tokens must come first): tokenize with "
            "padding_side='right'; left padding would make the model's head read a pad token"
        )


def wrap_transformer(model, exits: Sequence[str], **options) -> TransformerExits:
    """:class:`TransformerExits` around a Hugging Face encoder classifier (see :func:`adaexit.wrap`), in the
    model's mode. ``example_input`` (a mapping of keyword tensors) is checked as the model would check it."""
    refuse_options("Hugging Face models", options, ("heads", "policy", "example_input", "trim"))
    trim = options.get("trim")
    wrapped = TransformerExits(model, exits, heads=options.get("heads"), policy=options.get("policy"),
                               trim=True if trim is None else bool(trim))
    if options.get("example_input") is not None:
        wrapped.prepare_input(options["example_input"])
    return follow_mode(wrapped, model)


__all__ = ["EncoderSegment", "TransformerExits", "wrap_transformer"]
