"""Anytime training (Hu et al.): :class:`~adaexit.training.MultiExitLoss` with the oscillating or AdaLoss
weighting, so an anytime network trains with the same loss as any multi-exit model; an :class:`EANN`
trains each of its networks on its own."""

from __future__ import annotations

from ..base import AdaptiveModel
from ..training import MultiExitLoss, train
from .eann import EANN


# ---------------------------------------------------------------------------------------------
# Anytime training (Hu et al.): the oscillating and AdaLoss weightings are the ones MultiExitLoss uses
# (adaexit.training), so an anytime network trains with the same loss as any multi-exit model.
def anytime_loss(num_exits: int, weighting: str = "adaloss", **kwargs) -> MultiExitLoss:
    """A :class:`~adaexit.training.MultiExitLoss` with an anytime weighting.

    Args:
        weighting: ``"adaloss"`` (weights inversely proportional to each exit's running-mean loss),
            ``"oscillating"`` (the emphasised exit moves over training), or any other
            :class:`~adaexit.training.MultiExitLoss` weighting.
        **kwargs: options of the weighting and the loss (``momentum=``, ``schedule=``, ``distill=``...).
    """
    return MultiExitLoss(num_exits, weighting, **kwargs)


def train_anytime(
    model, loader, epochs: int = 1, lr: float = 1e-3, weighting: str = "adaloss", weighting_kwargs=None, **train_kwargs
):
    """Train an anytime model with an anytime weighting (:func:`adaexit.training.train` underneath).

    An :class:`EANN` trains each of its networks on its own (each with its own weighting state), as in
    the paper: the networks share nothing, and AdaLoss balances the losses inside one network.

    Returns:
        the training history (for an EANN, the list of its networks' histories).
    """
    weighting_kwargs = dict(weighting_kwargs or {})
    if isinstance(model, EANN):
        return [
            train(
                net, loader, epochs, lr, anytime_loss(net.num_exits, weighting, **weighting_kwargs),
                desc=f"network {i}", **train_kwargs,
            )  # fmt: skip
            for i, net in enumerate(model.networks)
        ]
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"model must be an adaexit AdaptiveModel (an EarlyExitNet, an EANN...), got {type(model).__name__}")
    return train(model, loader, epochs, lr, anytime_loss(model.num_exits, weighting, **weighting_kwargs), **train_kwargs)
