"""Exit criteria mean what the peers mean: PABEE's patience, DeeBERT / BranchyNet's entropy in nats,
FastBERT's speed, SDN / MSDNet's max probability. Each peer's rule is written here from its published
definition and compared with adaexit row by row (exit and logits), on random multi-exit models."""

import math
import warnings

import pytest
import torch

from adaexit import ConfidencePolicy, PatiencePolicy
from adaexit.policies import entropy_nats, entropy_score, entropy_threshold, fastbert_threshold
from helpers import mlp_net, randn_inputs

WIDTHS = [12, 16, 16, 16, 16, 16, 16]  # six exits
CLASSES = 5
N = 400


def model_and_inputs(policy, ties=False, nan_rows=()):
    """A random 6-exit MLP. ``ties``: classes 0 and 1 get identical head weights, so their logits tie
    exactly and argmax must break the tie (first index); ``nan_rows``: rows whose input is NaN."""
    model = mlp_net(WIDTHS, CLASSES, policy, seed=3, head_scale=4.0)
    if ties:
        with torch.no_grad():
            for head in model.heads:
                head.classifier.weight[1] = head.classifier.weight[0]
                head.classifier.bias[1] = head.classifier.bias[0]
    x = randn_inputs(N, WIDTHS[0], seed=4, scale=2.0)
    x[list(nan_rows)] = math.nan
    return model, x


def run(model, x):
    with torch.no_grad():
        dense = torch.stack(model.exit_logits(x))  # [K, N, C]
        out, info = model(x, return_info=True)
    return dense, out, info.exit_index


# ---------------------------------------------------------------------------------------------
# PABEE (Zhou et al. 2020, bert-loses-patience/modeling_pabee_bert.py), one row at a time
# ---------------------------------------------------------------------------------------------
def pabee_exit(row_logits, patience):
    """PABEE's inference loop for one example: the counter starts at 0, grows by one when a layer's
    argmax equals the previous layer's and resets to 0 otherwise; stop when it equals ``patience``."""
    counter, previous = 0, None
    for i, logits in enumerate(row_logits):
        labels = logits.argmax()
        if previous is not None and bool(labels == previous.argmax()):
            counter += 1
        else:
            counter = 0
        previous = logits
        if counter == patience:
            return i
    return len(row_logits) - 1


@pytest.mark.parametrize("ties", [False, True], ids=["random", "tied-argmax"])
@pytest.mark.parametrize("patience", [0, 1, 2, 3, 5, 7])
def test_patience_is_pabees(patience, ties):
    model, x = model_and_inputs(PatiencePolicy(patience), ties=ties)
    dense, out, exit_index = run(model, x)
    want = torch.tensor([pabee_exit(dense[:, n], patience) for n in range(N)])
    assert torch.equal(exit_index, want)
    torch.testing.assert_close(out, dense[want, torch.arange(N)])
    if ties:  # the tie really happens on many rows
        assert int((dense[..., 0] == dense[..., 1]).all(0).sum()) == N
    last = len(WIDTHS) - 2
    assert bool((exit_index >= min(patience, last)).all())  # exit k needs k agreements before it
    if patience in (1, 2) and not ties:
        assert 0 < int((exit_index < last).sum()) < N  # the counter really travels with the survivors


def test_patience_nan_rows_never_exit_early_and_the_last_exit_fires():
    nan_rows = [0, 7, 399]
    model, x = model_and_inputs(PatiencePolicy(0), nan_rows=nan_rows)  # patience 0 exits every finite row at once
    dense, out, exit_index = run(model, x)
    last = len(WIDTHS) - 2
    assert exit_index[nan_rows].tolist() == [last] * 3 and out[nan_rows].isnan().all()
    finite = torch.ones(N, dtype=torch.bool)
    finite[nan_rows] = False
    assert bool((exit_index[finite] == 0).all())
    model.set_policy(PatiencePolicy(len(WIDTHS)))  # more patience than exits: everyone runs to the last
    _, _, exit_index = run(model, x)
    assert bool((exit_index == last).all())


