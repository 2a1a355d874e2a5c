"""``CausalLMExits``: a Hugging Face Llama-family causal LM with early exits after named decoder layers.

The wrapper does not copy or change the model: it runs the model's own modules (embedding, decoder layers'
norms / projections / MLPs, rotary embedding, final norm, LM head) step by step on adaexit's per-row cache
(:mod:`.cache`), so a decoding strategy (:mod:`.strategies`) can stop any row after any exit.

Per exit ``e`` (after decoder layer ``exit_layers[e]``):

* a **head** turning the hidden state into logits. ``None`` (the default) is the model's own final norm and
  LM head, shared by every exit (LayerSkip's shared head). A module either maps ``[.., hidden]`` to
  ``[.., hidden]`` (it replaces the final norm, e.g. a trained RMSNorm + affine adapter, and feeds the shared
  LM head) or to ``[.., vocab]`` (logits of its own);
* a cheap **gate**: ``Linear(hidden, 1)`` + sigmoid, the probability that the exit's token equals the last
  layer's. The vocabulary head (49k rows for SmolLM2, the cost of ~8 of its layers) runs only for rows whose
  gate fires. Gates start at zero (score 0.5) and are trained by the application (self-distillation).
  ``gate="saturation"`` replaces them by CALM's parameter-free **state saturation**: the cosine similarity
  (clamped at 0) between the hidden state after the exit's layer and before it; a layer that barely turns the
  state scores near 1.

The policy: :class:`~adaexit.NeverExitPolicy` (the default) or :class:`~adaexit.ConfidencePolicy` whose
``thresholds[e]`` applies to exit ``e``'s gate score (its ``criterion`` is not used: the score is the gate's).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..policies import ConfidencePolicy, NeverExitPolicy, Policy

# Causal LMs whose modules have the Llama layout this wrapper runs (q/k/v/o projections, rotary, RMSNorm).
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
GATES = ("learned", "saturation")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` looks like a Hugging Face causal LM (``*ForCausalLM``, ``*LMHeadModel``), supported
    or not (an unsupported one gets :class:`CausalLMExits`' error, naming what is supported)."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _check_model(lm: nn.Module) -> None:
    name = type(lm).__name__
    if name not in SUPPORTED:
        raise ValueError(
            f"model: {name} is not supported for decoding with exits; supported: {', '.join(SUPPORTED)} "
            "(Hugging Face causal LMs with the Llama module layout)"
        )
    inner = getattr(lm, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            raise ValueError(f"model: {name} has no model.{attr}; cannot run it layer by layer")
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        if hasattr(attn, "q_norm") or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"model: model.layers.{i}.self_attn is not a plain Llama-style attention")
    if getattr(lm.config, "use_sliding_window", False):
        raise ValueError(f"model: {name} uses sliding-window attention, which the per-row cache does not model")


def parse_exits(lm: nn.Module, exits) -> list[int]:
    """Decoder-layer indices from dotted names ``"model.layers.K"`` (ascending, distinct, before the last)."""
    if isinstance(exits, str) or not hasattr(exits, "__iter__"):
        raise ValueError(f"exits must be a list of module names like ['model.layers.3'], got {exits!r}")
    num_layers = len(lm.model.layers)
    layers = []
    for name in exits:
        prefix, _, index = str(name).rpartition(".")
        if prefix != "model.layers" or not index.isdigit() or int(index) >= num_layers:
            raise ValueError(
                f"exits: {name!r} is not a decoder layer; use 'model.layers.K' with 0 <= K < {num_layers}"
            )
        if int(index) == num_layers - 1:
            raise ValueError(f"exits: {name!r} is the last decoder layer, which is the model's own output")
        layers.append(int(index))
    if not layers:
        raise ValueError("exits must name at least one decoder layer")
    if layers != sorted(set(layers)):
        raise ValueError(f"exits must be distinct and in model order, got {list(exits)}")
    return layers


class CausalLMExits(nn.Module):
    """A causal LM with exits after some decoder layers; decode it with :func:`adaexit.generate`.

    Args:
        lm: ``LlamaForCausalLM`` (or Qwen2 / Mistral with the same layout), unchanged.
        exits: dotted names of decoder layers, ``["model.layers.7", ...]``.
        heads: ``None`` (the shared final norm + LM head for every exit) or one entry per exit, each
            ``None`` or a module mapping hidden states to hidden states (fed to the shared LM head) or to logits.
        policy: :class:`NeverExitPolicy` (default) or :class:`ConfidencePolicy` with one threshold per exit,
            applied to the exit's gate score.
        gate: ``"learned"`` (default: a trained ``Linear`` + sigmoid per exit) or ``"saturation"`` (CALM's state
            saturation, no parameters).
    """

    def __init__(self, lm: nn.Module, exits, heads=None, policy: Policy | None = None, gate: str = "learned"):
        super().__init__()
        _check_model(lm)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(map(repr, GATES))}, got {gate!r}")
        self.gate = gate
        self.lm = lm
        self.exit_layers = parse_exits(lm, exits)
        self.exit_names = [f"model.layers.{k}" for k in self.exit_layers]
        cfg = lm.config
        self.hidden_size = cfg.hidden_size
        self.vocab_size = lm.lm_head.out_features
        attn = lm.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        n = len(self.exit_layers)
        if heads is None:
            heads = [None] * n
        if not isinstance(heads, (list, tuple, nn.ModuleList)) or len(heads) != n:
            raise ValueError(f"heads must be None or a list of {n} entries (one per exit), got {heads!r}")
        self.heads = nn.ModuleList([nn.Identity() if h is None else h for h in heads])
        self._head_gives_logits = [self._probe_head(i, h) for i, h in enumerate(heads)]
        param = next(lm.parameters())
        self.gates = nn.ModuleList(nn.Linear(self.hidden_size, 1) for _ in range(n)).to(param.device, param.dtype)
        for gate in self.gates:
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        self.policy = NeverExitPolicy()
        self.set_policy(policy if policy is not None else NeverExitPolicy())

    # -- set up -----------------------------------------------------------------------------------
    def _probe_head(self, i: int, head) -> bool:
        if head is None:
            return False
        if not isinstance(head, nn.Module):
            raise ValueError(f"heads[{i}] must be None or an nn.Module, got {type(head).__name__}")
        param = next(self.lm.parameters())
        with torch.no_grad():
            out = head(torch.zeros(1, self.hidden_size, device=param.device, dtype=param.dtype))
        if out.shape[-1] == self.hidden_size:
            return False
        if out.shape[-1] == self.vocab_size:
            return True
        raise ValueError(
            f"heads[{i}] maps [1, {self.hidden_size}] to {tuple(out.shape)}: it must give hidden states "
            f"(last dim {self.hidden_size}) or logits (last dim {self.vocab_size})"
        )

    @property
    def num_layers(self) -> int:
        return len(self.lm.model.layers)

    @property
    def num_exits(self) -> int:
        """Early exits plus the model's own output."""
        return len(self.exit_layers) + 1

    def set_policy(self, policy: Policy) -> "CausalLMExits":
        if not isinstance(policy, ConfidencePolicy):
            raise ValueError(
                f"policy must be a ConfidencePolicy or NeverExitPolicy (thresholds on the exits' gates), "
                f"got {type(policy).__name__}"
            )
        self.policy = policy.bind(self.num_exits)
        return self

    @property
    def thresholds(self) -> list[float]:
        """Gate threshold per early exit (``inf`` never exits)."""
        return [float(t) for t in self.policy.thresholds]

    # -- the model's pieces ---------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(tokens)

    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        """``(cos, sin)`` for ``positions`` ``[n, q]``."""
        return self.lm.model.rotary_emb(h, positions)

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.model.norm(h))

    def exit_logits(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of early exit ``e`` for hidden states ``h`` ``[.., hidden]``."""
        head = self.heads[e]
        if self._head_gives_logits[e]:
            return head(h)
        if isinstance(head, nn.Identity):
            return self.final_logits(h)
        return self.lm.lm_head(head(h))

    def gate_score(self, e: int, h: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Exit ``e``'s gate score in [0, 1] for ``h`` ``[n, hidden]``, the state after the exit's layer
        (``before``: the state entering that layer, which ``gate="saturation"`` needs). NaN never exits."""
        if self.gate == "saturation":
            if before is None:
                raise ValueError("gate_score: gate='saturation' needs before=, the state entering the exit's layer")
            return F.cosine_similarity(h.float(), before.float(), dim=-1).clamp(min=0.0)
        return torch.sigmoid(self.gates[e](h).squeeze(-1).float())

    def layer(self, i: int, h: torch.Tensor, step, cache) -> torch.Tensor:
        """Decoder layer ``i`` on ``h`` ``[n, q, hidden]`` for the rows and slots of ``step`` (a
        :class:`~adaexit.decoding.cache.Step`); writes their K/V into ``cache``."""
        block = self.lm.model.layers[i]
        attn = block.self_attn
        x = block.input_layernorm(h)
        n, q, _ = x.shape
        query = attn.q_proj(x).view(n, q, -1, self.head_dim).transpose(1, 2)
        key = attn.k_proj(x).view(n, q, -1, self.head_dim).transpose(1, 2)
        value = attn.v_proj(x).view(n, q, -1, self.head_dim).transpose(1, 2)
        cos, sin = step.cos_sin
        query, key = self._rotary(query, key, cos, sin)
        cache.write(i, step, key, value)
        keys, values = cache.read(i, step.rows, step.end)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=step.mask, scale=attn.scaling, enable_gqa=keys.shape[1] != query.shape[1]
        )
        h = h + attn.o_proj(out.transpose(1, 2).reshape(n, q, -1))
        return h + block.mlp(block.post_attention_layernorm(h))

    def propagate(self, i: int, h: torch.Tensor, step, cache) -> None:
        """State propagation (CALM): K/V of skipped layer ``i`` from an exited token's hidden state ``h``
        ``[n, 1, hidden]``, so later tokens see a cache with no hole."""
        block = self.lm.model.layers[i]
        attn = block.self_attn
        x = block.input_layernorm(h)
        n, q, _ = x.shape
        key = attn.k_proj(x).view(n, q, -1, self.head_dim).transpose(1, 2)
        value = attn.v_proj(x).view(n, q, -1, self.head_dim).transpose(1, 2)
        cos, sin = step.cos_sin
        _, key = self._rotary(key, key, cos, sin)
        cache.write(i, step, key, value)

    def extra_repr(self) -> str:
        return f"lm={type(self.lm).__name__}, exits={self.exit_names}, gate={self.gate!r}, thresholds={self.thresholds}"

    def forward(self, *args, **kwargs):
        raise TypeError("CausalLMExits decodes with adaexit.generate(model, input_ids, ...); it has no forward")


def layer_cost(model: CausalLMExits) -> tuple[float, float]:
    """(one decoder layer's, the LM head's) weight count: the per-token cost of each on a memory-bound step."""
    layer = sum(p.numel() for p in model.lm.model.layers[0].parameters())
    head = model.lm.lm_head.weight.numel()
    return float(layer), float(head)


__all__ = ["SUPPORTED", "CausalLMExits", "is_causal_lm", "layer_cost", "parse_exits"]
