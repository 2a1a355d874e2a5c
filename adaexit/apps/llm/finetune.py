"""A short LayerSkip-style fine-tune of the causal LM itself (Elhoushi et al., 2024), in place, on a CPU budget.

The targets are the ORIGINAL model's own greedy continuations (self-distillation): the fine-tune teaches the
early layers to say what the last one says instead of teaching new text. Choices (LayerSkip, loosely):

* **layer dropout**: each training sequence skips decoder layer ``l`` of ``L`` (its output replaced by its input)
  with probability ``p_max * l / (L - 2)`` for ``l < L - 1``: zero for the first layer, ``p_max`` for the one
  before the last, never the last. LayerSkip's rate rises exponentially with depth and follows a time
  curriculum; a linear, fixed rate here, for a few dozen steps;
* **early-exit loss**: cross-entropy of the shared final norm + LM head after each exit layer and the last layer,
  weighted by depth ``(k + 1) / L`` and normalised (the last layer weighs most; LayerSkip's weights rise
  quadratically with depth under a curriculum);
* the loss runs on the generated positions only, over the **full** vocabulary: a candidate-vocabulary softmax
  would leave the model free to move probability, and its argmax, to tokens outside the candidates. With ~24
  generated positions per ~110-token sequence the LM head is a small share of a step;
* the token embedding / LM head (tied in SmolLM2) and the final norm stay frozen: the exits keep the head they
  share, and a step skips the 49k-row head's weight gradient. AdamW, constant learning rate.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# A sequence: (prompt tokens + generated tokens up to and including the first EOS, prompt length).
Sequence = tuple[torch.Tensor, int]


def dropout_rates(num_layers: int, p_max: float) -> torch.Tensor:
    """Per decoder layer: the probability a training sequence skips it (linear in depth; the last never)."""
    rates = torch.zeros(num_layers)
    if num_layers > 1:
        rates[:-1] = p_max * torch.arange(num_layers - 1) / max(num_layers - 2, 1)
    return rates


def exit_weights(exit_layers, num_layers: int) -> torch.Tensor:
    """Loss weight per exit and the last layer: proportional to depth, summing to one."""
    depth = torch.tensor([k + 1 for k in exit_layers] + [num_layers], dtype=torch.float32)
    return depth / depth.sum()


def collate(sequences: list[Sequence], pad: int):
    """Left-padded ``(ids [B, W], mask [B, W], targets [B, W - 1] bool)``: ``targets[b, t]`` marks a position
    whose next token ``ids[b, t + 1]`` was generated."""
    width = max(s.numel() for s, _ in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
    for b, (seq, prompt_len) in enumerate(sequences):
        start = width - seq.numel()
        ids[b, start:], mask[b, start:] = seq, 1
        targets[b, start + prompt_len - 1 :] = True
    return ids, mask, targets


def exit_states(lm: nn.Module, exit_layers, ids, mask, skip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Hidden states ``[B, W, hidden]`` after each exit layer (before any norm) and the last layer's output
    (after the final norm), with ``skip[l, b]`` (optional) skipping decoder layer ``l`` for sequence ``b``."""
    captured, handles = {}, []

    def hook(i):
        def run(module, args, kwargs, out):
            if skip is not None and skip[i].any():
                h_in = args[0] if args else kwargs["hidden_states"]
                out = torch.where(skip[i].view(-1, 1, 1), h_in, out)
            if i in exit_layers:
                captured[i] = out
            return out

        return run

    layers = lm.model.layers
    for i in range(len(layers)):
        if i in exit_layers or (skip is not None and skip[i].any()):
            handles.append(layers[i].register_forward_hook(hook(i), with_kwargs=True))
    try:  # positions as generation counts them (for rotary embeddings only the differences matter)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return [captured[k] for k in exit_layers] + [last]


