"""Decoder LLMs (adaexit.decoding): batched greedy decoding with per-row state on tiny random Llama models.

The lossless strategies must equal Hugging Face's own greedy ``generate`` token for token (left-padded prompts
of mixed lengths, EOS in the middle of the batch, padding after it); a row's output must not depend on the
batch it runs in; a never-exit early exit must equal ``"full"``; a row that exits early must leave a whole
cache behind. Models are fp32 on CPU, a few thousand parameters each.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import adaexit
from adaexit.decoding import RowCache
from adaexit.decoding.strategies import Run, early_exit

VOCAB, PAD = 61, 0
NUM_LAYERS = 4


def tiny_lm(seed: int = 0, layers: int = NUM_LAYERS, kind: str = "llama"):
    torch.manual_seed(seed)
    args = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**args)).eval()
    return LlamaForCausalLM(LlamaConfig(**args)).eval()


def prompts(batch: int, seed: int = 1, longest: int = 9):
    """Left-padded prompts of mixed lengths (the first row the longest)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, longest), generator=g)
    lengths = [longest] + torch.randint(1, longest + 1, (batch - 1,), generator=g).tolist()
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, longest - n :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def hf_greedy(lm, ids, mask, new, eos):
    """Hugging Face greedy; ``eos=None`` leaves the argument out (the generation config's EOS applies, as in
    ``adaexit.generate``)."""
    kwargs = {} if eos is None else {"eos_token_id": eos}
    return lm.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD, **kwargs)


def mid_batch_eos(lm, ids, mask, new):
    """An EOS id that ends some row in the middle of generation (a token row 0 greedily emits at step 2)."""
    free = hf_greedy(lm, ids, mask, new, eos=None)
    return int(free[0, ids.shape[1] + 2])


def decode(model, ids, mask, new, eos, strategy="full", **options):
    return adaexit.generate(model, ids, mask, max_new_tokens=new, strategy=strategy, eos_token_id=eos,
                            pad_token_id=PAD, return_info=True, **options)


LOSSLESS = [
    ("full", {}),
    ("self_speculative", {"draft_exit": 0, "num_draft": 1}),
    ("self_speculative", {"draft_exit": 0, "num_draft": 3}),
    ("self_speculative", {"draft_exit": 1, "num_draft": 5}),
]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("strategy, options", LOSSLESS, ids=["full", "spec-1", "spec-3", "spec-5-deep"])
def test_lossless_strategies_equal_hugging_face_greedy(batch, strategy, options):
    lm = tiny_lm()
    model = adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"])
    ids, mask = prompts(batch)
    new = 14
    eos = mid_batch_eos(lm, ids, mask, new)
    expected = hf_greedy(lm, ids, mask, new, eos)
    if batch > 1:  # the case must be real: some row stops early and is padded after its EOS
        assert (expected[:, -1] == PAD).any() and (expected[:, -1] != PAD).any()
    out, info = decode(model, ids, mask, new, eos, strategy, **options)
    assert out.shape == expected.shape
    for r in range(batch):
        assert out[r].tolist() == expected[r].tolist(), f"row {r}"
    assert len(info.new_tokens) == batch and max(info.new_tokens) == expected.shape[1] - ids.shape[1]
    if strategy == "self_speculative":
        assert all(len(a) >= 1 for a in info.acceptance)
        assert info.host_syncs <= info.steps + 2 * batch + 1


def test_qwen2_full_and_speculative_equal_hugging_face():
    lm = tiny_lm(seed=3, kind="qwen2")
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(3, seed=4)
    expected = hf_greedy(lm, ids, mask, 10, eos=None)
    for strategy, options in LOSSLESS[:3]:
        assert torch.equal(decode(model, ids, mask, 10, None, strategy, **options)[0], expected), strategy


