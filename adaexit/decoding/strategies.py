"""The decoding loops: ``full``, ``self_speculative`` (lossless) and ``early_exit`` (per row; an exited
row's skipped K/V by state propagation, or ``early_exit_recompute``'s deferred recomputation).

Each runs on a :class:`Run` (the rows still decoding, their pending token and the per-row cache) after the
prompt's prefill, and returns when every row has finished. A row finishes at its EOS or at
``max_new_tokens``; finished rows leave the batch through the compaction kernels (:meth:`Run.emit`).

Host synchronisations: one per step (which rows finished, how far each row got), plus one per exit point
whose threshold can fire (``early_exit``: the sizes of the leaving and staying groups; with
``fill="recompute"`` one more at the end, for its count of layer passes).

Every token is chosen by the run's :class:`~adaexit.decoding.sampling.Sampler`: the argmax (greedy), or a draw
from the warped distribution (``do_sample=True``).
"""

from __future__ import annotations

import torch

from ..kernels import compact, gather_rows, partition, scatter_rows
from ..kernels._dispatch import to_host
from .cache import RowCache
from .model import CausalLMExits
from .sampling import Sampler, speculative_accept


class Run:
    """The rows still decoding and everything that travels with them.

    Attributes:
        tok: long ``[n]``: each row's pending token (emitted, not yet in the cache).
        row_ids: long ``[n]``: each row's index in the input batch.
        count: long ``[n]``: tokens emitted so far per row; ``count_host`` the same on the host.
        out: long ``[B, max_new_tokens + slack]``: emitted tokens per input row, padding elsewhere.
        sampler: turns logits into tokens (default: greedy).
    """

    def __init__(self, model: CausalLMExits, cache: RowCache, tok, max_new_tokens, eos, pad, slack, keep_finished=False,
                 sampler: Sampler | None = None):
        device = tok.device
        self.model, self.cache, self.max_new = model, cache, max_new_tokens
        self.eos = torch.tensor(eos if eos else [-1], dtype=torch.long, device=device)
        self.pad = pad
        self.sampler = sampler if sampler is not None else Sampler()
        batch = tok.shape[0]
        self.out = torch.full((batch, max_new_tokens + slack), pad, dtype=torch.long, device=device)
        self.row_ids = torch.arange(batch, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.tok = tok
        self.lengths_host = [cache.lengths_prompt] * batch
        self.count_host = [0] * batch
        self.final_counts = [0] * batch  # tokens each input row generated, set when it finishes
        self.layer_passes = 0  # decoder layers run, one per row (and per pass), after the prefill
        self.tokens_after_first = 0
        self.accepted: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row_ids, accepted drafts) per iteration
        self.exit_counts = [0] * model.num_exits
        self.steps = 0
        # input row -> (keys, values) per layer of its finished cache rows [kv_heads, length, head_dim]
        self.finished_caches: dict[int, tuple[list, list]] | None = {} if keep_finished else None

    @property
    def n(self) -> int:
        return int(self.tok.shape[0])

    def end(self, extra: int) -> int:
        """Attention extent of a step whose queries reach ``extra`` slots past the longest row."""
        return max(self.lengths_host) + extra

    def emit(self, tokens: torch.Tensor, offered: torch.Tensor, advance: torch.Tensor) -> None:
        """Append up to ``offered[r]`` of ``tokens[r]`` (``[n, t]``) to each row, stopping after an EOS and at
        ``max_new_tokens``; then the pending token becomes the last offered token and the cache rows grow by
        ``advance`` (already-cached slots). Finished rows leave (the one host sync of the step)."""
        n, t = tokens.shape
        steps = torch.arange(t, device=tokens.device)
        room = torch.minimum(offered, self.max_new - self.count)
        is_eos = torch.isin(tokens, self.eos) & (steps[None, :] < room[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), t)
        take = torch.minimum(room, first_eos + 1)
        written = torch.where(steps[None, :] < take[:, None], tokens, self.pad)
        self.out[self.row_ids[:, None], self.count[:, None] + steps[None, :]] = written
        self.count = self.count + take
        done = (first_eos < room) | (self.count >= self.max_new)
        self.tok = tokens.gather(1, (offered - 1).clamp(min=0)[:, None]).squeeze(1)
        self.cache.lengths = self.cache.lengths + advance
        host = to_host(torch.stack([done.long(), take, advance, self.row_ids, self.count], 1))
        for row in host:
            if row[0]:
                self.final_counts[row[3]] = row[4]
        self.tokens_after_first += sum(row[1] for row in host)
        self.lengths_host = [length + row[2] for length, row in zip(self.lengths_host, host)]
        self.count_host = [c + row[1] for c, row in zip(self.count_host, host)]
        if any(row[0] for row in host):
            self.lengths_host = [length for length, row in zip(self.lengths_host, host) if not row[0]]
            self.count_host = [c for c, row in zip(self.count_host, host) if not row[0]]
            if self.finished_caches is not None:
                self._keep_finished(host)
            kept, self.tok, self.row_ids, self.count = compact(~done, self.tok, self.row_ids, self.count)
            self.cache.keep(kept)

    def _keep_finished(self, host) -> None:
        """Copy the finishing rows' caches out (for inspection: tests check that they are whole)."""
        lengths = self.cache.lengths
        for i, row in enumerate(host):
            if row[0]:
                end = int(lengths[i])
                self.finished_caches[row[3]] = (
                    [k[i, :, :end].clone() for k in self.cache.keys],
                    [v[i, :, :end].clone() for v in self.cache.values],
                )

    def start(self) -> int | None:
        """The rows' common next slot when they all have the same (a contiguous cache write), else ``None``."""
        first = self.lengths_host[0]
        return first if all(length == first for length in self.lengths_host) else None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt through the whole model (every layer's K/V cached); the first token per row (chosen by the
        sampler)."""
        model, cache = self.model, self.cache
        n, p = input_ids.shape
        h = model.embed(input_ids)
        slots = torch.zeros(n, dtype=torch.long, device=input_ids.device)
        cos_sin = model.rotary(h, cache.positions(None, slots, p).clamp(min=0))
        step = cache.step(None, slots, p, p, cos_sin, start=0)
        for i in range(model.num_layers):
            h = model.layer(i, h, step, cache)
        return self.sampler(model.final_logits(h[:, -1]))


def full(run: Run) -> None:
    """One token per row per step, every layer: Hugging Face's greedy decoding, or its sampling (the same draws
    on the same random state while no row has finished; afterwards finished rows no longer draw)."""
    model = run.model
    while run.n:
        cache = run.cache
        slots = cache.lengths
        h = model.embed(run.tok)[:, None]
        cos_sin = model.rotary(h, cache.positions(None, slots, 1))
        step = cache.step(None, slots, 1, run.end(1), cos_sin, run.start())
        for i in range(model.num_layers):
            h = model.layer(i, h, step, cache)
        run.layer_passes += run.n * model.num_layers
        run.exit_counts[-1] += run.n
        tokens = run.sampler(model.final_logits(h[:, -1]))
        one = torch.ones_like(run.tok)
        run.emit(tokens[:, None], one, one)
        run.steps += 1


def self_speculative(run: Run, draft_exit: int, num_draft: int, draft_threshold: float | None = None) -> None:
    """Lossless self-speculation with per-row acceptance.

    Every row drafts up to ``num_draft`` tokens with layers ``0..k`` (``k`` the draft exit's layer) and the
    exit's head, caching those layers' K/V and the layer-``k`` hidden states. With ``draft_threshold``, a row
    stops drafting after a draft whose gate score is below it (the rows still drafting run compacted). One
    verify pass then runs each row's last draft through layers ``0..k`` and every row's block (its pending
    token and drafts) through layers ``k+1..``; each row accepts its own longest prefix of drafts equal to the
    full model's greedy tokens, plus the full model's next token. Its cache length grows by what it accepted;
    its rejected slots are simply left behind (never attended, overwritten).

    Sampling: drafts are drawn from the exit's warped distribution ``q`` and each row keeps them by the
    speculative-sampling rule (:func:`~adaexit.decoding.sampling.speculative_accept`), so its tokens are
    distributed as the full model's warped sampling (lossless in distribution, not draw for draw).
    """
    model = run.model
    k = model.exit_layers[draft_exit]
    sampler = run.sampler
    while run.n:
        cache, n, device = run.cache, run.n, run.tok.device
        room = run.max_new - min(run.count_host)
        m = max(0, min(num_draft, room - 1))
        slots, start = cache.lengths, run.start()
        hidden = torch.zeros(n, m + 1, model.hidden_size, dtype=model.lm.lm_head.weight.dtype, device=device)
        drafts = torch.full((n, max(m, 1)), -1, dtype=torch.long, device=device)
        counts = torch.zeros(n, dtype=torch.long, device=device)  # drafts per row
        # sampling: the distribution each draft was drawn from
        q = torch.zeros(n, max(m, 1), model.vocab_size, device=device) if sampler.do_sample else None
        x, active, widest = run.tok, None, 0  # active: the rows still drafting (None: all)
        for i in range(m):
            sl = slots if active is None else gather_rows(slots, active)
            h = model.embed(x)[:, None]
            cos_sin = model.rotary(h, cache.positions(active, sl + i, 1))
            common = None if start is None or active is not None else start + i
            step = cache.step(active, sl + i, 1, run.end(i + 1), cos_sin, common)
            for layer in range(k + 1):
                before, h = h, model.layer(layer, h, step, cache)
            x, probs = sampler.pick(model.exit_logits(draft_exit, h[:, -1]))
            where = torch.arange(n, device=device) if active is None else active
            if q is not None:
                q[where, i] = probs
            hidden[where, i] = h[:, 0]
            drafts[where, i] = x
            counts[where] += 1
            widest = i + 1
            run.layer_passes += where.shape[0] * (k + 1)
            if draft_threshold is not None and i + 1 < m:
                go = model.gate_score(draft_exit, h[:, 0], before[:, 0]) >= draft_threshold
                kept, x = compact(go, x)
                if kept.shape[0] == 0:
                    break
                active = gather_rows(where, kept)
        # each row's last input (its last draft, or its pending token) through layers 0..k at its own slot
        last = drafts.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)
        last = torch.where(counts > 0, last, run.tok)
        h = model.embed(last)[:, None]
        cos_sin = model.rotary(h, cache.positions(None, slots + counts, 1))
        uniform = start if start is not None and draft_threshold is None else None
        step = cache.step(None, slots + counts, 1, run.end(widest + 1), cos_sin, None if uniform is None else uniform + widest)
        for layer in range(k + 1):
            h = model.layer(layer, h, step, cache)
        hidden[torch.arange(n, device=device), counts] = h[:, 0]
        h = hidden[:, : widest + 1]
        cos_sin = model.rotary(h, cache.positions(None, slots, widest + 1))
        step = cache.step(None, slots, widest + 1, run.end(widest + 1), cos_sin, start)
        for layer in range(k + 1, model.num_layers):
            h = model.layer(layer, h, step, cache)
        logits = model.final_logits(h)  # [n, widest + 1, vocab]: the full model's after each input
        if q is not None:
            verified, accepted = speculative_accept(sampler, drafts[:, :widest], counts, q[:, :widest],
                                                    sampler.probs(logits))
        else:
            verified = logits.argmax(-1)
            if widest:
                steps = torch.arange(widest, device=device)
                match = (drafts[:, :widest] == verified[:, :widest]) & (steps[None, :] < counts[:, None])
                accepted = match.long().cumprod(1).sum(1)
            else:
                accepted = torch.zeros_like(run.tok)
        run.layer_passes += n * model.num_layers
        run.exit_counts[-1] += n
        run.accepted.append((run.row_ids, accepted))
        run.emit(verified, accepted + 1, accepted + 1)
        run.steps += 1


def early_exit(run: Run, per_row: bool = True, fill: str = "propagate", max_pending: int = 4) -> None:
    """Greedy decoding where each row leaves at the first exit whose gate fires.

    Gates are cheap (one dot product per row); the exit's vocabulary head runs only for the rows that leave.
    Rows that stay run the next layers compacted (``partition`` + ``gather_rows``). A row that leaves at layer
    ``k`` fills the K/V of layers ``k+1..`` for its token by state propagation (CALM): those layers' K/V
    projections of its layer-``k`` hidden state, so later tokens attend to a whole cache. ``fill="recompute"``
    defers them instead (:func:`early_exit_recompute`). With ``per_row=False`` the batch leaves together only
    when every row's gate fires (CALM's batch rule).
    Sampling draws a row's token from the warped distribution of the exit it leaves at (lossy, like greedy).
    """
    if fill == "recompute":
        return early_exit_recompute(run, per_row, max_pending)
    model = run.model
    thresholds = model.thresholds
    while run.n:
        cache = run.cache
        n, device = run.n, run.tok.device
        slots = cache.lengths
        h = model.embed(run.tok)[:, None]
        cos, sin = model.rotary(h, cache.positions(None, slots, 1))
        end, start = run.end(1), run.start()
        step = cache.step(None, slots, 1, end, (cos, sin), start)
        tokens = torch.empty(n, dtype=torch.long, device=device)
        where = torch.arange(n, device=device)  # each staying row's place in this step's batch
        rows = None  # the staying rows' cache rows (None: all, in order)
        done = 0  # layers run so far
        for e, k in enumerate(model.exit_layers):
            for layer in range(done, k + 1):
                before, h = h, model.layer(layer, h, step, cache)
            run.layer_passes += where.shape[0] * (k + 1 - done)
            done = k + 1
            if not thresholds[e] <= 1.0:  # this exit never fires: no gate, no sync
                continue
            fire = model.gate_score(e, h[:, 0], before[:, 0]) >= thresholds[e]
            if not per_row:
                fire = fire.all().expand_as(fire)
            order, counts = partition(fire.long(), 2)
            stay, leave = to_host(counts)
            if leave:
                out = order[stay:]
                h_out = gather_rows(h, out)
                scatter_rows(tokens, gather_rows(where, out), run.sampler(model.exit_logits(e, h_out[:, -1])))
                out_rows = out if rows is None else gather_rows(rows, out)
                cs_out = (gather_rows(cos, out), gather_rows(sin, out))
                out_step = cache.step(out_rows, gather_rows(slots, out), 1, end, cs_out, start)
                for layer in range(k + 1, model.num_layers):
                    model.propagate(layer, h_out, out_step, cache)
                run.exit_counts[e] += leave
                kept = order[:stay]
                h, where, cos, sin, slots = (gather_rows(t, kept) for t in (h, where, cos, sin, slots))
                rows = kept if rows is None else gather_rows(rows, kept)
                step = cache.step(rows, slots, 1, end, (cos, sin), start)
            if not stay:
                break
        if where.shape[0]:
            for layer in range(done, model.num_layers):
                h = model.layer(layer, h, step, cache)
            run.layer_passes += where.shape[0] * (model.num_layers - done)
            run.exit_counts[-1] += where.shape[0]
            scatter_rows(tokens, where, run.sampler(model.final_logits(h[:, -1])))
        one = torch.ones_like(run.tok)
        run.emit(tokens[:, None], one, one)
        run.steps += 1


def early_exit_recompute(run: Run, per_row: bool = True, max_pending: int = 4) -> None:
    """``early_exit`` with deferred recomputation: exact K/V where propagation approximates them.

    Every new token runs layers ``0..k0`` (``k0``: the first exit's layer) alone, and its hidden state there is
    kept. A row that leaves at an exit leaves its token's deeper K/V unwritten: the token is *pending*. When a
    row's new token stays past the first exit, its pending tokens (from their kept layer-``k0`` states) and the
    new token run the deeper layers as one block (per-row slots and positions, as the ``self_speculative``
    verify pass), so each layer holds the pending tokens' exact K/V before the new token attends to it; gates
    read the newest position. A row holding ``max_pending`` pending tokens runs the whole model (the block is
    bounded). So with one exit every token costs exactly the whole model's layers, run in fewer sequential
    steps; with several, a pending token that left at a later exit re-runs the layers between the exits.
    A finishing row's pending deep K/V are never read (its cache leaves with it); ``keep_finished`` runs flush
    them first, so the kept cache is whole.

    Layer passes count every real position (recomputed ones included; a block's padding, for rows with fewer
    pending tokens than the widest, not).
    """
    model = run.model
    thresholds, k0, num_layers, device = model.thresholds, model.exit_layers[0], model.num_layers, run.tok.device
    batch = run.out.shape[0]
    pending_of = torch.zeros(batch, dtype=torch.long, device=device)  # per input row
    # per input row: the layer-k0 states of its pending tokens, then of its new token
    states = torch.zeros(batch, max_pending + 1, model.hidden_size, dtype=model.lm.lm_head.weight.dtype, device=device)
    passes = torch.zeros((), dtype=torch.long, device=device)  # block positions x layers, read once at the end
    widest = 0  # a host bound on every row's pending tokens (no sync)
    while run.n:
        cache, n, q = run.cache, run.n, widest + 1
        pend, slots, start = pending_of[run.row_ids], cache.lengths, run.start()
        h = model.embed(run.tok)[:, None]
        step = cache.step(None, slots, 1, run.end(1), model.rotary(h, cache.positions(None, slots, 1)), start)
        for layer in range(k0 + 1):
            before, h = h, model.layer(layer, h, step, cache)
        run.layer_passes += n * (k0 + 1)
        states[run.row_ids, pend] = h[:, 0]
        tokens = torch.empty(n, dtype=torch.long, device=device)
        pend_after = torch.zeros(n, dtype=torch.long, device=device)
        where, rows, done, left = torch.arange(n, device=device), None, k0 + 1, False
        newest, entering = h[:, 0], before[:, 0]  # the new token's state after and before the exit's layer
        for e, k in enumerate(model.exit_layers):
            if e:
                for layer in range(done, k + 1):
                    before, h = h, model.layer(layer, h, step, cache)
                passes = passes + (pend + 1).sum() * (k + 1 - done)
                done = k + 1
                at = torch.arange(h.shape[0], device=device), pend
                newest, entering = h[at], before[at]
            if thresholds[e] <= 1.0:  # else this exit never fires: no gate, no sync
                fire = (model.gate_score(e, newest, entering) >= thresholds[e]) & (pend < max_pending)
                if not per_row:
                    fire = fire.all().expand_as(fire)
                order, counts = partition(fire.long(), 2)
                stay, leave = to_host(counts)
                if leave:
                    out, left = order[stay:], True
                    place = gather_rows(where, out)
                    scatter_rows(tokens, place, run.sampler(model.exit_logits(e, gather_rows(newest, out))))
                    scatter_rows(pend_after, place, gather_rows(pend, out) + 1)
                    run.exit_counts[e] += leave
                    kept = order[:stay]
                    h, where, pend = (gather_rows(t, kept) for t in (h, where, pend))
                    rows = kept if rows is None else gather_rows(rows, kept)
                    if e:
                        step = cache.step(rows, gather_rows(step.slots, kept), q, step.end,
                                          tuple(gather_rows(t, kept) for t in step.cos_sin), step.start)
                if not stay:
                    break
            if not e:  # the staying rows' block: their pending tokens' kept states, then the new token's
                h = states[run.row_ids if rows is None else gather_rows(run.row_ids, rows), :q]
                step = _block_step(run, rows, slots if rows is None else gather_rows(slots, rows), pend, h)
        if where.shape[0]:
            for layer in range(done, num_layers):
                h = model.layer(layer, h, step, cache)
            passes = passes + (pend + 1).sum() * (num_layers - done)
            run.exit_counts[-1] += where.shape[0]
            scatter_rows(tokens, where, run.sampler(model.final_logits(h[torch.arange(h.shape[0], device=device), pend])))
        pending_of[run.row_ids] = pend_after
        if run.finished_caches is not None:
            _flush_finishing(run, tokens, pend_after, states)
        widest = min(widest + 1, max_pending) if left else 0
        one = torch.ones_like(run.tok)
        run.emit(tokens[:, None], one, one)
        run.steps += 1
    run.layer_passes += to_host(passes)


def _block_step(run: Run, rows, slots: torch.Tensor, pend: torch.Tensor, h: torch.Tensor):
    """The step of a block ``h`` ``[n, q, hidden]`` per cache row whose last ``pend[r] + 1`` tokens end at
    ``slots[r]`` (positions past them are padding: written past the row's length, never attended)."""
    cache, q = run.cache, h.shape[1]
    first = slots - pend
    start = run.start() if q == 1 else None
    return cache.step(rows, first, q, run.end(q), run.model.rotary(h, cache.positions(rows, first, q)), start)


def _flush_finishing(run: Run, tokens: torch.Tensor, pend: torch.Tensor, states: torch.Tensor) -> None:
    """Inspection only (``keep_finished``): the rows that ``tokens`` finish run their pending tokens through
    the layers after the first exit, so the caches they leave are whole. Not counted as decoding work."""
    model = run.model
    finishing = torch.isin(tokens, run.eos) | (run.count + 1 >= run.max_new)  # emit's rule for one token
    idx = (finishing & (pend > 0)).nonzero().view(-1)
    if not idx.numel():
        return
    p = pend[idx]
    h = states[gather_rows(run.row_ids, idx), : int(p.max())]
    step = _block_step(run, idx, gather_rows(run.cache.lengths, idx), p - 1, h)
    for layer in range(model.exit_layers[0] + 1, model.num_layers):
        h = model.layer(layer, h, step, run.cache)


STRATEGIES = {"full": full, "self_speculative": self_speculative, "early_exit": early_exit}
