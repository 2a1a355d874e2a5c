"""Decoder LLMs: batched greedy or sampled decoding with per-row self-speculation and per-row early exit.

* :class:`CausalLMExits` (:mod:`.model`): a Hugging Face Llama-family causal LM with exits after named decoder
  layers, their heads (default: the model's own final norm + LM head, shared) and cheap gates;
  ``adaexit.wrap(lm, exits=["model.layers.K", ...])`` builds one.
* :class:`RowCache` (:mod:`.cache`): a static KV cache with a length and positions per row.
* :func:`generate` (:mod:`.generate`): ``"full"``, ``"self_speculative"`` and ``"early_exit"`` decoding
  (:mod:`.strategies`), equal to ``lm.generate(..., do_sample=False)`` for the lossless strategies; with
  ``do_sample=True`` (:mod:`.sampling`) ``"full"`` draws as ``lm.generate(do_sample=True)`` and
  ``"self_speculative"`` is lossless in distribution (speculative sampling).
* :mod:`.costs`: measured step costs and the ideal speedup a run's acceptance / layers per token allows.
"""

from .cache import RowCache
from .generate import DecodeInfo, generate
from .model import SUPPORTED, CausalLMExits, is_causal_lm


def wrap_causal_lm(lm, exits, *, heads=None, policy=None, gate=None) -> CausalLMExits:
    """``adaexit.wrap`` for causal LMs: see :class:`CausalLMExits` (keywords ``heads=``, ``policy=``, ``gate=``)."""
    return CausalLMExits(lm, exits, heads=heads, policy=policy, gate="learned" if gate is None else gate)


__all__ = ["SUPPORTED", "CausalLMExits", "DecodeInfo", "RowCache", "generate", "is_causal_lm", "wrap_causal_lm"]
