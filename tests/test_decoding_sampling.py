"""Sampling in ``adaexit.generate`` (``do_sample=True``) on tiny random Llama models.

``"full"`` must draw exactly what Hugging Face's ``lm.generate(do_sample=True, ...)`` draws on the same random
state (same warpers, one ``torch.multinomial`` over the batch per step) until a row finishes. Never-exit
``"early_exit"`` must equal ``"full"``; every-row-exits must equal sampling from the truncated model.
``"self_speculative"`` must be lossless in distribution: thousands of rows of one prompt in one call, their
sequences' empirical distribution checked by a chi-square test against the full model's exact distribution
(enumerated), at a fixed seed.
"""

from __future__ import annotations

import pytest
import torch
from test_decoding import PAD, VOCAB, decode, gated, prompts, tiny_lm
from transformers import LlamaConfig, LlamaForCausalLM

import adaexit
from adaexit.decoding.sampling import Sampler

NEVER = VOCAB + 1  # an EOS no row emits: every row draws at every step, as in Hugging Face's batch

WARPS = [
    dict(temperature=1.0, top_k=None, top_p=None),
    dict(temperature=0.7, top_k=5, top_p=None),
    dict(temperature=1.3, top_k=None, top_p=0.8),
    dict(temperature=0.8, top_k=10, top_p=0.9),
]


def hf_sample(lm, ids, mask, new, eos, seed, temperature, top_k, top_p):
    """Hugging Face sampling with every warper given (its top-k default of 50 off where ``top_k`` is None)."""
    torch.manual_seed(seed)
    return lm.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=temperature,
                       top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0, eos_token_id=eos,
                       pad_token_id=PAD)


def sample(model, ids, mask, new, eos, seed, strategy="full", **options):
    torch.manual_seed(seed)
    return decode(model, ids, mask, new, eos, strategy, do_sample=True, **options)


@pytest.mark.parametrize("warp", WARPS, ids=["plain", "temp-topk", "temp-topp", "all"])
def test_full_sampling_draws_what_hugging_face_draws(warp):
    lm = tiny_lm(seed=21)
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(6, seed=22)
    expected = hf_sample(lm, ids, mask, 12, NEVER, 5, **warp)
    out, info = sample(model, ids, mask, 12, NEVER, 5, **warp)
    assert torch.equal(out, expected)
    greedy = decode(model, ids, mask, 12, NEVER)[0]
    assert not torch.equal(out, greedy)  # it really sampled
    assert not torch.equal(out, sample(model, ids, mask, 12, NEVER, 6, **warp)[0])  # and the seed matters


def test_full_sampling_equals_hugging_face_until_the_first_row_finishes():
    """After a row's EOS Hugging Face keeps drawing for it; adaexit drops the row, so the draws part ways."""
    lm = tiny_lm(seed=23)
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(6, seed=24)
    warp = WARPS[1]
    eos = int(hf_sample(lm, ids, mask, 3, NEVER, 7, **warp)[0, -1])  # row 0 emits it at step 3
    expected = hf_sample(lm, ids, mask, 12, eos, 7, **warp)
    out = sample(model, ids, mask, 12, eos, 7, **warp)[0]
    new = expected[:, ids.shape[1] :]
    first = int((new == eos).any(0).int().argmax())  # the step at which the first row finishes
    assert first <= 2
    p = ids.shape[1]
    assert torch.equal(out[:, : p + first + 1], expected[:, : p + first + 1])


@pytest.mark.parametrize("per_row, fill", [(True, "propagate"), (False, "propagate"), (True, "recompute")])
def test_never_exit_early_exit_sampling_equals_full_sampling(per_row, fill):
    lm = tiny_lm(seed=25)
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(5, seed=26)
    out, info = sample(model, ids, mask, 10, NEVER, 8, "early_exit", per_row=per_row, fill=fill, **WARPS[3])
    assert torch.equal(out, sample(model, ids, mask, 10, NEVER, 8, **WARPS[3])[0])
    assert info.exit_counts[0] == 0


def test_every_row_exiting_samples_the_truncated_model():
    """Every gate fires: the prompt's first token is the full model's draw, every later one the truncated
    model's, drawn from the same random stream as Hugging Face's two calls."""
    lm = tiny_lm(seed=27)
    model = gated(adaexit.wrap(lm, exits=["model.layers.1"]), bias=30.0)
    ids, mask = prompts(4, seed=28)
    truncated = LlamaForCausalLM(LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": 2})).eval()
    truncated.load_state_dict(lm.state_dict(), strict=False)
    warp = WARPS[1]
    torch.manual_seed(9)
    common = dict(do_sample=True, temperature=warp["temperature"], top_k=warp["top_k"], top_p=1.0,
                  eos_token_id=NEVER, pad_token_id=PAD)
    first = lm.generate(ids, attention_mask=mask, max_new_tokens=1, **common)
    expected = truncated.generate(first, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                                  max_new_tokens=9, **common)
    out, info = sample(model, ids, mask, 10, NEVER, 9, "early_exit", **warp)
    assert torch.equal(out, expected)
    assert info.exit_counts == [4 * 9, 0]


def test_a_generator_makes_the_draws_repeatable_and_leaves_the_global_stream_alone():
    model = adaexit.wrap(tiny_lm(seed=29), exits=["model.layers.1"])
    ids, mask = prompts(3, seed=30)
    for strategy, options in [("full", {}), ("self_speculative", {"num_draft": 3})]:
        runs = []
        for seed in (1, 1, 2):
            state = torch.get_rng_state()
            runs.append(decode(model, ids, mask, 10, NEVER, strategy, do_sample=True,
                               generator=torch.Generator().manual_seed(seed), **options)[0])
            assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]), strategy


