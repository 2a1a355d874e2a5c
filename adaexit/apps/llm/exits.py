"""SmolLM2's exits, trained by self-distillation on its own greedy continuations, and their calibration.

* :func:`continuations`: the model's greedy continuations of chat prompts (adaexit's exact ``"full"`` engine)
  and, from one teacher-forced pass, the hidden state after every exit layer and the last layer's token at
  every generated position;
* :class:`ExitAdapter`: RMSNorm (initialised from the final norm) + a ``hidden x hidden`` affine map
  (initialised to the identity) in front of the frozen, shared LM head; trained with cross-entropy to the last
  layer's token over a candidate vocabulary (the tokens the teacher and the untrained exit emit: the full
  49k-row head in every step would not fit the job's budget on a CPU);
* gates: logistic regression on the hidden state to "this exit's full-vocabulary token equals the last
  layer's";
* :class:`DraftLayer`: a one-decoder-layer draft adapter (a trainable copy of the next decoder layer before the
  frozen norm + head), self-distilled per sequence by :func:`train_draft_layer` and measured only;
* :func:`agreement` (teacher-forced, per exit) and :func:`calibrate_thresholds`: the per-exit gate thresholds
  that run the fewest layers with at least the target token agreement, on validation positions.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ...decoding import CausalLMExits, generate
from .finetune import exit_states


class ExitAdapter(nn.Module):
    """Hidden state -> hidden state for the shared LM head: RMSNorm then an affine map (identity at start)."""

    def __init__(self, final_norm: nn.Module, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=getattr(final_norm, "variance_epsilon", 1e-5))
        with torch.no_grad():
            self.norm.weight.copy_(final_norm.weight)
        self.affine = nn.Linear(hidden, hidden)
        nn.init.eye_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.affine(self.norm(h))


@torch.no_grad()
def continuations(model: CausalLMExits, tokenizer, prompts, new_tokens: int, batch_size: int,
                  return_sequences: bool = False):
    """``(states [exits][N, hidden], targets [N])`` at every generated position (EOS and padding excluded);
    with ``return_sequences``, also per prompt ``(its tokens + the generated ones up to and including the first
    EOS, prompt length)``, unpadded (the fine-tune's training data)."""
    lm = model.lm
    states, targets, sequences = [[] for _ in model.exit_layers], [], []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        seq = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=new_tokens)
        mask = torch.cat([enc.attention_mask, (seq[:, enc.input_ids.shape[1] :] != tokenizer.pad_token_id).long()], 1)
        out = lm(seq, attention_mask=mask, output_hidden_states=True)
        # the positions whose next token was generated: the prompt's last token and every generated one but the last
        p = enc.input_ids.shape[1]
        keep = mask[:, p - 1 : -1].bool() & mask[:, p:].bool()
        teacher = out.logits[:, p - 1 : -1].argmax(-1)
        targets.append(teacher[keep])
        for e, k in enumerate(model.exit_layers):
            states[e].append(out.hidden_states[k + 1][:, p - 1 : -1][keep])
        sequences.extend(as_sequences(seq, enc.attention_mask, tokenizer.pad_token_id))
    result = [torch.cat(s) for s in states], torch.cat(targets)
    return (*result, sequences) if return_sequences else result


def as_sequences(out: torch.Tensor, mask: torch.Tensor, pad: int) -> list[tuple[torch.Tensor, int]]:
    """Each row of a left-padded ``[B, P + T]`` output as ``(its prompt tokens + its generated tokens up to and
    including its EOS, its prompt length)``, unpadded (pad == EOS here)."""
    p, rows = mask.shape[1], []
    for row, keep in zip(out, mask.bool()):
        prompt, new = row[:p][keep], row[p:]
        ends = (new == pad).nonzero()
        new = new[: int(ends[0]) + 1] if len(ends) else new
        rows.append((torch.cat([prompt, new]), prompt.numel()))
    return rows


def candidate_head(lm: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head restricted to the tokens that occur in ``tokens`` (the full 49k-row head in every training
    step would not fit the job's budget on a CPU): ``(its rows [V', hidden], remap [vocab])`` with
    ``remap[token]`` the token's row there (-1 for the others)."""
    vocab = torch.unique(tokens)
    remap = torch.full((lm.lm_head.weight.shape[0],), -1, dtype=torch.long)
    remap[vocab] = torch.arange(vocab.numel())
    return lm.lm_head.weight[vocab].detach(), remap


class DraftLayer(nn.Module):
    """A one-decoder-layer draft adapter for exit layer ``k``: a trainable copy of decoder layer ``k + 1`` run on
    the layer-``k`` states of one unpadded sequence, then the frozen shared final norm + LM head. Measured, not
    used for decoding (drafting with it would need a KV cache of its own)."""

    def __init__(self, lm: nn.Module, k: int):
        super().__init__()
        self.layer = copy.deepcopy(lm.model.layers[k + 1]).float().requires_grad_(True)
        self.norm = copy.deepcopy(lm.model.norm).requires_grad_(False)  # frozen: no gradient reaches the model
        self.rotary = lm.model.rotary_emb

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``[1, T, hidden]`` at positions ``0..T-1`` -> the layer's output, same shape (causal)."""
        positions = torch.arange(h.shape[1], device=h.device)[None]
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()[None, None]
        return self.layer(h, attention_mask=causal, position_ids=positions,
                          position_embeddings=self.rotary(h, positions))


