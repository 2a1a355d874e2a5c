"""``generate``: batched greedy or sampled decoding of a :class:`CausalLMExits` with per-row state.

Returns what ``lm.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=...,
eos_token_id=..., pad_token_id=...)`` returns for left-padded prompts: ``[B, P + T]`` with ``T`` the longest
row's new tokens, padding after a row's EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import host_sync_count
from .cache import RowCache
from .model import CausalLMExits, is_causal_lm
from .sampling import Sampler
from .strategies import STRATEGIES, Run

OPTIONS = {
    "full": {},
    "self_speculative": {"draft_exit": 0, "num_draft": 4, "draft_threshold": None},
    "early_exit": {"per_row": True, "fill": "propagate", "max_pending": 4},
}


@dataclass
class DecodeInfo:
    """What :func:`generate` did (``return_info=True``).

    Attributes:
        mean_layers_per_token: decoder layers run per row per generated token after the first (the prompt's
            prefill excluded; a verify pass counts once per row however many tokens it checks; an ``early_exit``
            block with ``fill="recompute"`` counts every token it runs, recomputed ones included).
        acceptance: per input row, the drafts accepted at each verify step (``self_speculative``; else empty).
        exit_counts: tokens produced at each exit (the last entry: the model's own output).
        host_syncs: device-to-host reads during the call.
        steps: decoding steps (verify passes for ``self_speculative``).
        new_tokens: tokens generated per row (up to and including its EOS).
    """

    mean_layers_per_token: float
    acceptance: list[list[int]] = field(default_factory=list)
    exit_counts: list[int] = field(default_factory=list)
    host_syncs: int = 0
    steps: int = 0
    new_tokens: list[int] = field(default_factory=list)

    @property
    def mean_acceptance(self) -> float:
        """Mean drafts accepted per verify step over every row."""
        steps = [a for row in self.acceptance for a in row]
        return sum(steps) / len(steps) if steps else float("nan")


def _token_list(value, name: str) -> list[int]:
    if value is None:
        return []
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    values = [values] if isinstance(values, int) else list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return values


def _check_prompt(input_ids, attention_mask, max_new_tokens, max_positions):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a 2-D long tensor [batch, prompt_len], got {got}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids: prompts must have at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(input_ids.device).long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens) only")
    if (mask[:, 1:] < mask[:, :-1]).any():
        row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
        raise ValueError(
            f"attention_mask: row {row} has padding after its tokens (right padding); decoding needs left-padded "
            "prompts (tokenizer.padding_side = 'left')"
        )
    if (mask[:, -1] == 0).any():
        raise ValueError("attention_mask: a row has no tokens (all padding)")
    longest = int(mask.sum(1).max()) if mask.shape[0] else 0
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise ValueError(
            f"input_ids: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} passes the model's "
            f"max_position_embeddings={max_positions}"
        )
    return mask


def _check_fill(settings: dict, options: dict) -> None:
    fill, cap = settings["fill"], settings["max_pending"]
    if fill not in ("propagate", "recompute"):
        raise ValueError(f"fill must be 'propagate' or 'recompute' (how an exited row's skipped K/V are filled), "
                         f"got {fill!r}")
    if "max_pending" in options and fill != "recompute":
        raise ValueError("max_pending applies to fill='recompute' only")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_pending must be an int >= 1, got {cap!r}")


def generate(
    model: CausalLMExits,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    strategy: str = "full",
    eos_token_id=None,
    pad_token_id=None,
    return_info: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    **options,
):
    """Greedy (default) or sampled decoding of left-padded prompts with per-row state.

    Args:
        model: a :class:`CausalLMExits` (``adaexit.wrap(lm, exits=[...])``).
        input_ids: long ``[B, P]``, left-padded; ``attention_mask`` ``[B, P]`` (``None``: no padding).
        max_new_tokens: tokens to generate per row (>= 1).
        strategy: ``"full"`` (every layer), ``"self_speculative"`` (lossless; options ``draft_exit``, the exit
            index drafting, default 0; ``num_draft``, default 4; ``draft_threshold``: a row stops drafting after a
            draft whose gate score is below it, default ``None``: never) or ``"early_exit"`` (the model's policy
            thresholds on the gates; option ``per_row=False`` for the whole-batch rule; ``fill``: how an exited row's
            skipped layers get its token's K/V, ``"propagate"`` (default, CALM's state propagation: approximate)
            or ``"recompute"`` (deferred: the row's next pass re-runs its pending tokens with its new one,
            exact K/V; ``max_pending``, default 4, pending tokens at most before the row runs the whole model)).
        eos_token_id, pad_token_id: ``None`` takes the model's generation config (pad falls back to EOS).
        return_info: also return a :class:`DecodeInfo`.
        do_sample, temperature, top_k, top_p: Hugging Face's sampling (``do_sample=True``): the logits divided
            by ``temperature``, then the ``top_k`` most likely tokens kept, then the smallest set holding
            ``top_p`` of the probability, then a multinomial draw. ``top_k=None`` / ``top_p=None``: no filter
            (unlike ``lm.generate``, nothing comes from the model's generation config, whose default top-k is 50).
        generator: a ``torch.Generator`` on the model's device for the draws (``None``: the global one).

    What each strategy guarantees when sampling: ``"full"`` draws exactly as ``lm.generate(do_sample=True)``
    (same tokens on the same random state, until the first row finishes: finished rows stop drawing);
    ``"self_speculative"`` is lossless in distribution (speculative sampling: each row's tokens follow the full
    model's warped distribution, though not draw for draw); ``"early_exit"`` samples from the exit a row
    leaves at (lossy, as its greedy form is).

    Returns:
        long ``[B, P + T]`` (and the info with ``return_info=True``).
    """
    if not isinstance(model, CausalLMExits):
        if is_causal_lm(model):
            raise ValueError(
                f"model: wrap {type(model).__name__} first: adaexit.wrap(lm, exits=['model.layers.K', ...])"
            )
        raise ValueError(f"model must be a CausalLMExits from adaexit.wrap, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    unknown = sorted(set(options) - set(OPTIONS[strategy]))
    if unknown:
        allowed = ", ".join(OPTIONS[strategy]) or "none"
        raise TypeError(f"generate(strategy={strategy!r}) got unknown option(s) {unknown}; allowed: {allowed}")
    settings = {**OPTIONS[strategy], **options}
    if strategy == "self_speculative":
        d, m = settings["draft_exit"], settings["num_draft"]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < len(model.exit_layers):
            raise ValueError(f"draft_exit must be an exit index in [0, {len(model.exit_layers)}), got {d!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"num_draft must be an int >= 1, got {m!r}")
        t = settings["draft_threshold"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
            raise ValueError(f"draft_threshold must be None or a gate score in [0, 1], got {t!r}")
    if strategy == "early_exit":
        _check_fill(settings, options)
    device = next(model.lm.parameters()).device
    sampler = Sampler(do_sample, temperature, top_k, top_p, generator, device)
    config = model.lm.generation_config
    eos = _token_list(eos_token_id if eos_token_id is not None else config.eos_token_id, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = _token_list(pad, "pad_token_id")[:1] or eos[:1] or [0]
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    mask = _check_prompt(input_ids, attention_mask, max_new_tokens, model.max_positions)
    syncs = host_sync_count()
    batch, prompt_len = input_ids.shape
    if batch == 0:
        out = input_ids.clone()
        return (out, DecodeInfo(float("nan"))) if return_info else out
    slack = settings.get("num_draft", 0) + settings.get("max_pending", 0) + 1  # blocks reach past the longest row
    param = next(model.lm.parameters())
    with torch.no_grad():
        cache = RowCache(
            model.num_layers, batch, model.num_kv_heads, prompt_len + max_new_tokens + slack, model.head_dim,
            padding=(mask == 0).sum(1), prompt_len=prompt_len, dtype=param.dtype, device=device,
        )
        run = Run(model, cache, input_ids[:, -1], max_new_tokens, eos, pad[0], slack, sampler=sampler)
        first = run.prefill(input_ids)
        none = torch.zeros_like(first)
        run.emit(first[:, None], none + 1, none)
        run.tokens_after_first = 0
        STRATEGIES[strategy](run, **{k: v for k, v in settings.items()})
    new = run.out[:, :max_new_tokens]
    longest = max(run.final_counts)
    sequences = torch.cat([input_ids, new[:, :longest]], 1)
    if not return_info:
        return sequences
    acceptance: list[list[int]] = [[] for _ in range(batch)]
    for rows, accepted in run.accepted:
        for r, a in zip(rows.tolist(), accepted.tolist()):
            acceptance[r].append(a)
    info = DecodeInfo(
        mean_layers_per_token=run.layer_passes / max(1, run.tokens_after_first),
        acceptance=acceptance,
        exit_counts=run.exit_counts,
        host_syncs=host_sync_count() - syncs,
        steps=run.steps,
        new_tokens=run.final_counts,
    )
    return sequences, info
