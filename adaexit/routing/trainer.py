"""End-to-end D2NN training (Liu & Deng): backprop for the modules, REINFORCE for the controllers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import batches
from ..reinforce import RewardBaseline, policy_gradient_loss
from .model import D2NN


class D2NNTrainer:
    """End-to-end D2NN training: backprop for the modules, REINFORCE for the controllers.

    Per step, on a sampled rollout: ``loss = CE(prediction, y) - mean((R - b) * log_prob)`` with reward
    ``R = 1[correct] - lam * cost`` (cost = FLOPs / most expensive path) and ``b`` a running mean of the
    reward (the baseline of :mod:`adaexit.reinforce`; it lowers the variance of the policy gradient
    without biasing it).

    Args:
        model: the :class:`D2NN`.
        lam: the price of computation; larger -> cheaper paths.
        lr: Adam learning rate for the modules; ``controller_lr`` for the controllers (default ``lr``).
        baseline_momentum: of the running-mean baseline.
        entropy: optional entropy bonus on the controllers' choices (keeps exploring early on).
    """

    def __init__(
        self,
        model: D2NN,
        lam: float = 0.1,
        lr: float = 1e-3,
        controller_lr: float | None = None,
        baseline_momentum: float = 0.9,
        entropy: float = 0.0,
    ):
        if not isinstance(model, D2NN):
            raise ValueError(f"model must be a D2NN, got {type(model).__name__}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.model, self.lam, self.entropy = model, float(lam), float(entropy)
        self.rewards = RewardBaseline(baseline_momentum)
        ctrl_params = list(model.controllers.parameters())
        ids = {id(p) for p in ctrl_params}
        module_params = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": module_params, "lr": lr}]
        if ctrl_params:
            groups.append({"params": ctrl_params, "lr": controller_lr or lr})
        self.optimizer = torch.optim.Adam(groups)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, modules: bool = True, controllers: bool = True, explore: bool = False
    ) -> dict:
        """One training step; returns ``{"loss", "reward", "accuracy", "cost"}`` of the batch.

        Args:
            modules / controllers: which parts learn at this step.
            explore: route uniformly at random (warm up the modules before the controllers learn).
        """
        model = self.model
        model.train()
        out = model.rollout(x, sample=True, uniform=explore)
        ce = F.cross_entropy(out.logits, y)
        with torch.no_grad():
            correct = (out.logits.argmax(1) == y).float()
            reward = correct - self.lam * out.cost
            advantage = self.rewards.advantage(reward)
        loss = ce if modules else ce.new_zeros(())
        if controllers and not explore and len(model.controllers):
            loss = loss + policy_gradient_loss(out.log_prob, advantage)
            if self.entropy:
                loss = loss - self.entropy * out.entropy.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            self.optimizer.step()
        return {
            "loss": float(loss.detach()),
            "reward": float(reward.mean()),
            "accuracy": float(correct.mean()),
            "cost": out.mean_cost,
        }

    def fit(
        self, data, epochs: int = 1, warmup_epochs: int = 0, batch_size: int = 256, shuffle: bool = True
    ) -> list[dict]:
        """Train for ``warmup_epochs`` of module-only training on uniformly random routes, then
        ``epochs`` of joint training. Returns the per-epoch means of :meth:`step`'s results.

        Args:
            data: ``(inputs, labels)`` tensors (batched here, reshuffled each epoch with torch's RNG)
                or an iterable of ``(x, y)`` batches.
        """
        history = []
        for epoch in range(int(warmup_epochs) + int(epochs)):
            warm = epoch < warmup_epochs
            logs = [self.step(x, y, explore=warm, controllers=not warm) for x, y in batches(data, batch_size, shuffle)]
            if logs:
                history.append({k: sum(d[k] for d in logs) / len(logs) for k in logs[0]} | {"warmup": warm})
        return history
