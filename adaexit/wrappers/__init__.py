"""``wrap``: an existing model as an adaptive model, by naming where exits go.

* Hugging Face encoder classifiers (BERT, RoBERTa, DistilBERT, ViT): :mod:`.huggingface`;
* every other model (``nn.Sequential``, every torchvision classification family, timm's, any single-input
  model torch.fx can trace): :mod:`.fx`, which splits the model at the named modules. :func:`candidate_exits`
  lists where exits can go, :func:`pick_exits` picks some at chosen fractions of the FLOPs.

Every backend takes the same keywords (:data:`~.common.WRAP_OPTIONS`) and returns the same shape of model
(``model``, ``exits``, ``layouts``, ``exit_heads``, ``stages``, ``heads``, ``policy``; ``state_dict`` keys
``model.*``, ``exit_heads.K.*``, ``policy._extra_state``, ``_extra_state`` = the exits), in the mode of the
model it wraps.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..decoding import is_causal_lm, wrap_causal_lm
from .common import WRAP_OPTIONS, refuse_options
from .fx import CutPoint, ModelExits, candidate_exits, pick_exits, split_model, wrap as wrap_fx
from .huggingface import TransformerExits, is_huggingface, wrap_transformer


def wrap(model: nn.Module, exits: Sequence[str], **options):
    """Wrap ``model`` as an adaptive model with early exits after the modules named in ``exits`` (dotted
    paths as ``model.named_modules()`` names them, in forward order); the model's own output is the last exit,
    and with the default never-exit policy the result computes what ``model`` computes.

    Keywords (every backend takes them; one a backend cannot honour is refused by name):
        heads: ``None`` for the backend's default heads, one ``nn.Module`` per early exit, or a callable
            ``(width, num_classes) -> nn.Module`` called once per early exit.
        policy: the exit policy (default: never exit early).
        example_input: a batch of one or two inputs (a tensor; a mapping of keyword tensors for Hugging Face
            models): shapes, widths and layouts are read from it (else from the first batch).
        trim: Hugging Face only: cut the survivors' padding after each exit decision (default ``True``).

    Llama-family causal LMs (``*ForCausalLM``) take ``heads=``, ``policy=`` and ``gate=`` (``"learned"``, the
    default, or ``"saturation"``) and give a :class:`~adaexit.decoding.CausalLMExits`, decoded with
    :func:`adaexit.generate`.

    The result is in ``model``'s mode (train or eval). See :class:`~.fx.ModelExits` and
    :class:`~.huggingface.TransformerExits`.
    """
    if is_causal_lm(model):  # decoder LLMs, decoded with adaexit.generate (see adaexit.decoding)
        refuse_options("causal LMs", options, ("heads", "policy", "gate"))
        return wrap_causal_lm(model, exits, heads=options.get("heads"), policy=options.get("policy"),
                              gate=options.get("gate"))
    if is_huggingface(model):
        return wrap_transformer(model, exits, **options)
    return wrap_fx(model, exits, **options)


__all__ = ["WRAP_OPTIONS", "CutPoint", "ModelExits", "TransformerExits", "candidate_exits", "pick_exits",
           "split_model", "wrap"]
