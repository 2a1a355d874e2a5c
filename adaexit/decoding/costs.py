"""The cost of decoding steps, measured, and the speedup a strategy's acceptance or depth would give.

:func:`step_costs` times one decoder layer and the LM head at a batch size, for one token per row and for a
verify block; :func:`ideal_speedup` turns a run's measured acceptance (``self_speculative``) or layers per
token (``early_exit``) into the speedup over ``"full"`` those costs allow. The decoding benchmark and the LLM
job both report measured speedups beside these ideals.
"""

from __future__ import annotations

import time

import torch

from .cache import RowCache
from .model import CausalLMExits


@torch.no_grad()
def step_costs(model: CausalLMExits, batch: int, prompt_len: int, block: int, repeats: int = 10) -> dict:
    """Seconds for one decoder layer and for the LM head at this batch size, for 1 token and ``block`` tokens
    per row, on a cache already holding ``prompt_len`` slots (the fastest of ``repeats``: on a shared machine the
    least disturbed run is the closest to the step's own cost)."""
    dtype = next(model.lm.parameters()).dtype
    cache = RowCache(1, batch, model.num_kv_heads, prompt_len + block + 1, model.head_dim,
                     torch.zeros(batch, dtype=torch.long), prompt_len, dtype=dtype, device=torch.device("cpu"))
    out = {}
    for q in (1, block):
        h = torch.randn(batch, q, model.hidden_size, dtype=dtype)
        slots = torch.full((batch,), prompt_len, dtype=torch.long)
        cos_sin = model.rotary(h, cache.positions(None, slots, q))
        times_layer, times_head = [], []
        for r in range(repeats + 1):  # the first round warms up
            t = time.perf_counter()
            model.layer(0, h, cache.step(None, slots, q, prompt_len + q, cos_sin, prompt_len), cache)
            t_layer = time.perf_counter() - t
            t = time.perf_counter()
            model.final_logits(h)
            t_head = time.perf_counter() - t
            if r:
                times_layer.append(t_layer)
                times_head.append(t_head)
        out[q] = (min(times_layer), min(times_head))
    return out


def ideal_speedup(strategy: str, info, model: CausalLMExits, costs: dict, draft_layer: int, num_draft: int) -> float:
    """Time per token of ``"full"`` over the strategy's, from its measured acceptance / layers per token."""
    n = model.num_layers
    (layer1, head1), (layer_b, head_b) = costs[1], costs[max(costs)]
    full = n * layer1 + head1
    if strategy == "self_speculative":
        acc = info.mean_acceptance
        step = num_draft * ((draft_layer + 1) * layer1 + head1) + (draft_layer + 1) * layer1 \
            + (n - draft_layer - 1) * layer_b + head_b
        return full / (step / (acc + 1.0))
    if strategy in ("early_exit", "early_exit_whole_batch"):
        return full / (info.mean_layers_per_token * layer1 + head1)
    return 1.0