# ---------------------------------------------------------------------------------------------
# Lossless in distribution
# ---------------------------------------------------------------------------------------------
SMALL_VOCAB, ROWS, NEW = 24, 4000, 4
# top-k 4 keeps 4 ** NEW = 256 sequences under the full model (about 16 samples each), and the exit's top 4
# differ from the full model's: a wrong acceptance rule puts mass outside that support or skews it
SPEC_WARP = dict(temperature=0.9, top_k=4)


def exact_distribution(model, prompt, new, sampler):
    """The full model's probability of every continuation: ``[vocab] * new`` (float64), by enumeration."""
    lm = model.lm
    vocab = model.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = prompt[None]
    with torch.no_grad():
        for _ in range(new):
            probs = sampler.probs(lm(prefixes).logits[:, -1]).double()  # [prefixes, vocab]
            joint = (joint[:, None] * probs).reshape(-1)
            nexts = torch.arange(vocab).repeat(len(prefixes))[:, None]
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), nexts], 1)
    return joint.view([vocab] * new)


def chi_square_p_value(sequences, exact):
    """The p-value of the samples' counts against ``exact``; 0 if a sample has probability 0."""
    vocab = exact.shape[0]
    index = torch.zeros(sequences.shape[0], dtype=torch.long)
    for t in range(sequences.shape[1]):
        index = index * vocab + sequences[:, t]
    counts = torch.bincount(index, minlength=exact.numel()).double()
    expected = exact.reshape(-1) * sequences.shape[0]
    support = expected > 1e-9
    if counts[~support].sum() > 0:
        return 0.0
    stat = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def small_model():
    """A 24-token Llama, its exits at layers 0 and 1, a prompt and the exact distribution of its continuations."""
    torch.manual_seed(31)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)).eval()
    model = gated(adaexit.wrap(lm, exits=["model.layers.0", "model.layers.1"]), seed=32)  # for draft_threshold
    prompt = torch.tensor([5, 9, 3, 17, 11])
    exact = exact_distribution(model, prompt, NEW, Sampler(True, **SPEC_WARP))
    return model, prompt, exact


@pytest.fixture(scope="module")
def small():
    return small_model()


@pytest.mark.parametrize("strategy, options", [
    ("full", {}),
    ("self_speculative", {"draft_exit": 0, "num_draft": 3}),
    ("self_speculative", {"draft_exit": 1, "num_draft": 2}),
    ("self_speculative", {"draft_exit": 0, "num_draft": 3, "draft_threshold": 0.5}),
], ids=["full", "spec-exit0-3", "spec-exit1-2", "spec-threshold"])
def test_sampled_sequences_follow_the_full_models_distribution(small, strategy, options):
    model, prompt, exact = small
    assert (exact > 1e-9).sum() == 4**NEW
    ids = prompt.repeat(ROWS, 1)
    generator = torch.Generator().manual_seed(0)
    out, info = decode(model, ids, None, NEW, NEVER, strategy, do_sample=True, generator=generator, **SPEC_WARP,
                       **options)
    p_value = chi_square_p_value(out[:, prompt.shape[0] :], exact)
    assert p_value > 1e-3, p_value
    if strategy == "self_speculative":  # at the first verify step, some rows rejected their first draft, some not
        first = [row[0] for row in info.acceptance]
        assert min(first) == 0 and max(first) >= 1


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keyword, value", [
    ("do_sample", 1), ("temperature", 0), ("temperature", -1.0), ("temperature", float("nan")),
    ("temperature", True), ("top_k", 0), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("generator", 3),
])
def test_bad_sampling_keywords_are_refused(keyword, value):
    model = adaexit.wrap(tiny_lm(), exits=["model.layers.1"])
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=keyword):
        adaexit.generate(model, ids, mask, max_new_tokens=2, **{"do_sample": True, keyword: value})


@pytest.mark.parametrize("keyword, value", [("temperature", 0.5), ("top_k", 3), ("top_p", 0.9),
                                            ("generator", torch.Generator())])
def test_sampling_keywords_without_do_sample_are_refused(keyword, value):
    model = adaexit.wrap(tiny_lm(), exits=["model.layers.1"])
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match=f"{keyword} applies to sampling only: pass do_sample=True"):
        adaexit.generate(model, ids, mask, max_new_tokens=2, **{keyword: value})
