"""REINFORCE, shared by every method that learns discrete routing decisions by policy gradient
(Guan et al.'s cascade selectors, D2NN's controllers).

For sampled decisions with log-probability ``log p`` and a per-example reward ``R``, the policy-gradient
loss is ``-mean((R - b) * log p)``. The baseline ``b`` (here a running mean of the reward) lowers the
variance of the gradient without biasing it.
"""

from __future__ import annotations

import torch


class RewardBaseline:
    """A running mean of the batch-mean reward.

    Args:
        momentum: weight of the past in the running mean (in ``[0, 1)``).
        enabled: ``False`` gives ``b = 0`` (plain REINFORCE).

    :meth:`advantage` returns ``R - b`` with ``b`` the mean of the *earlier* batches (the first batch's
    own mean on the first call), then folds this batch in.
    """

    def __init__(self, momentum: float = 0.9, enabled: bool = True):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline momentum must be in [0, 1), got {momentum}")
        self.momentum, self.enabled = float(momentum), bool(enabled)
        self.value: float | None = None

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        reward = reward.detach()
        if not self.enabled:
            return reward
        mean = float(reward.mean())
        if self.value is None:
            self.value = mean
        advantage = reward - self.value
        self.value = self.momentum * self.value + (1 - self.momentum) * mean
        return advantage


def policy_gradient_loss(log_prob: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """``-mean(advantage * log_prob)``; the advantage is a constant (detached)."""
    return -(advantage.detach() * log_prob).mean()


__all__ = ["RewardBaseline", "policy_gradient_loss"]
