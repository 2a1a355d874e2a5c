"""Hugging Face encoder classifiers as adaptive models: exits after encoder layers, attention masks carried
by the surviving rows, padding trimmed as rows leave.

``wrap(model, exits=["bert.encoder.layer.1", "bert.encoder.layer.3"])`` on a
``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``DistilBertForSequenceClassification`` or ``ViTForImageClassification`` (transformers 5.x) gives a
:class:`TransformerExits`: the same keyword inputs, the same output type, and in ``eval()`` mode layer ``k``
runs only on the rows still alive at ``k``.

How rows travel (on the one executor):

* node 0 embeds the input (:class:`TokenBatch`: ids, 2-D attention mask, token types, position ids; or
  pixel values) and runs the first layers; after the embeddings only the hidden states and the 2-D
  attention mask travel with a row (:class:`SequenceBatch`: position ids and token types are consumed by the
  embeddings);
* every node rebuilds the 4-D attention mask of its rows from the 2-D one (a broadcast view: the same
  logits as the model's own materialised mask, for the sdpa and eager attention implementations);
* after each decision the survivors are cut to the longest real length among them (right padding):
  the same results for their real tokens, fewer tokens for every later layer. The lengths are read with
  the decision's one host synchronisation.

A row's exit and logits do not depend on the batch it came in or on its padding (to float rounding).
Left padding is refused: the models' heads read position 0, which is then a pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptiveModel, ExitInfo
from ..cost import count_flops
from ..executor import CARRY, SOURCE, Node, RowBatch
from ..heads import logits_gate
from ..kernels import gather_rows
from ..policies import NeverExitPolicy, Policy


# =============================================================================================
# Rows
# =============================================================================================
def _pad_to(t: torch.Tensor | None, length: int, value) -> torch.Tensor | None:
    """Right-pad dim 1 of ``t`` to ``length``."""
    if t is None or t.shape[1] == length:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad, value=value)


_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "pixel_values")


@dataclass
class TokenBatch(RowBatch):
    """A model's inputs, row-aligned: what the first node (the embeddings) reads.

    ``attention_mask`` is ``[N, L]`` (1 = real token, right padding) or ``None`` (no padding).
    """

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    pad_token_id: int = 0

    def _tensors(self) -> dict:
        return {k: getattr(self, k) for k in _TOKEN_FIELDS if getattr(self, k) is not None}

    @property
    def first(self) -> torch.Tensor:
        for key in ("input_ids", "inputs_embeds", "pixel_values"):
            if getattr(self, key) is not None:
                return getattr(self, key)
        raise ValueError("TokenBatch has no input_ids, inputs_embeds or pixel_values")

    @property
    def device(self) -> torch.device:
        return self.first.device

    def __len__(self) -> int:
        return self.first.shape[0]

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{k: v.to(device) for k, v in self._tensors().items()}, pad_token_id=self.pad_token_id)

    def take(self, index: torch.Tensor, length: int | None = None) -> "TokenBatch":
        taken = {k: gather_rows(v, index) for k, v in self._tensors().items()}
        return TokenBatch(**taken, pad_token_id=self.pad_token_id)

    @classmethod
    def cat(cls, parts: Sequence["TokenBatch"]) -> "TokenBatch":
        seq = [p for p in parts if p.pixel_values is None]
        length = max((p.first.shape[1] for p in seq), default=0)
        pads = {"input_ids": parts[0].pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                "position_ids": 0, "inputs_embeds": 0.0}
        fields = {}
        for key in _TOKEN_FIELDS:
            values = [getattr(p, key) for p in parts]
            if all(v is None for v in values):
                continue
            if key == "attention_mask" and any(v is None for v in values):  # unpadded parts: all real
                values = [torch.ones(p.first.shape[:2], dtype=torch.long, device=p.device) if v is None else v
                          for p, v in zip(parts, values)]
            if any(v is None for v in values):
                raise ValueError(f"cannot merge batches where only some rows have {key}")
            fields[key] = torch.cat([v if key == "pixel_values" else _pad_to(v, length, pads[key]) for v in values])
        return cls(**fields, pad_token_id=parts[0].pad_token_id)


@dataclass
class SequenceBatch(RowBatch):
    """Hidden states ``[N, L, D]`` between encoder layers, with the 2-D attention mask (``None``: no
    padding). :meth:`route_lengths` and ``take(..., length)`` trim trailing padding."""

    hidden: torch.Tensor
    mask: torch.Tensor | None = None
    trim: bool = True

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.hidden.to(device), None if self.mask is None else self.mask.to(device), self.trim)

    def route_lengths(self, route: torch.Tensor, num_routes: int) -> torch.Tensor | None:
        if not self.trim or self.mask is None:
            return None
        lengths = self.mask.sum(dim=1).to(torch.long)
        longest = torch.zeros(num_routes, dtype=torch.long, device=lengths.device)
        return longest.scatter_reduce(0, route, lengths, reduce="amax").clamp_min(1)  # never 0 tokens

    def take(self, index: torch.Tensor, length: int | None = None) -> "SequenceBatch":
        length = self.hidden.shape[1] if length is None else min(int(length), self.hidden.shape[1])
        hidden = gather_rows(self.hidden[:, :length], index)  # the gather kernel reads the trimmed view
        mask = None if self.mask is None else gather_rows(self.mask[:, :length], index)
        return SequenceBatch(hidden, mask, self.trim)

    @classmethod
    def cat(cls, parts: Sequence["SequenceBatch"]) -> "SequenceBatch":
        length = max(p.hidden.shape[1] for p in parts)
        masks = None
        if any(p.mask is not None or p.hidden.shape[1] != length for p in parts):
            masks = [torch.ones(p.hidden.shape[:2], dtype=torch.long, device=p.device) if p.mask is None else p.mask
                     for p in parts]
            masks = torch.cat([_pad_to(m, length, 0) for m in masks])
        hidden = torch.cat([_pad_to(p.hidden, length, 0.0) for p in parts])
        return cls(hidden, masks, parts[0].trim)


# =============================================================================================
# Families
# =============================================================================================
def _bert_embed(embeddings, x: TokenBatch):
    return embeddings(input_ids=x.input_ids, token_type_ids=x.token_type_ids, position_ids=x.position_ids,
                           inputs_embeds=x.inputs_embeds)


def _distilbert_embed(embeddings, x: TokenBatch):
    return embeddings(x.input_ids, x.inputs_embeds, x.position_ids)


def _vit_embed(embeddings, x: TokenBatch, interpolate_pos_encoding=None):
    pixels = x.pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
    return embeddings(pixels, bool_masked_pos=None, interpolate_pos_encoding=interpolate_pos_encoding)


class ClassifierHead(nn.Module):
    """A family's classification head on hidden states ``[N, L, D]``: the modules the model's own
    ``forward`` applies after the encoder, in that order. The gate runs on its logits."""

    def __init__(self, family: str, **modules: nn.Module):
        super().__init__()
        self.family = family
        for name, module in modules.items():
            self.add_module(name, module)

    @property
    def num_classes(self) -> int:
        last = self.out_proj if self.family == "roberta" else self.classifier
        return last.out_features

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":  # BertPooler reads position 0 itself
            return self.classifier(self.dropout(self.pooler(h)))
        if self.family == "roberta":  # RobertaClassificationHead's steps, on position 0
            x = self.dropout(h[:, 0, :])
            x = torch.tanh(self.dense(x))
            return self.out_proj(self.dropout(x))
        if self.family == "distilbert":
            return self.classifier(self.dropout(torch.relu(self.pre_classifier(h[:, 0]))))
        return self.classifier(self.layernorm(h[:, 0]))  # vit: LayerNorm is per token

    def forward(self, batch) -> torch.Tensor:
        return self.logits(batch.hidden if isinstance(batch, SequenceBatch) else batch)

    def gate(self, batch, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return logits_gate(self(batch), criterion, threshold, gate)


class MeanPoolHead(nn.Module):
    """An exit head on the mean of a row's real tokens (the pooling sentence-transformers models are trained
    with): masked mean -> dense -> tanh -> dropout -> linear. Pass it as ``heads=`` to :func:`adaexit.wrap`."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, batch) -> torch.Tensor:
        hidden, mask = (batch.hidden, batch.mask) if isinstance(batch, SequenceBatch) else (batch, None)
        if mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weight = mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))

    def gate(self, batch, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return logits_gate(self(batch), criterion, threshold, gate)


@dataclass(frozen=True)
class Family:
    name: str
    base: str  # attribute of the base model
    layers: str  # path of the layer ModuleList under the base model
    embed: object
    inputs: tuple[str, ...]


FAMILIES = {
    "BertForSequenceClassification": Family(
        "bert", "bert", "encoder.layer", _bert_embed,
        ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")),
    "RobertaForSequenceClassification": Family(
        "roberta", "roberta", "encoder.layer", _bert_embed,
        ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")),
    "DistilBertForSequenceClassification": Family(
        "distilbert", "distilbert", "transformer.layer", _distilbert_embed,
        ("input_ids", "attention_mask", "position_ids", "inputs_embeds")),
    "ViTForImageClassification": Family("vit", "vit", "layers", _vit_embed, ("pixel_values",)),
}  # fmt: skip


def is_huggingface(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def _family(model) -> Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"wrap: {name} is not a supported Hugging Face architecture; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def own_head(model, family: Family) -> ClassifierHead:
    """The model's own head, sharing its modules (the last exit)."""
    if family.name == "bert":
        return ClassifierHead("bert", pooler=model.bert.pooler, dropout=model.dropout, classifier=model.classifier)
    if family.name == "roberta":
        c = model.classifier
        return ClassifierHead("roberta", dense=c.dense, dropout=c.dropout, out_proj=c.out_proj)
    if family.name == "distilbert":
        return ClassifierHead("distilbert", pre_classifier=model.pre_classifier, dropout=model.dropout,
                              classifier=model.classifier)
    return ClassifierHead("vit", layernorm=model.vit.layernorm, classifier=model.classifier)


def fresh_head(model, family: Family) -> ClassifierHead:
    """A new head with the structure of the model's own (BERT: pooler + classifier; DistilBERT:
    pre-classifier + classifier; ViT: layer norm + classifier), initialised as the model initialises."""
    cfg, d, c = model.config, model.config.hidden_size, model.config.num_labels
    if family.name == "bert":
        pooler = type(model.bert.pooler)(cfg) if model.bert.pooler is not None else None
        if pooler is None:
            raise ValueError("wrap: this BERT model has no pooler; pass heads= explicitly")
        head = ClassifierHead("bert", pooler=pooler, dropout=nn.Dropout(model.dropout.p), classifier=nn.Linear(d, c))
    elif family.name == "roberta":
        head = ClassifierHead("roberta", dense=nn.Linear(d, d), dropout=nn.Dropout(model.classifier.dropout.p),
                              out_proj=nn.Linear(d, c))
    elif family.name == "distilbert":
        head = ClassifierHead("distilbert", pre_classifier=nn.Linear(d, d), dropout=nn.Dropout(model.dropout.p),
                              classifier=nn.Linear(d, c))
    else:
        head = ClassifierHead("vit", layernorm=nn.LayerNorm(d, eps=cfg.layer_norm_eps), classifier=nn.Linear(d, c))
    for module in head.modules():
        if module is not head:
            model._init_weights(module)
    return head.to(next(model.parameters()).device)


# =============================================================================================
# Nodes
# =============================================================================================
class EncoderSegment(nn.Module):
    """Consecutive encoder layers (``embed`` first for node 0), on rows that carry their 2-D mask."""

    def __init__(self, model, family: Family, layers: Sequence[nn.Module], embed: bool, trim: bool):
        super().__init__()
        self.config = model.config
        self.family = family
        self.embeddings = getattr(model, family.base).embeddings if embed else None
        self.layers = nn.ModuleList(layers)
        self.trim = trim
        self.interpolate_pos_encoding = None

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
            if self.family.name == "vit":
                hidden = _vit_embed(self.embeddings, x, self.interpolate_pos_encoding)
            else:
                hidden = self.family.embed(self.embeddings, x)
            x = SequenceBatch(hidden, x.attention_mask, self.trim)
        hidden, mask = x.hidden, x.mask
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


# =============================================================================================
# The adaptive model
# =============================================================================================
_REFUSED = {
    "head_mask": "head_mask is not supported (transformers 5 ignores it too)",
    "output_attentions": "output_attentions cannot be honoured: rows that exit early skip later layers",
    "output_hidden_states": "output_hidden_states cannot be honoured: rows that exit early skip later layers",
    "past_key_values": "past_key_values is not supported by an encoder classifier",
    "encoder_hidden_states": "encoder_hidden_states is not supported (encoders only)",
}


class TransformerExits(AdaptiveModel):
    """A Hugging Face encoder classifier with early exits after some of its layers (see the module
    docstring). Built by :func:`adaexit.wrap`; shares every module with the wrapped model.

    Args:
        model: a supported ``*ForSequenceClassification`` / ``ViTForImageClassification`` model.
        exits: dotted names of encoder layers after which an early exit is added, in order.
        heads: one module per early exit mapping ``[N, L, D]`` hidden states to logits (default: a fresh
            head with the model's own head structure).
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
        _, layers = _layers(model, family)
        bounds = [0] + [p + 1 for p in positions] + [len(layers)]
        segments = [
            EncoderSegment(model, family, list(layers[a:b]), embed=(k == 0), trim=trim)
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
        ]
        if heads is None:
            heads = [fresh_head(model, family) for _ in positions]
        heads = list(heads)
        if len(heads) != len(positions):
            raise ValueError(f"wrap: got {len(heads)} heads for {len(positions)} exits")
        self.family = family
        self.__dict__["model"] = model  # not a submodule: its modules are registered once, in the nodes
        self.exit_names = [f"{_layers(model, family)[0]}.{p}" for p in positions]
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList([*heads, own_head(model, family)])
        self._reference_flops: dict = {}
        self.set_policy(policy or NeverExitPolicy())

    # -- the graph ------------------------------------------------------------------------------
    def graph(self) -> list[Node]:
        last = len(self.segments) - 1
        names = [f"up to {n}" for n in self.exit_names] + ["the remaining layers"]
        return [
            Node(names[k], segment, head, (k + 1,) if k < last else (), SOURCE if k == 0 else CARRY)
            for k, (segment, head) in enumerate(zip(self.segments, self.heads))
        ]

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def trim(self) -> bool:
        """Whether survivors' padding is cut after each decision (settable)."""
        return self.segments[0].trim

    @trim.setter
    def trim(self, value: bool) -> None:
        for segment in self.segments:
            segment.trim = bool(value)

    def output_dtype(self) -> torch.dtype:
        return self.heads[-1].classifier.weight.dtype if self.family.name != "roberta" else (
            self.heads[-1].out_proj.weight.dtype)

    # -- inputs and outputs ---------------------------------------------------------------------
    def prepare_input(self, x=None, **kwargs) -> TokenBatch:
        """A :class:`TokenBatch` from the model's keyword inputs (or a mapping of them, e.g. a tokenizer's
        output), checked: right padding, no unsupported argument."""
        if isinstance(x, TokenBatch):
            return x
        if isinstance(x, Mapping) or hasattr(x, "keys"):
            kwargs = {**dict(x), **kwargs}
        elif isinstance(x, torch.Tensor):
            kwargs = {("pixel_values" if self.family.name == "vit" else "input_ids"): x, **kwargs}
        elif x is not None:
            raise ValueError(f"{type(self.model).__name__}: inputs must be keyword tensors or a mapping of them")
        for key, why in _REFUSED.items():
            if kwargs.get(key) is not None and kwargs.get(key) is not False:
                raise ValueError(f"{type(self.model).__name__}: {why}")
        for key in ("output_attentions", "output_hidden_states"):
            if getattr(self.model.config, key, False):
                raise ValueError(f"{type(self.model).__name__}: config.{key}=True cannot be honoured with early exits")
        unknown = set(kwargs) - set(self.family.inputs) - set(_REFUSED) - {"labels", "return_dict",
                                                                            "interpolate_pos_encoding"}
        if unknown:
            raise ValueError(f"{type(self.model).__name__}: unexpected inputs {sorted(unknown)}; "
                             f"it takes {list(self.family.inputs)}")
        fields = {k: kwargs[k] for k in self.family.inputs if kwargs.get(k) is not None}
        if self.family.name == "vit":
            if "pixel_values" not in fields:
                raise ValueError("ViTForImageClassification needs pixel_values")
            self.segments[0].interpolate_pos_encoding = kwargs.get("interpolate_pos_encoding")
        elif ("input_ids" in fields) == ("inputs_embeds" in fields):
            raise ValueError(f"{type(self.model).__name__}: pass exactly one of input_ids or inputs_embeds")
        mask = fields.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, sequence] (2-D), got {tuple(mask.shape)}")
            _check_right_padded(mask)
        return TokenBatch(**fields, pad_token_id=getattr(self.model.config, "pad_token_id", None) or 0)

    def finish_output(self, logits: torch.Tensor, labels: torch.Tensor | None = None, return_dict=None):
        from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

        loss = None if labels is None else F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        kind = ImageClassifierOutput if self.family.name == "vit" else SequenceClassifierOutput
        out = kind(loss=loss, logits=logits)
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
        (``.logits`` in the input row order); ``return_info=True`` adds an :class:`~adaexit.ExitInfo` whose
        FLOPs are counted as the call ran (padding trim included)."""
        labels, return_dict = kwargs.get("labels"), kwargs.get("return_dict")
        if isinstance(input_ids, Mapping) or hasattr(input_ids, "keys"):
            labels = input_ids.get("labels", labels)
        x = self.prepare_input(input_ids, **kwargs)
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return super().exit_logits(x)
        if not return_info:
            logits, _ = self.run(x)
            return self.finish_output(logits, labels, return_dict)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            logits, trace = self.run(x)
        info = ExitInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            rows_decided=trace.rows_decided,
            flops=float(counter.get_total_flops()),  # what really ran, trimmed sequences included
            full_flops=self._plain_flops(x),
            node_names=self.node_names,
        )
        return self.finish_output(logits, labels, return_dict), info

    def _plain_flops(self, x: TokenBatch) -> float:
        """FLOPs of the wrapped model on this (padded) batch, counted once per input shape."""
        key = tuple((k, tuple(v.shape)) for k, v in x._tensors().items())
        if key not in self._reference_flops:
            inputs = x._tensors()
            if self.family.name == "vit":
                inputs = {"pixel_values": inputs["pixel_values"]}
            self._reference_flops[key] = float(count_flops(lambda: self.model(**inputs)))
        return self._reference_flops[key]


def _check_right_padded(mask: torch.Tensor) -> None:
    """Real tokens must be a prefix of every row (right padding, no holes)."""
    m = mask.bool()
    prefix = torch.arange(m.shape[1], device=m.device)[None, :] < m.sum(dim=1, keepdim=True)
    if not torch.equal(m, prefix):
        raise ValueError(
            "attention_mask is not right-padded (every row's real tokens must come first): tokenize with "
            "padding_side='right'; left padding would make the model's head read a pad token"
        )


def wrap_transformer(model, exits: Sequence[str], *, heads=None, policy: Policy | None = None, trim: bool = True):
    """:class:`TransformerExits` around a Hugging Face encoder classifier (see :func:`adaexit.wrap`)."""
    return TransformerExits(model, exits, heads=heads, policy=policy, trim=trim)


__all__ = ["ClassifierHead", "MeanPoolHead", "SequenceBatch", "TokenBatch", "TransformerExits", "is_huggingface", "wrap_transformer"]
