"""Token choice for :func:`~adaexit.decoding.generate`: greedy, or Hugging Face's multinomial sampling.

Sampling warps the logits exactly as ``lm.generate(do_sample=True, ...)`` does, with transformers' own
warpers in its order (temperature, then top-k, then top-p, each left out at its neutral value), in float32,
then softmax and ``torch.multinomial(probs, 1)`` over the whole ``[rows, vocab]`` batch. On the same random
state and the same rows, the draws are Hugging Face's.

:func:`speculative_accept` is the lossless speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023),
applied per row.
"""

from __future__ import annotations

import math

import torch


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same type, and the same index where both name one (``cuda`` means the current device)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    """How a strategy turns logits into tokens (``do_sample=False``: argmax, untouched).

    Args:
        do_sample, temperature, top_k, top_p, generator: :func:`generate`'s keywords (checked here).
        device: the model's device (the generator must live there).
    """

    def __init__(self, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None, device=None):
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
        if not _is_real(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None (no top-k filter) or an int >= 1, got {top_k!r}")
        if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None (no nucleus filter) or a number in (0, 1], got {top_p!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
            if device is not None and not _same_device(generator.device, torch.device(device)):
                raise ValueError(f"generator is on {generator.device}, the model on {device}: they must match")
        given = {"temperature": temperature != 1.0, "top_k": top_k is not None, "top_p": top_p is not None,
                 "generator": generator is not None}
        for name in (n for n, set_ in given.items() if set_ and not do_sample):  # greedy would silently ignore it
            raise ValueError(f"{name} applies to sampling only: pass do_sample=True (greedy ignores it)")
        self.do_sample = do_sample
        self.generator = generator
        self.warpers = []
        if not do_sample:
            return
        # transformers is optional for adaexit; a model to sample from comes from it
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        # Hugging Face's order and skip rules (GenerationMixin._get_logits_processor)
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(float(temperature)))
        if top_k is not None:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=float(top_p)))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped distribution, float32 ``[..., vocab]`` (the warpers want ``[rows, vocab]``)."""
        scores = logits.reshape(-1, logits.shape[-1]).float()
        for warp in self.warpers:
            scores = warp(None, scores)
        return torch.softmax(scores, -1).view(logits.shape)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per distribution: long ``[...]`` from ``probs`` ``[..., vocab]`` (unnormalised is fine)."""
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens, probs)``: the argmax and ``None`` for greedy, else a draw and the distribution it came from."""
        if not self.do_sample:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return self.draw(probs), probs

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.pick(logits)[0]


def speculative_accept(sampler: Sampler, drafts, counts, q, p) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row speculative sampling: each row's accepted drafts and the token after them.

    Row ``r`` keeps draft ``i`` (for ``i < counts[r]``, stopping at its first rejection) with probability
    ``min(1, p[r, i, d] / q[r, i, d])``; after a rejection at ``i`` it draws from ``max(0, p[r, i] - q[r, i])``
    (normalised), after keeping all its drafts a bonus token from ``p[r, counts[r]]``. Each emitted token is
    then distributed exactly as the target ``p`` (up to rounding).

    Args:
        drafts: long ``[n, w]`` (entries at ``i >= counts[r]`` are ignored); ``counts``: long ``[n]``.
        q: ``[n, w, vocab]``: the distribution each draft was drawn from.
        p: ``[n, w + 1, vocab]``: the target's distribution after each of the row's inputs.

    Returns:
        ``(tokens [n, w + 1], accepted [n])``: row ``r``'s first ``accepted[r] + 1`` tokens are its output.
    """
    n, w = drafts.shape
    rows = torch.arange(n, device=drafts.device)
    if w:
        d = drafts.clamp(min=0)[..., None]
        p_d, q_d = p[:, :w].gather(-1, d).squeeze(-1), q.gather(-1, d).squeeze(-1)
        u = torch.rand(n, w, device=drafts.device, generator=sampler.generator)
        keep = (u * q_d < p_d) & (torch.arange(w, device=drafts.device)[None, :] < counts[:, None])
        accepted = keep.long().cumprod(1).sum(1)
        q_next = q[rows, accepted.clamp(max=w - 1)]
    else:
        accepted = torch.zeros(n, dtype=torch.long, device=drafts.device)
        q_next = torch.zeros_like(p[:, 0])
    p_next = p[rows, accepted]
    rejected = (accepted < counts)[:, None]
    dist = torch.where(rejected, (p_next - q_next).clamp(min=0), p_next)
    # p == q up to rounding leaves no residual mass (the rejection had probability ~0): draw from p
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p_next)
    tokens = torch.cat([drafts, drafts.new_zeros(n, 1)], 1)
    tokens[rows, accepted] = sampler.draw(dist)
    return tokens, accepted


__all__ = ["Sampler", "speculative_accept"]