@torch.no_grad()
def sequence_states(lm: nn.Module, exit_layers, sequences) -> list[list[torch.Tensor]]:
    """Per sequence, the hidden states ``[1, T, hidden]`` after each exit layer (one unpadded pass each)."""
    out = []
    for seq, _ in sequences:
        ids = seq[None]
        out.append(exit_states(lm, exit_layers, ids, torch.ones_like(ids))[: len(exit_layers)])
    return out


def _draft_logits(lm, draft: DraftLayer, h, prompt_len: int, weight=None) -> torch.Tensor:
    """Logits at the generated positions (each predicts the next token), over ``weight``'s rows (default: all)."""
    x = draft.norm(draft(h)[0, prompt_len - 1 : -1])
    return x @ (lm.lm_head.weight if weight is None else weight).T


def train_draft_layer(lm: nn.Module, k: int, train, val, steps: int, lr: float = 1e-4,
                      seed: int = 0) -> tuple[DraftLayer, float, float]:
    """Self-distil a :class:`DraftLayer` for exit layer ``k`` on ``train`` (``[(states [1, T, hidden],
    (tokens [T], prompt length))]``: one sequence per step, cross-entropy to its next greedy tokens over the
    tokens that occur); return it and its teacher-forced agreement with those tokens on ``val`` before / after."""
    draft = DraftLayer(lm, k)
    weight, remap = candidate_head(lm, torch.cat([seq[p:] for _, (seq, p) in train]))

    @torch.no_grad()
    def agreement_on_val() -> float:
        hits = total = 0
        for h, (seq, p) in val:
            hits += int((_draft_logits(lm, draft, h, p).argmax(-1) == seq[p:]).sum())
            total += seq.numel() - p
        return hits / max(total, 1)

    before = agreement_on_val()
    opt = torch.optim.Adam(draft.layer.parameters(), lr=lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        h, (seq, p) = train[int(order[step % len(train)])]
        loss = nn.functional.cross_entropy(_draft_logits(lm, draft, h, p, weight), remap[seq[p:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval(), before, agreement_on_val()


def train_adapter(model: CausalLMExits, e: int, states: torch.Tensor, targets: torch.Tensor, steps: int,
                  lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> ExitAdapter:
    """Self-distil exit ``e``'s adapter on ``states`` to the teacher's ``targets``."""
    lm = model.lm
    adapter = ExitAdapter(lm.model.norm, model.hidden_size)
    with torch.no_grad():  # candidates: every target, and what the untrained exit says
        start = lm.lm_head(lm.model.norm(states)).argmax(-1)
    weight, remap = candidate_head(lm, torch.cat([targets, start]))
    labels = remap[targets]
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, states.shape[0], (min(batch_size, states.shape[0]),), generator=g)
        loss = nn.functional.cross_entropy(adapter(states[idx]) @ weight.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.eval()


@torch.no_grad()
def exit_tokens(model: CausalLMExits, e: int, states: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Exit ``e``'s full-vocabulary greedy token for each state."""
    return torch.cat([model.exit_logits(e, s).argmax(-1) for s in states.split(chunk)])


def train_gate(model: CausalLMExits, e: int, states: torch.Tensor, agree: torch.Tensor, steps: int = 300) -> None:
    """Logistic regression of ``agree`` (exit token == last layer's) on the hidden state, into gate ``e``."""
    gate = model.gates[e]
    mean, std = states.mean(0), states.std(0) + 1e-5
    probe = nn.Linear(states.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    x, y = (states - mean) / std, agree.float()
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the gate: w.(h - mean)/std + b
        w = probe.weight / std
        gate.weight.copy_(w)
        gate.bias.copy_(probe.bias - (w * mean).sum())


@torch.no_grad()
def agreement(model: CausalLMExits, states, targets) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per exit: (agrees with the last layer [N] bool, gate score [N])."""
    agrees = [exit_tokens(model, e, s) == targets for e, s in enumerate(states)]
    scores = [model.gate_score(e, s) for e, s in enumerate(states)]
    return agrees, scores


def calibrate_thresholds(model: CausalLMExits, agrees, scores, target: float, grid: int = 16):
    """Per-exit gate thresholds that minimise mean layers per token with teacher-forced token agreement
    ``>= target`` (every combination of per-exit quantile thresholds, ``inf`` included). Returns
    ``(thresholds, agreement, layers per token)``."""
    n = agrees[0].shape[0]
    depth = [k + 1 for k in model.exit_layers]
    options = []
    for s in scores:
        qs = torch.quantile(s.double(), torch.linspace(0, 1, grid + 1, dtype=torch.float64)).tolist()
        options.append(sorted(set(qs)) + [float("inf")])
    best = ([float("inf")] * len(scores), 1.0, float(model.num_layers))
    for combo in itertools.product(*options):
        left = torch.zeros(n, dtype=torch.bool)
        correct = torch.zeros(n, dtype=torch.bool)
        layers = torch.full((n,), float(model.num_layers))
        for e, t in enumerate(combo):
            fire = ~left & (scores[e] >= t)
            correct |= fire & agrees[e]
            layers[fire] = depth[e]
            left |= fire
        acc = float((correct | ~left).float().mean())
        mean_layers = float(layers.mean())
        if acc >= target and mean_layers < best[2]:
            best = (list(combo), acc, mean_layers)
    return best
