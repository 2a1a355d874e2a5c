"""Thresholds carried over from other early-exit projects, converted to adaexit's confidence scores.

adaexit's scores are confidences in [0, 1] and a row exits when ``score >= threshold``. The peers:

* **DeeBERT** (Xin et al., 2020) and **BranchyNet** (Teerapittayanon et al., 2016) exit when the raw
  entropy of the exit's softmax, in nats, is *below* a threshold ``S``: ``H(p) < S``. With adaexit's
  ``entropy`` score ``1 - H / log C`` that is ``score > 1 - S / log C``: :func:`entropy_threshold`.
* **FastBERT** (Liu et al., 2020) exits when the normalised entropy ``H / log C`` is below its
  ``speed``: ``score > 1 - speed``: :func:`fastbert_threshold`.
* **SDN** (Kaya et al., 2019) and **MSDNet** (Huang et al., 2018) exit when the top-1 probability
  reaches a threshold ``q``: adaexit's ``maxprob`` criterion with threshold ``q``, unchanged.
* **PABEE** (Zhou et al., 2020): :class:`~adaexit.PatiencePolicy` with the same ``patience``.

The peers compare strictly (``<``) where adaexit compares ``>=``, so the converted threshold is the
next float32 above the boundary: a row exactly on the boundary stays, as in the peer's rule.
"""

from __future__ import annotations

import math

import torch


def _above(value: float) -> float:
    """The smallest float32 strictly greater than ``value`` rounded to float32 (the scores' dtype)."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(math.inf, dtype=torch.float32)))


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or int(num_classes) < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    return int(num_classes)


def entropy_score(nats: float, num_classes: int) -> float:
    """adaexit's ``entropy`` score, ``1 - H / log C``, of a softmax whose entropy is ``nats``."""
    return 1.0 - float(nats) / math.log(_check_classes(num_classes))


def entropy_nats(score: float, num_classes: int) -> float:
    """The entropy in nats of a softmax whose adaexit ``entropy`` score is ``score`` (the inverse)."""
    return (1.0 - float(score)) * math.log(_check_classes(num_classes))


def entropy_threshold(nats: float, num_classes: int) -> float:
    """The ``entropy``-criterion threshold that exits exactly the rows DeeBERT / BranchyNet exit with
    their entropy threshold ``nats`` (``H < nats``) for ``num_classes`` classes.

    A threshold above 1 (``nats <= 0``) disables the exit; one below 0 (``nats > log C``) lets every
    row with finite logits exit, as ``H <= log C < nats`` does.
    """
    if math.isnan(float(nats)):
        raise ValueError("nats is NaN")
    return _above(entropy_score(nats, num_classes))


def fastbert_threshold(speed: float) -> float:
    """The ``entropy``-criterion threshold that exits the rows FastBERT exits at ``speed`` (its
    normalised uncertainty ``H / log C < speed``), whatever the class count."""
    if math.isnan(float(speed)):
        raise ValueError("speed is NaN")
    return _above(1.0 - float(speed))


__all__ = ["entropy_nats", "entropy_score", "entropy_threshold", "fastbert_threshold"]
