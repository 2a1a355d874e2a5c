"""Compatibility alias: ``wrap`` for non-Hugging-Face models now lives in :mod:`adaexit.wrappers.fx`
(a torch.fx split at dotted module paths, which replaced the chain-of-children splitter that was here).
``from adaexit.adapters import wrap`` keeps working."""

from .wrappers.fx import HEAD_KINDS, ModelExits, candidate_exits, pick_exits, split_model, wrap

__all__ = ["HEAD_KINDS", "ModelExits", "candidate_exits", "pick_exits", "split_model", "wrap"]
