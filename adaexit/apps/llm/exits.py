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
* :func:`agreement` (teacher-forced, per exit) and :func:`calibrate_thresholds`: the per-exit gate thresholds
  that run the fewest layers with at least the target token agreement, on validation positions.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ...decoding import CausalLMExits, generate


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
        for row, prompt_mask in zip(seq, enc.attention_mask.bool()):
            new = row[p:]
            ends = (new == tokenizer.pad_token_id).nonzero()
            new = new[: int(ends[0]) + 1] if ends.numel() else new
            sequences.append((torch.cat([row[:p][prompt_mask], new]), int(prompt_mask.sum())))
    result = [torch.cat(s) for s in states], torch.cat(targets)
    return (*result, sequences) if return_sequences else result


def train_adapter(model: CausalLMExits, e: int, states: torch.Tensor, targets: torch.Tensor, steps: int,
                  lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> ExitAdapter:
    """Self-distil exit ``e``'s adapter on ``states`` to the teacher's ``targets``."""
    lm = model.lm
    adapter = ExitAdapter(lm.model.norm, model.hidden_size)
    with torch.no_grad():  # candidates: every target, and what the untrained exit says
        start = lm.lm_head(lm.model.norm(states)).argmax(-1)
    vocab = torch.unique(torch.cat([targets, start]))
    weight = lm.lm_head.weight[vocab].detach()
    remap = torch.full((model.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(vocab.numel())
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
