"""``RowCache``: a static KV cache where every row has its own length and positions.

Per decoder layer, keys and values are ``[B, kv_heads, max_len, head_dim]``. Row ``b``'s tokens sit in slots
``0 .. lengths[b]-1``: its left-padded prompt first (padding slots are marked invalid in ``key_valid`` and
never attended to), then every token it generated. A token's position (for the rotary embedding) is its slot
minus the row's padding, so positions count real tokens only, as Hugging Face's ``generate`` does for
left-padded prompts.

Rows advance independently (a speculative row may accept 3 drafts while its neighbour accepts 0): a query at
slot ``s`` attends to valid slots ``<= s``, so slots past a row's length (rejected drafts, left stale) are
never read before they are overwritten. Finished rows leave with :meth:`keep` (the compaction kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import gather_rows


@dataclass
class Step:
    """Where one pass's tokens go, computed once and shared by every layer of the pass.

    ``rows``: cache rows (``None``: all, in order); ``slots`` long ``[n]``: each row's first slot;
    ``q`` tokens per row; ``end``: attention extent (host int); ``start``: the common first slot when every
    row has the same one (a contiguous write), else ``None``; ``mask``: bool ``[n, 1, q, end]`` or ``None``
    (one token, no padding: every slot below ``end`` is visible); ``cos_sin``: the rotary embedding.
    """

    rows: torch.Tensor | None
    slots: torch.Tensor
    q: int
    end: int
    start: int | None
    mask: torch.Tensor | None
    cos_sin: tuple


class RowCache:
    """Static per-row KV cache.

    Args:
        num_layers, batch, kv_heads, max_len, head_dim: the buffer shapes.
        padding: long ``[batch]``: prompt padding slots per row (left padding).
        prompt_len: the padded prompt length (every row's prompt ends at this slot).
    """

    def __init__(self, num_layers, batch, kv_heads, max_len, head_dim, padding, prompt_len, *, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = torch.arange(max_len, device=device)
        self.padding = padding.to(device=device, dtype=torch.long)
        self.key_valid = self.slots[None, :] >= self.padding[:, None]  # [batch, max_len]
        self.lengths = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.padded = bool((self.padding > 0).any())
        self.lengths_prompt = prompt_len

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def positions(self, rows, slots: torch.Tensor, q: int) -> torch.Tensor:
        """Rotary positions ``[n, q]`` of tokens at ``slots[r] + 0..q-1`` (prompt padding not counted)."""
        pad = self.padding if rows is None else self.padding[rows]
        return (slots - pad)[:, None] + torch.arange(q, device=slots.device)[None, :]

    def step(self, rows, slots: torch.Tensor, q: int, end: int, cos_sin, start: int | None = None) -> Step:
        """The :class:`Step` of a pass writing ``q`` tokens per row at ``slots`` (``start``: their common value,
        when the caller knows every row has the same)."""
        padded = self.padded if rows is None else bool((self.padding[rows] > 0).any())
        mask = None if q == 1 and not padded and start is not None else self.attention_mask(rows, slots, q, end)
        return Step(rows, slots, q, end, start, mask, cos_sin)

    def write(self, layer: int, step: Step, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[n, kv_heads, q, head_dim]`` at slots ``slots[r] + 0..q-1`` of the step's
        cache rows."""
        n, _, q, _ = key.shape
        rows, slots = step.rows, step.slots
        if rows is None and step.start is not None:  # one contiguous block for every row
            self.keys[layer][:, :, step.start : step.start + q] = key
            self.values[layer][:, :, step.start : step.start + q] = value
            return
        r = torch.arange(n, device=slots.device) if rows is None else rows
        s = slots[:, None] + torch.arange(q, device=slots.device)[None, :]
        # advanced indices on dims 0 and 2 put their shape [n, q] first: [n, q, kv_heads, head_dim]
        self.keys[layer][r[:, None], :, s] = key.transpose(1, 2)
        self.values[layer][r[:, None], :, s] = value.transpose(1, 2)

    def read(self, layer: int, rows, end: int):
        """Keys and values of slots ``0..end-1`` for cache rows ``rows`` (a view when ``rows`` is ``None``)."""
        k, v = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if rows is None:
            return k, v
        return k[rows], v[rows]

    def attention_mask(self, rows, slots: torch.Tensor, q: int, end: int) -> torch.Tensor:
        """Bool ``[n, 1, q, end]``: query ``j`` of row ``r`` (at slot ``slots[r] + j``) sees valid slots up to
        its own. A padding query sees itself only, so its (unused) output stays finite."""
        valid = self.key_valid[:, :end] if rows is None else self.key_valid[rows, :end]
        query_slot = slots[:, None] + torch.arange(q, device=slots.device)[None, :]  # [n, q]
        key_slot = self.slots[:end]
        causal = key_slot[None, None, :] <= query_slot[:, :, None]
        mask = (causal & valid[:, None, :]) | (key_slot[None, None, :] == query_slot[:, :, None])
        return mask[:, None]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only cache rows ``index`` (long ``[m]``, in that order): finished rows leave."""
        self.keys = [gather_rows(k, index) for k in self.keys]
        self.values = [gather_rows(v, index) for v in self.values]
        self.padding = self.padding[index]
        self.key_valid = self.key_valid[index]
        self.lengths = self.lengths[index]
