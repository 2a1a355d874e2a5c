"""Rows of a Hugging Face encoder's batch as they travel through the executor: the model's inputs
(:class:`TokenBatch`) and the hidden states between layers with their mask (:class:`SequenceBatch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ...executor import RowBatch
from ...kernels import gather_rows


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
    interpolate_pos_encoding: bool | None = None  # ViT: the model's own keyword, read by its embeddings

    def _settings(self) -> dict:
        return {"pad_token_id": self.pad_token_id, "interpolate_pos_encoding": self.interpolate_pos_encoding}

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
        return TokenBatch(**{k: v.to(device) for k, v in self._tensors().items()}, **self._settings())

    def take(self, index: torch.Tensor, length: int | None = None) -> "TokenBatch":
        taken = {k: gather_rows(v, index) for k, v in self._tensors().items()}
        return TokenBatch(**taken, **self._settings())

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
        if len({p.interpolate_pos_encoding for p in parts}) > 1:
            raise ValueError("cannot merge batches with different interpolate_pos_encoding")
        return cls(**fields, **parts[0]._settings())


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


__all__ = ["SequenceBatch", "TokenBatch"]