def test_patience_round_trips_through_the_state_dict():
    model, x = model_and_inputs(PatiencePolicy(2))
    state = model.state_dict()
    assert state["policy._extra_state"] == {"policy": "PatiencePolicy", "patience": 2}
    fresh, _ = model_and_inputs(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(state)  # loads silently
    assert isinstance(fresh.policy, PatiencePolicy) and fresh.policy.patience == 2
    assert torch.equal(run(fresh, x)[2], run(model, x)[2])
    bad = dict(state, **{"policy._extra_state": {"policy": "PatiencePolicy", "patience": -1}})
    with pytest.raises(ValueError, match="patience"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="patience"):
        PatiencePolicy(-1)


# ---------------------------------------------------------------------------------------------
# Entropy thresholds: DeeBERT / BranchyNet (raw nats) and FastBERT (normalised "speed")
# ---------------------------------------------------------------------------------------------
def entropy_nats_of(logits):
    """Entropy in nats of softmax(logits), float64: ``-sum p log p``."""
    p = torch.softmax(logits.double(), dim=-1)
    return -torch.special.xlogy(p, p).sum(dim=-1)  # 0 log 0 = 0; NaN logits give NaN


def first_below(values, threshold):
    """Peers' rule: exit at the first early exit whose value is strictly below the threshold; else the last."""
    k_last = values.shape[0] - 1
    below = values[:-1] < threshold
    first = torch.where(below.any(0), below.double().argmax(0), torch.full((values.shape[1],), k_last))
    return first.long()


def between_rows(values, q):
    """A threshold near quantile ``q`` of ``values``, in the middle of the gap between two rows, so float
    rounding cannot put any row on the other side."""
    v = torch.unique(values[:-1].flatten())
    i = int(q * (v.numel() - 2))
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("q", [0.1, 0.4, 0.8])
def test_deebert_and_branchynet_entropy_in_nats(q):
    model, x = model_and_inputs(None, nan_rows=[5])
    with torch.no_grad():
        dense = torch.stack(model.exit_logits(x))
    nats = entropy_nats_of(dense)  # [K, N]; NaN for the NaN row
    S = between_rows(nats[:, torch.isfinite(nats).all(0)], q)
    model.set_policy(ConfidencePolicy("entropy", [entropy_threshold(S, CLASSES)] * (len(WIDTHS) - 2)))
    _, out, exit_index = run(model, x)
    want = first_below(nats, S)  # NaN < S is False: the NaN row runs to the last exit, as in DeeBERT
    assert torch.equal(exit_index, want)
    torch.testing.assert_close(out, dense[want, torch.arange(N)], equal_nan=True)
    assert 0 < int((want < len(WIDTHS) - 2).sum()) < N


@pytest.mark.parametrize("q", [0.2, 0.6])
def test_fastbert_speed(q):
    model, x = model_and_inputs(None)
    with torch.no_grad():
        dense = torch.stack(model.exit_logits(x))
    uncertainty = entropy_nats_of(dense) / math.log(CLASSES)  # FastBERT's normalised entropy
    speed = between_rows(uncertainty, q)
    model.set_policy(ConfidencePolicy("entropy", [fastbert_threshold(speed)] * (len(WIDTHS) - 2)))
    _, out, exit_index = run(model, x)
    assert torch.equal(exit_index, first_below(uncertainty, speed))


def test_sdn_max_probability_carries_over_unchanged():
    model, x = model_and_inputs(None)
    with torch.no_grad():
        dense = torch.stack(model.exit_logits(x))
    maxprob = torch.softmax(dense.double(), -1).max(-1).values
    q = 1.0 - between_rows(1.0 - maxprob, 0.5)  # SDN: exit when max p >= q
    model.set_policy(ConfidencePolicy("maxprob", [q] * (len(WIDTHS) - 2)))
    _, _, exit_index = run(model, x)
    assert torch.equal(exit_index, first_below(-maxprob, -q))


def test_entropy_conversions():
    for classes in (2, 10, 1000):
        for nats in (0.0, 0.3, math.log(classes) / 2, math.log(classes)):
            assert entropy_nats(entropy_score(nats, classes), classes) == pytest.approx(nats)
        assert entropy_threshold(0.0, classes) > 1.0  # H < 0 never holds: the exit is disabled
        assert entropy_threshold(math.log(classes) + 0.1, classes) < 0.0  # every finite row exits
    assert entropy_score(math.log(4) / 2, 4) == pytest.approx(0.5)
    assert fastbert_threshold(0.25) == pytest.approx(0.75) and fastbert_threshold(0.25) > 0.75
    with pytest.raises(ValueError, match="num_classes"):
        entropy_threshold(0.5, 1)
    with pytest.raises(ValueError, match="NaN"):
        fastbert_threshold(math.nan)
