"""The llm job's LayerSkip-style fine-tune (adaexit.apps.llm.finetune) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaexit.apps.llm.finetune import (collate, dropout_rates, early_exit_losses, exit_states, exit_weights, finetune,
                                       perplexity, sequence_agreement)

PAD = 0
EXITS = [0, 2]


def tiny_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def sequences(n=6, seed=1):
    """Prompts of different lengths (left padding is exercised) with 4 generated tokens each."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 50, (5 + i % 3 + 4,), generator=g), 5 + i % 3) for i in range(n)]


def test_dropout_rates_rise_linearly_and_spare_the_last_layer():
    rates = dropout_rates(5, 0.2)
    torch.testing.assert_close(rates, torch.tensor([0.0, 0.2 / 3, 0.4 / 3, 0.2, 0.0]))
    weights = exit_weights(EXITS, 4)
    torch.testing.assert_close(weights, torch.tensor([1.0, 3.0, 4.0]) / 8)  # depth 1, 3 and the last (4)


def test_collate_marks_the_generated_positions_and_the_last_loss_is_the_models_own():
    lm, seqs = tiny_lm(), sequences()
    ids, mask, targets = collate(seqs, PAD)
    assert targets.sum() == 4 * len(seqs) and (mask.sum(1) == torch.tensor([s.numel() for s, _ in seqs])).all()
    # the longest row has no padding: Hugging Face's own forward gives the same last-layer loss
    longest = max(range(len(seqs)), key=lambda b: seqs[b][0].numel())
    one = collate([seqs[longest]], PAD)
    with torch.no_grad():
        logits = lm(one[0]).logits[:, :-1][one[2]]
        expected = torch.nn.functional.cross_entropy(logits, one[0][:, 1:][one[2]])
        torch.testing.assert_close(early_exit_losses(lm, EXITS, one)[-1], expected)


def test_skipping_every_layer_up_to_an_exit_leaves_the_embedding():
    lm, seqs = tiny_lm(), sequences()
    ids, mask, _ = collate(seqs, PAD)
    skip = torch.zeros(4, len(seqs), dtype=torch.bool)
    skip[:3, 1] = True  # sequence 1 skips layers 0-2
    with torch.no_grad():
        states = exit_states(lm, EXITS, ids, mask, skip)
        plain = exit_states(lm, EXITS, ids, mask)
    torch.testing.assert_close(states[0][1], lm.model.embed_tokens(ids[1]))
    torch.testing.assert_close(states[1][1], lm.model.embed_tokens(ids[1]))
    torch.testing.assert_close(states[1][0], plain[1][0])  # the other sequences run every layer
    assert not torch.allclose(states[0][1], plain[0][1])


def test_finetune_changes_the_layers_lowers_the_early_exit_loss_and_keeps_the_head():
    lm, seqs = tiny_lm(), sequences()
    batch, weights = collate(seqs, PAD), exit_weights(EXITS, 4)
    layer = lm.model.layers[1].mlp.up_proj.weight.detach().clone()
    head = lm.lm_head.weight.detach().clone()
    with torch.no_grad():
        before = float((weights * early_exit_losses(lm, EXITS, batch)).sum())
    report = finetune(lm, EXITS, seqs, steps=3, pad=PAD, lr=1e-2, p_max=0.2, batch_size=len(seqs))
    with torch.no_grad():
        after = float((weights * early_exit_losses(lm, EXITS, batch)).sum())
    assert after < before - 0.05, (before, after)
    assert not torch.equal(lm.model.layers[1].mlp.up_proj.weight, layer)
    assert torch.equal(lm.lm_head.weight, head) and lm.lm_head.weight.requires_grad  # frozen, then restored
    assert not lm.training and report["steps"] == 3 and report["weights"] == pytest.approx(weights.tolist())
    assert all(p.grad is None for p in lm.parameters())  # no model-sized gradients left behind


def test_finetune_restores_what_the_caller_froze():
    lm, seqs = tiny_lm(), sequences()
    lm.requires_grad_(False)
    layer = lm.model.layers[1].mlp.up_proj.weight.detach().clone()
    finetune(lm, EXITS, seqs, steps=2, pad=PAD, lr=1e-2, batch_size=len(seqs))
    assert not torch.equal(lm.model.layers[1].mlp.up_proj.weight, layer)  # the layers trained all the same
    assert not any(p.requires_grad for p in lm.parameters())


@pytest.mark.parametrize("bad, name", [(dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(p_max=1.0), "p_max"),
                                       (dict(batch_size=0), "batch_size"), (dict(exit_layers=[3]), "exit_layers"),
                                       (dict(exit_layers=[2, 0]), "exit_layers"),
                                       (dict(sequences=[(torch.tensor([1, 2]), 2)]), "sequences"),
                                       (dict(sequences=[]), "sequences")])
def test_bad_settings_are_refused_by_name(bad, name):
    args = {**dict(exit_layers=EXITS, sequences=sequences(), steps=2, pad=PAD), **bad}
    with pytest.raises(ValueError, match=name):
        finetune(tiny_lm(), **args)


def test_perplexity_and_sequence_agreement():
    lm, seqs = tiny_lm(), sequences()
    ppl, agree = perplexity(lm, seqs, PAD, batch_size=4)
    assert 1 < ppl < 1000 and 0 <= agree <= 1
    with torch.no_grad():  # the model's own greedy continuations, batched with left padding, agree everywhere
        greedy = [(lm.generate(s[:p][None], max_new_tokens=4, do_sample=False, pad_token_id=PAD)[0], p) for s, p in seqs]
    assert perplexity(lm, greedy, PAD, batch_size=6)[1] == 1.0
    other = [(torch.cat([s[:p], s[p:].flip(0)]), p) for s, p in seqs]
    assert sequence_agreement(seqs, seqs) == 1.0
    assert sequence_agreement(other, seqs) == pytest.approx(
        sum(int((s[p:].flip(0) == s[p:]).sum()) for s, p in seqs) / (4 * len(seqs)))
