"""Risk control for :func:`adaexit.calibrate`: a budget that holds on new data with a stated probability.

The point estimate of a policy's accuracy drop on the calibration rows is biased low for the policy the
search picks (the best of hundreds of candidates on one sample looks better than it is). With
``confidence = 1 - delta``, :func:`adaexit.calibrate` instead runs Learn-then-Test (Angelopoulos, Bates,
Candès, Jordan, Lei, 2021) with fixed-sequence testing:

1. the calibration rows are split at random (a permutation independent of the data, seed 0) into a
   *search* half and a *test* half;
2. the existing search runs on the search half only and produces the candidate policies; they are
   ordered from most to least conservative by the upper confidence bound of their new-error rate on
   the search half (:func:`approximate_bound`; new errors for the net rule too: the search half's
   fixes are what its search overfits), keeping only candidates cheaper than every one before them;
3. on the test half, each candidate's null hypothesis ``H_j: risk_j > alpha`` (``alpha`` = the budget)
   is tested in that order at level ``delta`` with an exact binomial test (:func:`upper_bound`); the
   sequence stops at the first candidate not rejected;
4. among the rejected (certified) candidates the cheapest is chosen; if none is, the never-exit policy
   (risk 0) is.

Proof sketch. Conditional on the search half, the candidates and their order are fixed, and the test
rows are i.i.d. from the data distribution, so each test is a valid level-``delta`` test of its
``H_j``. Fixed-sequence testing rejects a true ``H_j`` only if the first true null in the order is
rejected, which has probability at most ``delta``: the family-wise error rate is at most ``delta``.
So with probability at least ``1 - delta`` every certified candidate has risk at most ``alpha``, and
so has any one of them chosen after looking at the data, and the never-exit policy has risk 0. The
guarantee holds conditionally on the search half, hence unconditionally. The split is needed: the
candidates come from a data-driven search, and testing them on the rows that produced them is not
valid (LTT needs candidates and order fixed before the test data are seen).

What is controlled (the loss per row):

* ``drop="new_errors"``: ``L = 1`` where the last exit is right and the policy is wrong, else 0. ``L``
  is Bernoulli, so the count on ``n`` test rows is Binomial(n, risk) and the exact (Clopper-Pearson)
  one-sided bound at level ``delta`` is the tightest valid one (a Hoeffding-Bentkus bound for [0, 1]
  losses reduces to the same binomial tail up to a factor e for Bernoulli losses, and is looser).
* ``drop="net"`` (default): the expected net accuracy drop ``E[A - B]`` with ``A`` the new-error
  indicator above and ``B`` the fix indicator (the policy right where the last exit is wrong). The
  per-row loss ``A - B`` is in {-1, 0, 1}; mapping it to [0, 1] as ``(1 + A - B) / 2`` and using
  Hoeffding-Bentkus is valid but needs a bound on a variable of variance near 1/4, several pp wide at
  5,000 rows. Instead both parts are Bernoulli: ``ucb(A, delta/2) - lcb(B, delta/2)`` (exact
  binomial bounds, a union bound over the two) is a valid ``1 - delta`` upper bound on ``E[A - B]``.

Rejecting ``H_j`` when the upper confidence bound is ``<= alpha`` is the same test as a p-value
``P(Binomial(n, alpha) <= count) <= delta`` for the new-errors rule (and its two-part union for the net
rule): the bound is what the tables print.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import torch

#: The share of the calibration rows the search sees; the rest test its candidates.
SEARCH_FRACTION = 0.5
#: The seed of the search/test split (a fixed permutation: deterministic results).
SPLIT_SEED = 0


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """``log P(Binomial(n, p) <= k)``, summed exactly in log space."""
    if k >= n or p <= 0.0:
        return 0.0
    if k < 0:
        return -math.inf
    if p >= 1.0:
        return -math.inf
    i = torch.arange(k + 1, dtype=torch.float64)
    log_choose = math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    terms = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(torch.logsumexp(terms, 0))


@lru_cache(maxsize=65536)
def upper_bound(k: int, n: int, delta: float) -> float:
    """Exact one-sided ``1 - delta`` upper confidence bound (Clopper-Pearson) of a Bernoulli mean after
    ``k`` successes in ``n`` trials: the ``p`` with ``P(Binomial(n, p) <= k) = delta`` (1 if ``k = n``)."""
    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if k == n:
        return 1.0
    if k == 0:  # closed form: (1 - p)^n = delta
        return -math.expm1(math.log(delta) / n)
    lo, hi, log_delta = k / n, 1.0, math.log(delta)
    for _ in range(60):  # the CDF falls as p grows: bisect to ~1e-18
        mid = 0.5 * (lo + hi)
        if _log_binom_cdf(k, n, mid) > log_delta:
            lo = mid
        else:
            hi = mid
    return hi


def lower_bound(k: int, n: int, delta: float) -> float:
    """Exact one-sided ``1 - delta`` lower confidence bound of a Bernoulli mean (0 if ``k = 0``)."""
    return 1.0 - upper_bound(int(n) - int(k), n, delta)


def risk_bound(new_errors: int, fixes: int, n: int, drop: str, delta: float) -> float:
    """A ``1 - delta`` upper confidence bound on a policy's risk (a fraction) from its counts on ``n``
    i.i.d. test rows: the new-error rate (``drop="new_errors"``) or the net drop (``"net"``: new errors
    minus fixes, each bounded at ``delta / 2``)."""
    if n <= 0:
        return math.inf
    if drop == "new_errors":
        return upper_bound(new_errors, n, delta)
    return upper_bound(new_errors, n, delta / 2) - lower_bound(fixes, n, delta / 2)


def approximate_bound(new_errors: int, fixes: int, n: int, drop: str, delta: float) -> float:
    """A cheap stand-in for :func:`risk_bound` (Wilson score bounds) that orders candidates by how
    certifiable they look on the search half; any order fixed before the test half is read is valid."""
    if n <= 0:
        return math.inf

    def upper(k, d):
        z = NormalDist().inv_cdf(1.0 - d)
        return (k + z * z / 2 + z * math.sqrt(k * (n - k) / n + z * z / 4)) / (n + z * z)

    if drop == "new_errors":
        return upper(new_errors, delta)
    return upper(new_errors, delta / 2) - (1.0 - upper(n - fixes, delta / 2))


def least_certifiable(n: int, drop: str, delta: float) -> float:
    """The smallest bound (a fraction) :func:`risk_bound` can give on ``n`` test rows: that of a policy
    with no new errors and no fixes. A budget below it can never be certified with this many rows."""
    return risk_bound(0, 0, n, drop, delta)


def search_budget(budget_pp: float, n_test: int, drop: str, delta: float) -> float:
    """The budget (pp) the search on the search half aims at: the largest new-error rate whose bound on
    ``n_test`` rows stays within ``budget_pp`` (fixes ignored), i.e. what a candidate that does as well
    on the test half as on the search half can certify. 0 if even no new errors cannot."""
    alpha = budget_pp / 100.0
    delta_a = delta if drop == "new_errors" else delta / 2
    if upper_bound(0, n_test, delta_a) > alpha:
        return 0.0
    lo, hi = 0, n_test  # the largest count k with upper_bound(k) <= alpha
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if upper_bound(mid, n_test, delta_a) <= alpha:
            lo = mid
        else:
            hi = mid - 1
    return 100.0 * lo / n_test


def split_rows(n: int, search_fraction: float = SEARCH_FRACTION, seed: int = SPLIT_SEED):
    """A random split of ``n`` rows into ``(search, test)`` index tensors (sorted), independent of the
    data; the search part has ``floor(n * search_fraction)`` rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_search = int(math.floor(n * search_fraction))
    return order[:n_search].sort().values, order[n_search:].sort().values


def fixed_sequence(bounds, alpha: float) -> int:
    """How many of ``bounds`` (in the test order) are certified: the length of the leading run with
    ``bound <= alpha`` (fixed-sequence testing stops at the first hypothesis it cannot reject)."""
    count = 0
    for b in bounds:
        if not b <= alpha + 1e-12:
            break
        count += 1
    return count


__all__ = [
    "SEARCH_FRACTION",
    "approximate_bound",
    "fixed_sequence",
    "least_certifiable",
    "lower_bound",
    "risk_bound",
    "search_budget",
    "split_rows",
    "upper_bound",
]
