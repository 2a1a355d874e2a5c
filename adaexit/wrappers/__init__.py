"""``wrap``: an existing model as an adaptive model, by naming where exits go.

* Hugging Face encoder classifiers (BERT, RoBERTa, DistilBERT, ViT): :mod:`.huggingface`;
* everything else (``nn.Sequential``, torchvision models): :mod:`adaexit.adapters`.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..adapters import wrap as wrap_chain
from .huggingface import is_huggingface, wrap_transformer


def wrap(model: nn.Module, exits: Sequence[str], **kwargs):
    """Wrap ``model`` as an adaptive model with early exits after the modules named in ``exits``
    (dotted paths as ``model.named_modules()`` names them); the model's own classifier is the last
    exit, and with the default never-exit policy the result computes what ``model`` computes.

    Hugging Face encoder classifiers take ``heads=``, ``policy=``, ``trim=`` (see
    :class:`~adaexit.wrappers.huggingface.TransformerExits`); other models ``head=``, ``policy=``,
    ``example_input=`` (see :func:`adaexit.adapters.wrap`).
    """
    if is_huggingface(model):
        return wrap_transformer(model, exits, **kwargs)
    return wrap_chain(model, exits, **kwargs)


__all__ = ["wrap"]