def test_rows_stop_drafting_on_their_own_gate_and_stay_exact():
    """``draft_threshold``: each row stops drafting after a draft its gate doubts; rows draft different
    numbers of tokens in one verify pass, and the result is still HF greedy."""
    lm = tiny_lm(seed=18)
    model = gated(adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"]), seed=19)
    ids, mask = prompts(8, seed=20)
    eos = mid_batch_eos(lm, ids, mask, 14)
    expected = hf_greedy(lm, ids, mask, 14, eos)
    for draft_exit in (0, 1):
        out, info = decode(model, ids, mask, 14, eos, "self_speculative", draft_exit=draft_exit, num_draft=4,
                           draft_threshold=0.5)
        assert torch.equal(out, expected), draft_exit
        always = decode(model, ids, mask, 14, eos, "self_speculative", draft_exit=draft_exit, num_draft=4)[1]
        assert info.mean_layers_per_token != always.mean_layers_per_token  # some rows really stopped early


def identity_after(lm, k: int):
    """Zero the residual writes of the layers after ``k``: they become identities, so exit ``k`` agrees with
    the last layer everywhere (every draft is accepted), while their attention still reads the cache."""
    with torch.no_grad():
        for layer in lm.model.layers[k + 1 :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return lm


def test_speculation_accepts_every_draft_when_the_exit_is_perfect():
    lm = identity_after(tiny_lm(seed=5), 1)
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(4, seed=6)
    never = VOCAB + 1  # an EOS no row emits: every row runs the whole budget
    expected = hf_greedy(lm, ids, mask, 13, eos=never)
    out, info = decode(model, ids, mask, 13, never, "self_speculative", num_draft=4)
    assert torch.equal(out, expected)
    # 12 tokens after the first: 4 drafts + 1 per verify step, the last step's drafts cut by the budget to 1
    assert info.acceptance == [[4, 4, 1]] * 4 and info.steps == 3
    full_info = decode(model, ids, mask, 13, never)[1]
    assert full_info.mean_layers_per_token == NUM_LAYERS
    assert info.mean_layers_per_token < full_info.mean_layers_per_token


def gated(model, threshold=0.5, bias=0.0, seed=7):
    """Random gates: on a random model they fire for some rows and tokens and not for others."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates:
            gate.weight.normal_(0, 1.0)
            gate.bias.fill_(bias)
    model.set_policy(adaexit.ConfidencePolicy("maxprob", [threshold] * len(model.exit_layers)))
    return model


@pytest.mark.parametrize("strategy, options", [
    ("full", {}),
    ("self_speculative", {"num_draft": 3}),
    ("self_speculative", {"num_draft": 3, "draft_threshold": 0.5}),
    ("early_exit", {}),
    ("early_exit", {"fill": "recompute"}),
    ("early_exit", {"fill": "recompute", "max_pending": 1}),
])
def test_a_rows_output_does_not_depend_on_its_batch(strategy, options):
    lm = tiny_lm(seed=8)
    model = gated(adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"]))
    ids, mask = prompts(5, seed=9)
    eos = mid_batch_eos(lm, ids, mask, 12)
    together, info = decode(model, ids, mask, 12, eos, strategy, **options)
    if strategy == "early_exit":
        assert info.exit_counts[0] > 0 and info.exit_counts[-1] > 0  # the rows really go separate ways
    for r in range(5):
        n = int(mask[r].sum())
        alone = decode(model, ids[r : r + 1, -n:], None, 12, eos, strategy, **options)[0][0]
        row = together[r, ids.shape[1] - n :]
        assert row[: alone.shape[0]].tolist() == alone.tolist(), f"row {r}"
        assert (row[alone.shape[0] :] == PAD).all()


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("fill", ["propagate", "recompute"])
def test_never_exit_early_exit_equals_full(per_row, fill):
    lm = tiny_lm(seed=10)
    model = adaexit.wrap(lm, exits=["model.layers.1"])
    ids, mask = prompts(6, seed=11)
    eos = mid_batch_eos(lm, ids, mask, 12)
    out, info = decode(model, ids, mask, 12, eos, "early_exit", per_row=per_row, fill=fill)
    assert torch.equal(out, decode(model, ids, mask, 12, eos)[0])
    assert info.exit_counts[0] == 0 and info.mean_layers_per_token == NUM_LAYERS


def test_every_row_leaving_at_the_first_exit_is_the_truncated_model():
    lm = tiny_lm(seed=12)
    model = gated(adaexit.wrap(lm, exits=["model.layers.1"]), bias=30.0)  # every gate fires
    ids, mask = prompts(4, seed=13)
    truncated = LlamaForCausalLM(LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": 2})).eval()
    truncated.load_state_dict(lm.state_dict(), strict=False)
    # the prompt runs the whole model (its first token is the model's own), every later token exits
    never = VOCAB + 1
    first = hf_greedy(lm, ids, mask, 1, eos=never)
    expected = hf_greedy(truncated, first, torch.cat([mask, torch.ones_like(mask[:, :1])], 1), 9, eos=never)
    for per_row in (True, False):
        out, info = decode(model, ids, mask, 10, never, "early_exit", per_row=per_row)
        assert torch.equal(out, expected)
        assert info.exit_counts == [4 * 9, 0] and info.mean_layers_per_token == 2


def test_an_exited_rows_cache_is_whole():
    """Layers up to the exit hold exactly the K/V a full forward of the final sequence gives; the skipped
    layers hold state-propagated K/V at every slot a token exited (no zero holes)."""
    lm = tiny_lm(seed=14)
    model = gated(adaexit.wrap(lm, exits=["model.layers.1"]))
    ids, mask = prompts(3, seed=15)
    new = 10
    padding = (mask == 0).sum(1)
    cache = RowCache(NUM_LAYERS, 3, model.num_kv_heads, ids.shape[1] + new + 1, model.head_dim, padding,
                     ids.shape[1], dtype=torch.float32, device=torch.device("cpu"))
    run = Run(model, cache, ids[:, -1], new, [], PAD, 1, keep_finished=True)
    with torch.no_grad():
        first = run.prefill(ids)
        run.emit(first[:, None], torch.ones_like(first), torch.zeros_like(first))
        early_exit(run)
    assert run.exit_counts[0] > 0 and run.exit_counts[1] > 0
    for r in range(3):
        keys, values = run.finished_caches[r]
        pad = int(padding[r])
        tokens = torch.cat([ids[r, pad:], run.out[r, : new - 1]])  # the last token is never fed back
        with torch.no_grad():
            ref = lm(tokens[None], use_cache=True).cache
        assert keys[0].shape[1] == pad + tokens.shape[0]
        for layer in range(NUM_LAYERS):
            k, v = keys[layer][:, pad:], values[layer][:, pad:]
            assert k.abs().sum(-1).gt(0).all() and v.abs().sum(-1).gt(0).all(), f"hole at layer {layer}"
            if layer <= 1:
                torch.testing.assert_close(k, ref.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v, ref.layers[layer].values[0], atol=1e-5, rtol=1e-5)
        # the prompt went through every layer: its deep K/V are the model's own
        p = int(mask[r].sum())
        torch.testing.assert_close(keys[-1][:, pad : pad + p], ref.layers[-1].keys[0][:, :p], atol=1e-5, rtol=1e-5)


def uncached_early_exit(model, tokens, new, eos, max_pending):
    """Reference for ``fill="recompute"``: early exit on one unpadded row where every step runs the model
    afresh on the whole sequence (exact hidden states, no cache), with the same cap on pending tokens."""
    lm, pending, out = model.lm, 0, []
    first = lm(tokens[None]).logits[0, -1].argmax()
    tokens, out = torch.cat([tokens, first[None]]), [int(first)]
    while len(out) < new and out[-1] not in eos:
        states = lm(tokens[None], output_hidden_states=True).hidden_states  # [e]: the output of layer e - 1
        for e, k in enumerate(model.exit_layers):
            h = states[k + 1][:, -1]
            if pending < max_pending and model.gate_score(e, h, states[k][:, -1])[0] >= model.thresholds[e]:
                token, pending = model.exit_logits(e, h)[0].argmax(), pending + 1
                break
        else:
            token, pending = lm(tokens[None]).logits[0, -1].argmax(), 0
        tokens, out = torch.cat([tokens, token[None]]), out + [int(token)]
    return out


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("max_pending", [1, 3])
def test_recompute_decodes_as_the_uncached_model_would(batch, max_pending):
    """With exact K/V, every gate reads the hidden state the model computes without a cache: the tokens are
    the uncached reference's, row by row, for mixed prompt lengths and an EOS in the middle of the batch."""
    lm = tiny_lm(seed=21)
    model = gated(adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"]), seed=22)
    ids, mask = prompts(batch, seed=23)
    new = 12
    eos = mid_batch_eos(lm, ids, mask, new)
    out, info = decode(model, ids, mask, new, eos, "early_exit", fill="recompute", max_pending=max_pending)
    assert info.exit_counts[0] > 0 and info.exit_counts[1] > 0 and info.exit_counts[-1] > 0
    propagated = decode(model, ids, mask, new, eos, "early_exit")[0]
    differs = False
    with torch.no_grad():
        for r in range(batch):
            n = int(mask[r].sum())
            expected = uncached_early_exit(model, ids[r, -n:], new, [eos], max_pending)
            row = out[r, ids.shape[1] :].tolist()
            assert row[: len(expected)] == expected, f"row {r}"
            assert all(t == PAD for t in row[len(expected) :]) and info.new_tokens[r] == len(expected)
            differs |= propagated[r, ids.shape[1] :].tolist()[: len(expected)] != expected
    if batch == 8:
        assert differs  # propagation's approximate K/V change some row's tokens: the reference discriminates
    if batch > 1:
        assert (out[:, -1] == PAD).any()  # some row stopped at the EOS


def test_saturation_gates_read_the_states_around_the_exit_layer():
    """``gate="saturation"`` (CALM): the cosine between the states after and before the exit's layer. The
    strategies must hand it the right states: decoding equals the uncached reference, whose states come from
    Hugging Face's own forward."""
    lm = tiny_lm(seed=24)
    model = adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"], gate="saturation")
    ids, mask = prompts(3, seed=25)
    with torch.no_grad():  # thresholds from the scores over the prompts' positions: some fire, some not
        states = lm(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        real = mask.bool()
        scores = [model.gate_score(e, states[k + 1][real], states[k][real]) for e, k in enumerate(model.exit_layers)]
    thresholds = [float(scores[0].max()), float(scores[1].median())]
    model.set_policy(adaexit.ConfidencePolicy("maxprob", thresholds))
    eos = mid_batch_eos(lm, ids, mask, 10)
    out, info = decode(model, ids, mask, 10, eos, "early_exit", fill="recompute", max_pending=2)
    assert all(count > 0 for count in info.exit_counts)  # both gates fire for some tokens, not for others
    with torch.no_grad():
        for r in range(3):
            n = int(mask[r].sum())
            expected = uncached_early_exit(model, ids[r, -n:], 10, [eos], 2)
            assert out[r, ids.shape[1] :].tolist()[: len(expected)] == expected, f"row {r}"
    spec = decode(model, ids, mask, 10, eos, "self_speculative", num_draft=3, draft_threshold=thresholds[0])[0]
    assert torch.equal(spec, hf_greedy(lm, ids, mask, 10, eos))  # the draft gate reads it too, still lossless


def test_saturation_scores_lie_in_0_1_and_fire_for_an_unchanged_state():
    lm = tiny_lm(seed=26)
    with torch.no_grad():  # layer 1 adds nothing: the state after it is the state before it
        lm.model.layers[1].self_attn.o_proj.weight.zero_()
        lm.model.layers[1].mlp.down_proj.weight.zero_()
    model = adaexit.wrap(lm, exits=["model.layers.1"], gate="saturation",
                         policy=adaexit.ConfidencePolicy("maxprob", [0.999]))
    h = torch.randn(50, 32)
    scores = model.gate_score(0, h, torch.randn(50, 32))
    assert ((scores >= 0) & (scores <= 1)).all() and (scores > 0).any() and (scores < 1).all()
    torch.testing.assert_close(model.gate_score(0, h, 3 * h), torch.ones(50))
    assert (model.gate_score(0, h, -h) == 0).all()
    # every token leaves at the exit: the model without its identity layer 1 and the layers after
    ids, mask = prompts(3, seed=27)
    never = VOCAB + 1
    truncated = LlamaForCausalLM(LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": 2})).eval()
    truncated.load_state_dict(lm.state_dict(), strict=False)
    first = hf_greedy(lm, ids, mask, 1, eos=never)
    expected = hf_greedy(truncated, first, torch.cat([mask, torch.ones_like(mask[:, :1])], 1), 7, eos=never)
    out, info = decode(model, ids, mask, 8, never, "early_exit")
    assert torch.equal(out, expected) and info.exit_counts == [3 * 7, 0]


def test_bad_gates_are_refused():
    with pytest.raises(ValueError, match="gate must be one of 'learned', 'saturation', got 'cosine'"):
        adaexit.wrap(tiny_lm(), exits=["model.layers.1"], gate="cosine")
    model = adaexit.wrap(tiny_lm(), exits=["model.layers.1"], gate="saturation")
    with pytest.raises(ValueError, match="gate='saturation' needs before="):
        model.gate_score(0, torch.randn(2, 32))
    with pytest.raises(ValueError, match="gate= is not supported for torch.fx-traced models"):
        adaexit.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), exits=["1"],
                     gate="saturation")


@pytest.mark.parametrize("eos_mid_batch", [False, True])
def test_recompute_leaves_the_full_models_cache(eos_mid_batch):
    """Once a finishing row's pending tokens are flushed, every layer of its cache holds the K/V the full
    model computes for the same tokens (state propagation only approximates the skipped layers')."""
    lm = tiny_lm(seed=14)
    model = gated(adaexit.wrap(lm, exits=["model.layers.0", "model.layers.2"]), seed=7)
    ids, mask = prompts(3, seed=15)
    new = 10
    eos = [mid_batch_eos(lm, ids, mask, new)] if eos_mid_batch else []
    padding = (mask == 0).sum(1)
    cache = RowCache(NUM_LAYERS, 3, model.num_kv_heads, ids.shape[1] + new + 5, model.head_dim, padding,
                     ids.shape[1], dtype=torch.float32, device=torch.device("cpu"))
    run = Run(model, cache, ids[:, -1], new, eos, PAD, 5, keep_finished=True)
    with torch.no_grad():
        first = run.prefill(ids)
        run.emit(first[:, None], torch.ones_like(first), torch.zeros_like(first))
        early_exit(run, fill="recompute", max_pending=3)
    assert run.exit_counts[0] > 0 and run.exit_counts[1] > 0 and run.exit_counts[2] > 0
    if eos_mid_batch:
        assert min(run.final_counts) < new
    for r in range(3):
        keys, values = run.finished_caches[r]
        pad = int(padding[r])
        tokens = torch.cat([ids[r, pad:], run.out[r, : run.final_counts[r] - 1]])  # the last is never fed back
        with torch.no_grad():
            ref = lm(tokens[None], use_cache=True).cache
        assert keys[0].shape[1] == pad + tokens.shape[0]
        for layer in range(NUM_LAYERS):
            torch.testing.assert_close(keys[layer][:, pad:], ref.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[layer][:, pad:], ref.layers[layer].values[0], atol=1e-5, rtol=1e-5)


def test_recompute_counts_every_layer_it_runs():
    """One exit, every gate firing: tokens leave ``max_pending`` times, then one runs the whole model with its
    pending ones as a block: each token costs the whole model's layers once (recomputed positions counted)."""
    lm = tiny_lm(seed=12)
    model = gated(adaexit.wrap(lm, exits=["model.layers.1"]), bias=30.0)  # every gate fires
    ids, mask = prompts(4, seed=13)
    never = VOCAB + 1
    _, info = decode(model, ids, mask, 9, never, "early_exit", fill="recompute", max_pending=3)
    # 8 tokens after the first per row: exit, exit, exit, full (a block of 4) twice
    assert info.exit_counts == [4 * 6, 4 * 2] and info.steps == 8
    assert info.mean_layers_per_token == NUM_LAYERS
    assert decode(model, ids, mask, 9, never, "early_exit")[1].mean_layers_per_token == 2


@pytest.mark.interpreter
def test_the_kernels_path_through_the_interpreter(triton_backend):
    """Finished rows leave and early-exit rows are compacted by the Triton kernels (interpreted on CPU)."""
    lm = tiny_lm(seed=16)
    model = gated(adaexit.wrap(lm, exits=["model.layers.1"]))
    ids, mask = prompts(3, seed=17)
    eos = mid_batch_eos(lm, ids, mask, 8)
    expected = hf_greedy(lm, ids, mask, 8, eos)
    assert torch.equal(decode(model, ids, mask, 8, eos, "self_speculative", num_draft=2)[0], expected)
    assert torch.equal(decode(model, ids, mask, 8, eos, "self_speculative", num_draft=3, draft_threshold=0.5)[0],
                       expected)
    for fill in ("propagate", "recompute"):
        out, info = decode(model, ids, mask, 8, eos, "early_exit", fill=fill)
        assert info.exit_counts[0] > 0
        for r in range(3):
            n = int(mask[r].sum())
            alone = decode(model, ids[r : r + 1, -n:], None, 8, eos, "early_exit", fill=fill)[0][0]
            assert out[r, ids.shape[1] - n :][: alone.shape[0]].tolist() == alone.tolist(), (fill, r)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapped():
    return adaexit.wrap(tiny_lm(), exits=["model.layers.1"])


def test_right_padding_is_refused(wrapped):
    ids, mask = prompts(3)
    mask[1] = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="attention_mask: row 1 .*right padding"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=3)


def test_prompts_past_the_maximum_positions_are_refused(wrapped):
    ids = torch.randint(3, VOCAB, (2, 60))
    with pytest.raises(ValueError, match="input_ids.*max_position_embeddings=64"):
        adaexit.generate(wrapped, ids, max_new_tokens=5)


@pytest.mark.parametrize("value", [0, -1, 2.0, None])
def test_max_new_tokens_below_one_is_refused(wrapped, value):
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=value)


@pytest.mark.parametrize("exit_name", ["model.norm", "lm_head", "model.layers.9", "model.layers.3", "layers.1"])
def test_an_exit_that_is_not_a_decoder_layer_is_refused(exit_name):
    with pytest.raises(ValueError, match="exits"):
        adaexit.wrap(tiny_lm(), exits=[exit_name])


def test_unsupported_models_and_keywords_are_refused(wrapped):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2)).eval()
    with pytest.raises(ValueError, match="model: GPT2LMHeadModel is not supported"):
        adaexit.wrap(gpt2, exits=["transformer.h.0"])
    with pytest.raises(ValueError, match="trim= is not supported for causal LMs"):
        adaexit.wrap(tiny_lm(), exits=["model.layers.1"], trim=True)
    with pytest.raises(ValueError, match="unknown keyword head="):
        adaexit.wrap(tiny_lm(), exits=["model.layers.1"], head=None)
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match="model: wrap LlamaForCausalLM first"):
        adaexit.generate(tiny_lm(), ids, mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="num_drafts"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="self_speculative", num_drafts=2)
    with pytest.raises(ValueError, match="draft_threshold"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="self_speculative", draft_threshold=2)
    with pytest.raises(ValueError, match="draft_exit"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="self_speculative", draft_exit=1)
    with pytest.raises(ValueError, match="strategy"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="beam")
    with pytest.raises(ValueError, match="fill must be 'propagate' or 'recompute'"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="early_exit", fill="exact")
    for cap in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
            adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="early_exit", fill="recompute",
                             max_pending=cap)
    with pytest.raises(ValueError, match="max_pending applies to fill='recompute' only"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="early_exit", max_pending=2)
    with pytest.raises(TypeError, match="fill"):
        adaexit.generate(wrapped, ids, mask, max_new_tokens=2, strategy="full", fill="recompute")
    with pytest.raises(ValueError, match="heads"):
        adaexit.wrap(tiny_lm(), exits=["model.layers.1"], heads=[torch.nn.Linear(32, 7)])


def test_trained_style_heads_feed_the_shared_lm_head(wrapped):
    """A head mapping hidden -> hidden replaces the final norm before the shared LM head; -> vocab is logits."""
    lm = tiny_lm()
    norm_head = adaexit.wrap(lm, exits=["model.layers.1"], heads=[lm.model.norm])
    logits_head = adaexit.wrap(lm, exits=["model.layers.1"], heads=[torch.nn.Sequential(lm.model.norm, lm.lm_head)])
    h = torch.randn(3, 32)
    expected = wrapped.exit_logits(0, h)
    torch.testing.assert_close(norm_head.exit_logits(0, h), expected)
    torch.testing.assert_close(logits_head.exit_logits(0, h), expected)
