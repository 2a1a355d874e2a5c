"""Decoding engine speed: Hugging Face greedy vs adaexit ``full`` / ``self_speculative`` / ``early_exit``.

``python -m bench.bench_decode [--quick] [--batches 1,8] [--new-tokens 32] [--layers 30] [--repeats 3]
[--max-pending 4] [--threads N] [--json PATH]``; ``python -m bench.bench_decode --smollm2 [--exit-layer 26]
[--exit-fraction 0.5] [--new-tokens 16] [--prompts 4] [--train-prompts 6] [--repeats 1]``

A random Llama with SmolLM2-135M's shape (width 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152;
``--layers`` decoder layers), fp32 on CPU. Random weights say nothing about exit quality, so the benchmark
gives the model **good exits by construction**: the layers after the draft exit (``--draft-layer``, default a
quarter of the depth) write nothing to the residual stream (``o_proj`` and ``down_proj`` zeroed; they still
run their full compute and attention), so the exit's token always equals the last layer's. That measures what
the engine delivers when the exits allow it:

* ``self_speculative`` accepts every draft; its ideal is the time of the work that must run (measured layer and
  head costs) over the full model's;
* ``early_exit`` with gates firing for every row (the truncated model plus state propagation);
* ``full`` against HF ``generate``: the engine alone, no exits.

``early_exit_recompute`` is ``early_exit`` with ``fill="recompute"`` (deferred recomputation: exact K/V, see
:func:`adaexit.decoding.strategies.early_exit_recompute`); ``agree full`` is its token agreement with ``full``
(1 for a perfect exit). ``--smollm2`` compares the fills where the exit is imperfect: the real SmolLM2-135M
with one exit (shared head, learned gate), token agreement with ``full`` and layers per token.

Interleaved medians (A B C A B C...), ratios only: the machine is shared. ``--quick``: tiny sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adaexit
from adaexit.apps.llm.job import token_agreement
from adaexit.decoding.costs import ideal_speedup, step_costs

from . import apply_threads, comma_list, common_arguments, finish, format_table, interleaved_times, machine, median


def build(layers: int, quick: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    if quick:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def perfect_exit_after(lm: LlamaForCausalLM, k: int) -> None:
    """Layers after ``k`` keep computing but add nothing: exit ``k`` agrees with the last layer everywhere."""
    with torch.no_grad():
        for layer in lm.model.layers[k + 1 :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def run_bench(args, device: torch.device | str = "cpu") -> dict:
    """The table of :func:`main` (``args``: its options) with the model and prompts on ``device`` (the GPU
    kit's decoding section passes CUDA; timings then sync the device)."""
    device = torch.device(device)
    layers = 4 if args.quick else args.layers
    k = args.draft_layer if args.draft_layer is not None else max(0, layers // 4 - 1)
    lm = build(layers, args.quick).to(device)
    perfect_exit_after(lm, k)
    model = adaexit.wrap(lm, exits=[f"model.layers.{k}"])
    with torch.no_grad():
        model.gates[0].bias.fill_(30.0)  # every gate fires (the exit is perfect)
    model.set_policy(adaexit.ConfidencePolicy("maxprob", [0.5]))
    never = lm.config.vocab_size + 1  # no EOS: every row runs the whole budget
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, lm.config.vocab_size, (batch, args.prompt_len), generator=g)
        mask = torch.ones_like(ids)
        mask[1::2, : args.prompt_len // 2] = 0  # every other row half as long (left padding)
        ids, mask = ids.masked_fill(mask == 0, 0).to(device), mask.to(device)
        common = dict(max_new_tokens=args.new_tokens, eos_token_id=never, pad_token_id=0)
        ref = lm.generate(ids, attention_mask=mask, do_sample=False, **common)
        outs, infos = {}, {}

        def ours(name, strategy, **options):
            def call():
                outs[name], infos[name] = adaexit.generate(model, ids, mask, strategy=strategy, return_info=True,
                                                           **common, **options)
            return call

        fns = {
            "hf_generate": lambda: lm.generate(ids, attention_mask=mask, do_sample=False, **common),
            "full": ours("full", "full"),
            "self_speculative": ours("self_speculative", "self_speculative", draft_exit=0, num_draft=args.num_draft),
            "early_exit": ours("early_exit", "early_exit"),
            "early_exit_recompute": ours("early_exit_recompute", "early_exit", fill="recompute",
                                         max_pending=args.max_pending),
        }
        with torch.no_grad():
            times = interleaved_times(fns, repeats=args.repeats, warmup=1, device=device)
            costs = step_costs(model, batch, args.prompt_len + args.new_tokens // 2, args.num_draft + 1)
        hf = median(times["hf_generate"])
        for name in fns:
            t = median(times[name])
            row = dict(strategy=name, batch=batch, ms=t, tokens_per_s=batch * args.new_tokens / (t / 1000),
                       speedup_vs_hf=hf / t)
            if name != "hf_generate":
                info = infos[name]
                row.update(exact=bool(torch.equal(outs[name], ref)), layers_per_token=info.mean_layers_per_token,
                           agree_full=token_agreement(outs[name], outs["full"], args.prompt_len, never))
                if name != "early_exit_recompute":  # its blocks cost less per position than layers/token says
                    row["ideal"] = ideal_speedup(name, info, model, costs, k, args.num_draft) if name != "full" else 1.0
                    row["measured_over_ideal_vs_full"] = (median(times["full"]) / t) / row["ideal"]
            rows.append(row)
    return {"rows": rows, "machine": machine(), "device": str(device), "layers": layers, "draft_layer": k, "num_draft": args.num_draft,
            "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}


def format_report(report: dict) -> str:
    if "smollm2" in report:
        return format_smollm2(report)
    cols = [("strategy", "strategy", ""), ("batch", "batch", "d"), ("ms", "ms", ".0f"),
            ("tokens_per_s", "tok/s", ".1f"), ("speedup_vs_hf", "x HF", ".2f"), ("exact", "exact", ""),
            ("agree_full", "agree full", ".3f"),
            ("layers_per_token", "layers/tok", ".1f"), ("ideal", "ideal vs full", ".2f"),
            ("measured_over_ideal_vs_full", "measured/ideal", ".2f")]
    head = (f"random Llama, {report['layers']} layers, perfect exit after layer {report['draft_layer']}, "
            f"{report['num_draft']} drafts, {report['new_tokens']} new tokens")
    return head + "\n" + format_table(report["rows"], cols)


# package descriptions (as the LLM job's prompts): the gate trains on the first, decoding runs the rest
DESCRIPTIONS = [
    "GNU C compiler", "Vi IMproved - enhanced vi editor", "command-line JSON processor",
    "secure shell (SSH) client, for secure access to remote machines", "fast, scalable, distributed revision control system",
    "GNU Image Manipulation Program", "a terminal multiplexer", "Python interface to the PostgreSQL database",
    "utility for sorting and counting the lines of text files", "audio player with a text interface",
    "tools for managing Linux kernel modules", "simple daemon to keep the system clock in sync over the network",
    "library for reading and writing PNG image files", "full-text search engine for personal documents",
]


def run_smollm2(args) -> dict:
    """An imperfect exit: SmolLM2-135M-Instruct with one exit (``--exit-layer``, the model's own shared head)
    and a learned gate (logistic regression on the model's own greedy continuations of the first
    ``--train-prompts`` descriptions), its threshold the score quantile that exits ``--exit-fraction`` of
    those positions. Decoding the other descriptions: ``full`` vs ``early_exit`` with ``fill="propagate"`` and
    ``fill="recompute"``: token agreement with ``full``, layers per token, tokens/s (interleaved medians)."""
    from adaexit.apps.llm.exits import continuations, exit_tokens, train_gate
    from adaexit.apps.llm.job import default_cache
    from adaexit.apps.llm.smollm2 import chat_prompts, load_smollm2

    lm, tokenizer = load_smollm2(default_cache())
    model = adaexit.wrap(lm, exits=[f"model.layers.{args.exit_layer}"])
    train, test = DESCRIPTIONS[: args.train_prompts], DESCRIPTIONS[args.train_prompts :][: args.prompts]
    with torch.no_grad():
        states, targets = continuations(model, tokenizer, chat_prompts(tokenizer, train), args.new_tokens, batch_size=8)
    agree = exit_tokens(model, 0, states[0]) == targets
    torch.manual_seed(0)  # the gate's initialisation: the same gate, threshold and decoding every run
    train_gate(model, 0, states[0], agree)
    with torch.no_grad():
        threshold = float(model.gate_score(0, states[0]).quantile(1 - args.exit_fraction))
    model.set_policy(adaexit.ConfidencePolicy("maxprob", [threshold]))
    enc = tokenizer(chat_prompts(tokenizer, test), return_tensors="pt", padding=True)
    pad, p = lm.generation_config.pad_token_id, enc.input_ids.shape[1]
    outs, infos = {}, {}

    def ours(name, strategy, **options):
        def call():
            outs[name], infos[name] = adaexit.generate(model, enc.input_ids, enc.attention_mask, strategy=strategy,
                                                       max_new_tokens=args.new_tokens, return_info=True, **options)
        return call

    fns = {"full": ours("full", "full"), "propagate": ours("propagate", "early_exit"),
           "recompute": ours("recompute", "early_exit", fill="recompute", max_pending=args.max_pending)}
    with torch.no_grad():
        times = interleaved_times(fns, repeats=args.repeats, warmup=min(1, args.repeats - 1))  # a slow model: warm
        # up only when repeating
    full_t = median(times["full"])
    rows = []
    for name in fns:
        info, t = infos[name], median(times[name])
        new = sum(info.new_tokens)
        rows.append(dict(fill=name, ms=t, tokens_per_s=new / (t / 1000), speedup_vs_full=full_t / t,
                         agree_full=token_agreement(outs[name], outs["full"], p, pad),
                         same_prefix=same_prefix(outs[name], outs["full"], p),
                         layers_per_token=info.mean_layers_per_token,
                         exited=info.exit_counts[0] / max(1, sum(info.exit_counts))))
    return {"smollm2": True, "rows": rows, "machine": machine(), "exit_layer": args.exit_layer,
            "threshold": threshold, "gate_train_positions": int(targets.numel()),
            "exit_agreement_train": float(agree.float().mean()), "prompts": len(test), "new_tokens": args.new_tokens,
            "max_pending": args.max_pending}


def same_prefix(out: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> float:
    """Mean tokens per row that ``out`` generates before its first difference from ``ref`` (greedy decoding
    goes its own way after one: position-wise agreement then mostly counts chance matches)."""
    a, b = out[:, prompt_len:], ref[:, prompt_len:]
    width = min(a.shape[1], b.shape[1])
    return float((a[:, :width] == b[:, :width]).long().cumprod(1).sum(1).float().mean())


def format_smollm2(report: dict) -> str:
    cols = [("fill", "early_exit fill", ""), ("ms", "ms", ".0f"), ("tokens_per_s", "tok/s", ".1f"),
            ("speedup_vs_full", "x full", ".2f"), ("agree_full", "agree full", ".3f"),
            ("same_prefix", "same prefix", ".1f"),
            ("layers_per_token", "layers/tok", ".2f"), ("exited", "exited", ".2f")]
    head = (f"SmolLM2-135M, exit after layer {report['exit_layer']} (shared head; it agrees with the last layer at "
            f"{report['exit_agreement_train']:.2f} of {report['gate_train_positions']} training positions), "
            f"learned gate >= {report['threshold']:.3f}, {report['prompts']} prompts x {report['new_tokens']} new "
            f"tokens, max_pending {report['max_pending']}")
    return head + "\n" + format_table(report["rows"], cols)


def parse_args(argv=None) -> argparse.Namespace:
    """:func:`main`'s options (the GPU kit's decoding section reads them too)."""
    parser = common_arguments(argparse.ArgumentParser(prog="bench.bench_decode", description=__doc__.split("\n")[0]))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--draft-layer", type=int, default=None)
    parser.add_argument("--num-draft", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-pending", type=int, default=4, help="early_exit fill='recompute': pending tokens per row")
    parser.add_argument("--smollm2", action="store_true",
                        help="instead: propagate vs recompute on SmolLM2-135M with an imperfect exit")
    parser.add_argument("--exit-layer", type=int, default=26, help="--smollm2: the exit's decoder layer")
    parser.add_argument("--exit-fraction", type=float, default=0.5,
                        help="--smollm2: the share of training positions whose gate fires")
    parser.add_argument("--train-prompts", type=int, default=8, help="--smollm2: descriptions the gate trains on")
    parser.add_argument("--prompts", type=int, default=4, help="--smollm2: descriptions decoded")
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    args.batches = comma_list(parser, args.batches, "--batches")
    if args.max_pending < 1 or not 0 < args.exit_fraction < 1:
        parser.error("--max-pending must be >= 1 and --exit-fraction in (0, 1)")
    if args.quick:
        args.batches, args.new_tokens, args.prompt_len, args.repeats = [1, 3], 8, 8, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return finish(run_smollm2(args) if args.smollm2 else run_bench(args), args, format_report)


if __name__ == "__main__":
    sys.exit(main())