def early_exit_losses(lm: nn.Module, exit_layers, batch, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per exit and the last layer ``[len(exit_layers) + 1]`` at the generated positions."""
    ids, mask, targets = batch
    states = exit_states(lm, exit_layers, ids, mask, skip)
    labels = ids[:, 1:][targets]
    losses = []
    for e, h in enumerate(states):
        h = h[:, :-1][targets]
        if e < len(exit_layers):  # the last layer's state is normed already
            h = lm.model.norm(h)
        losses.append(nn.functional.cross_entropy(lm.lm_head(h), labels))
    return torch.stack(losses)


def _check(lm, exit_layers, sequences, steps, lr, p_max, batch_size) -> None:
    num_layers = len(lm.model.layers)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= p_max < 1:
        raise ValueError(f"p_max must be in [0, 1), got {p_max!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not exit_layers or exit_layers != sorted(set(exit_layers)) or exit_layers[0] < 0 or exit_layers[-1] >= num_layers - 1:
        raise ValueError(f"exit_layers must be distinct ascending decoder layers before the last ({num_layers - 1}), "
                         f"got {list(exit_layers)!r}")
    if not sequences or any(not 0 < p < s.numel() for s, p in sequences):
        raise ValueError("sequences must be a non-empty list of (tokens, prompt length) with at least one generated token each")


def finetune(lm: nn.Module, exit_layers, sequences: list[Sequence], steps: int, pad: int, lr: float = 2e-5,
             p_max: float = 0.1, batch_size: int = 8, seed: int = 0) -> dict:
    """Fine-tune ``lm``'s decoder layers in place (layer dropout + early-exit loss) on ``sequences``; returns
    the settings, the weighted loss of the first and last step, and the seconds taken. ``lm`` is left in eval mode."""
    exit_layers = list(exit_layers)
    _check(lm, exit_layers, sequences, steps, lr, p_max, batch_size)
    num_layers = len(lm.model.layers)
    rates, weights = dropout_rates(num_layers, p_max), exit_weights(exit_layers, num_layers)
    params = list(lm.model.layers.parameters())
    trained = {id(p) for p in params}
    was = [(p, p.requires_grad) for p in lm.parameters()]  # restored afterwards, whatever they were
    for p, _ in was:
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses, started = [], time.perf_counter()
    lm.train()
    try:
        for _ in range(steps):
            pick = torch.randperm(len(sequences), generator=g)[:batch_size].tolist()
            batch = collate([sequences[i] for i in pick], pad)
            skip = torch.rand(num_layers, len(pick), generator=g) < rates[:, None]
            loss = (weights * early_exit_losses(lm, exit_layers, batch, skip)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        lm.eval()
        opt.zero_grad(set_to_none=True)  # (the gradients would hold a model's worth of memory)
        for p, requires in was:
            p.requires_grad_(requires)
    return dict(steps=steps, lr=lr, p_max=p_max, batch_size=batch_size, dropout="per sequence, linear in depth",
                exit_layers=exit_layers, weights=weights.tolist(), loss_first=losses[0], loss_last=losses[-1],
                trained="decoder layers (embedding / LM head and final norm frozen)",
                loss_positions="generated tokens, full vocabulary", seconds=time.perf_counter() - started)


@torch.no_grad()
def perplexity(lm: nn.Module, sequences: list[Sequence], pad: int, batch_size: int = 16) -> tuple[float, float]:
    """``(perplexity, teacher-forced greedy agreement)`` of ``lm`` on the generated tokens of ``sequences``."""
    nll, agree, count = 0.0, 0, 0
    for start in range(0, len(sequences), batch_size):
        ids, mask, targets = collate(sequences[start : start + batch_size], pad)
        logits = lm.lm_head(exit_states(lm, [], ids, mask)[-1][:, :-1][targets])
        labels = ids[:, 1:][targets]
        nll += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        agree += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    return float(torch.exp(torch.tensor(nll / count))), agree / count


def sequence_agreement(new: list[Sequence], ref: list[Sequence]) -> float:
    """Fraction of ``ref``'s generated tokens that ``new`` (the same prompts) reproduces in place."""
    same = total = 0
    for (a, pa), (b, pb) in zip(new, ref, strict=True):
        a, b = a[pa:], b[pb:]
        n = min(a.numel(), b.numel())
        same += int((a[:n] == b[:n]).sum())
        total += b.numel()
    return same / total
