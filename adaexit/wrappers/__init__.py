"""``wrap``: an existing model as an adaptive model, by naming where exits go.

* Hugging Face encoder classifiers (BERT, RoBERTa, DistilBERT, ViT): :mod:`.huggingface`;
* every other model (``nn.Sequential``, every torchvision classification family, any single-input model
  torch.fx can trace): :mod:`.fx`, which splits the model at the named modules. :func:`candidate_exits`
  lists where exits can go, :func:`pick_exits` picks some at chosen fractions of the FLOPs.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..decoding import is_causal_lm, wrap_causal_lm
from .fx import CutPoint, ModelExits, candidate_exits, pick_exits, split_model, wrap as wrap_fx
from .huggingface import is_huggingface, wrap_transformer


def wrap(model: nn.Module, exits: Sequence[str], **kwargs):
    """Wrap ``model`` as an adaptive model with early exits after the modules named in ``exits``
    (dotted paths as ``model.named_modules()`` names them); the model's own output is the last exit, and
    with the default never-exit policy the result computes what ``model`` computes.

    Hugging Face encoder classifiers take ``heads=``, ``policy=``, ``trim=`` (see
    :class:`~adaexit.wrappers.huggingface.TransformerExits`); other models ``head=``, ``policy=``,
    ``example_input=`` (see :func:`adaexit.wrappers.fx.wrap`).
    """
    if is_causal_lm(model):  # decoder LLMs: decoded with adaexit.generate (see adaexit.decoding)
        return wrap_causal_lm(model, exits, **kwargs)
    if is_huggingface(model):
        return wrap_transformer(model, exits, **kwargs)
    return wrap_fx(model, exits, **kwargs)


__all__ = ["CutPoint", "ModelExits", "candidate_exits", "pick_exits", "split_model", "wrap"]
