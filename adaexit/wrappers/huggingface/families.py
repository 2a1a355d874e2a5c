"""Supported architectures as table entries (:data:`FAMILIES`), each carrying the callables that embed
its inputs and build and apply its classification head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...heads import logits_gate
from .rows import SequenceBatch, TokenBatch


class ClassifierHead(nn.Module):
    """A classification head on hidden states ``[N, L, D]``: ``modules`` applied as the family's ``logits``
    function applies them (the model's own head shares the model's modules). The gate runs on its logits."""

    def __init__(self, logits, **modules: nn.Module):
        super().__init__()
        self._logits = logits
        for name, module in modules.items():
            self.add_module(name, module)

    @property
    def num_classes(self) -> int:
        return _last_linear(self).out_features

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(self, h)

    def forward(self, batch) -> torch.Tensor:
        return self.logits(batch.hidden if isinstance(batch, SequenceBatch) else batch)

    def gate(self, batch, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return logits_gate(self(batch), criterion, threshold, gate)


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


class MeanPoolHead(nn.Module):
    """An exit head on the mean of a row's real tokens (the pooling sentence-transformers models are trained
    with): masked mean -> dense -> tanh -> dropout -> linear. Pass it in ``heads=`` to :func:`adaexit.wrap`."""

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


class HiddenStatesHead(nn.Module):
    """A user's head without a ``gate`` seen by the executor: it gets the hidden states ``[N, L, D]`` (a head
    with a ``gate``, like :class:`MeanPoolHead`, gets the rows with their mask). Transient: never registered."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, batch) -> torch.Tensor:
        return self.head(batch.hidden if isinstance(batch, SequenceBatch) else batch)

    def gate(self, batch, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return logits_gate(self(batch), criterion, threshold, gate)


def _bert_embed(embeddings, x: TokenBatch):
    return embeddings(input_ids=x.input_ids, token_type_ids=x.token_type_ids, position_ids=x.position_ids,
                      inputs_embeds=x.inputs_embeds)


def _distilbert_embed(embeddings, x: TokenBatch):
    return embeddings(x.input_ids, x.inputs_embeds, x.position_ids)


def _vit_embed(embeddings, x: TokenBatch):
    pixels = x.pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
    return embeddings(pixels, bool_masked_pos=None, interpolate_pos_encoding=x.interpolate_pos_encoding)


def _bert_logits(head, h):  # BertPooler reads position 0 itself
    return head.classifier(head.dropout(head.pooler(h)))


def _roberta_logits(head, h):  # RobertaClassificationHead's steps, on position 0
    x = torch.tanh(head.dense(head.dropout(h[:, 0, :])))
    return head.out_proj(head.dropout(x))


def _distilbert_logits(head, h):
    return head.classifier(head.dropout(torch.relu(head.pre_classifier(h[:, 0]))))


def _vit_logits(head, h):  # LayerNorm is per token
    return head.classifier(head.layernorm(h[:, 0]))


def _bert_fresh(model):
    if model.bert.pooler is None:
        raise ValueError("wrap: this BERT model has no pooler, so no default exit head; pass heads=")
    d, c = model.config.hidden_size, model.config.num_labels
    return dict(pooler=type(model.bert.pooler)(model.config), dropout=nn.Dropout(model.dropout.p),
                classifier=nn.Linear(d, c))


def _roberta_fresh(model):
    d, c = model.config.hidden_size, model.config.num_labels
    return dict(dense=nn.Linear(d, d), dropout=nn.Dropout(model.classifier.dropout.p), out_proj=nn.Linear(d, c))


def _distilbert_fresh(model):
    d, c = model.config.hidden_size, model.config.num_labels
    return dict(pre_classifier=nn.Linear(d, d), dropout=nn.Dropout(model.dropout.p), classifier=nn.Linear(d, c))


def _vit_fresh(model):
    d, c = model.config.hidden_size, model.config.num_labels
    return dict(layernorm=nn.LayerNorm(d, eps=model.config.layer_norm_eps), classifier=nn.Linear(d, c))


_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclass(frozen=True)
class Family:
    """One supported architecture: where its parts are and the callables that use them."""

    base: str  # attribute of the base model
    layers: str  # path of the layer ModuleList under the base model
    inputs: tuple[str, ...]  # the keyword inputs the embeddings read
    embed: Callable  # (embeddings, TokenBatch) -> hidden states
    own_head: Callable  # model -> {name: module} of the model's own head
    fresh_head: Callable  # model -> {name: new module} with the structure of the own head
    logits: Callable  # (head, hidden states) -> logits
    output: str  # the output class in transformers.modeling_outputs
    ignored: tuple[str, ...] = ()  # inputs the plain model accepts and ignores (a tokenizer may send them)
    refused: tuple[tuple[str, str], ...] = ()  # inputs the plain model takes that cannot be honoured, and why

    @property
    def primary(self) -> str:
        """What a positional tensor is."""
        return self.inputs[0]


FAMILIES = {
    "BertForSequenceClassification": Family(
        "bert", "encoder.layer", _TEXT_INPUTS, _bert_embed,
        lambda m: dict(pooler=m.bert.pooler, dropout=m.dropout, classifier=m.classifier),
        _bert_fresh, _bert_logits, "SequenceClassifierOutput"),
    "RobertaForSequenceClassification": Family(
        "roberta", "encoder.layer", _TEXT_INPUTS, _bert_embed,
        lambda m: dict(dense=m.classifier.dense, dropout=m.classifier.dropout, out_proj=m.classifier.out_proj),
        _roberta_fresh, _roberta_logits, "SequenceClassifierOutput"),
    "DistilBertForSequenceClassification": Family(
        "distilbert", "transformer.layer", ("input_ids", "attention_mask", "position_ids", "inputs_embeds"),
        _distilbert_embed,
        lambda m: dict(pre_classifier=m.pre_classifier, dropout=m.dropout, classifier=m.classifier),
        _distilbert_fresh, _distilbert_logits, "SequenceClassifierOutput", ignored=("token_type_ids",)),
    "ViTForImageClassification": Family(
        "vit", "layers", ("pixel_values",), _vit_embed,
        lambda m: dict(layernorm=m.vit.layernorm, classifier=m.classifier),
        _vit_fresh, _vit_logits, "ImageClassifierOutput",
        refused=(("attention_mask", "an attention mask over image patches is not supported"),)),
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
    return ClassifierHead(family.logits, **family.own_head(model))


def fresh_head(model, family: Family) -> ClassifierHead:
    """A new head with the structure of the model's own (BERT: pooler + classifier; DistilBERT:
    pre-classifier + classifier; ViT: layer norm + classifier), initialised as the model initialises, in
    the model's dtype and on its device."""
    head = ClassifierHead(family.logits, **family.fresh_head(model))
    for module in head.modules():
        if module is not head:
            model._init_weights(module)
    first = next(model.parameters())
    return head.to(device=first.device, dtype=first.dtype)


__all__ = ["FAMILIES", "ClassifierHead", "Family", "HiddenStatesHead", "MeanPoolHead", "fresh_head", "is_huggingface",
           "own_head"]
