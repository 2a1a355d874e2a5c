"""Where exits can go: :func:`candidate_exits` (valid cuts with shapes, layouts, FLOPs shares) and
:func:`pick_exits`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from .layouts import CutPoint, _describe_cut, _probe, _token_index
from .liveness import _free_nodes, _inplace_consumer, _live_sets, _validate_cut
from .split import _ancestors
from .tracing import _standard_leaf, _trace


_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten)


def _n_param_modules(m: nn.Module) -> int:
    return sum(1 for s in m.modules() if next(s.parameters(recurse=False), None) is not None)


def _same_kind(a: nn.Module, b: nn.Module) -> bool:
    """Stage peers: the same class with the same kinds of children (ResNet's layer1..4, Swin's features.1/3/5)."""
    return type(a) is type(b) and {type(c) for c in a.children()} == {type(c) for c in b.children()}


def candidate_exits(model: nn.Module, example_input: torch.Tensor, *, level: str = "block",
                    split_large: float | None = None, dedupe: bool = True) -> list[CutPoint]:
    """Where exits can go: valid cut points (module names) in forward order, each with its shape, layout
    and the fraction of the model's FLOPs done before it (measured on ``example_input``: use a realistic
    image size, FLOPs fractions depend on it).

    ``level="block"`` (default) keeps the blocks of the model's main feature container:

    1. start from the root's children that run in forward (a never-called ``ModuleList`` is replaced by its
       items);
    2. while one of them holds at least half of the model's parametrised modules, has at least two children
       that run, and has no peer (a sibling of the same kind with a map or token output: then it is one
       stage among several, like ResNet's ``layer3``), replace it by its children (VGG ``features`` ->
       ``features.N``; ViT ``encoder`` -> ``encoder.layers.encoder_layer_N``);
    3. keep valid cuts whose output is a map or token sequence (>= 3 dims), that are not pass-through
       modules, whose output the next op does not overwrite in place, and that leave some parametrised
       module with a >= 3-dim output after them (this drops the classifier path);
    4. ``dedupe``: of consecutive candidates with no matmul/conv FLOPs between them (conv -> BN -> ReLU ->
       pool) only the last is kept, so heads read post-activation, post-pooling features;
    5. ``split_large=f`` (e.g. 0.25): a block holding more than ``f`` of the FLOPs (ConvNeXt's
       ``features.5``) is preceded by the valid cuts among its own children, repeatedly, so exits can be
       spread evenly.

    ``level="all"``: every valid cut at any depth. This traces through every block (not only the way to
    the exits, as :func:`split_model` does), so the model's blocks must be fx-traceable.
    """
    if level not in ("block", "all"):
        raise ValueError(f"candidate_exits: level must be 'block' or 'all', got {level!r}")
    trace = _trace(model, _standard_leaf)  # fine-grained: every module traced except torch.nn / ops built-ins
    nodes = trace.nodes
    order = {n: i for i, n in enumerate(nodes)}
    node_set, tracer = set(nodes), trace.tracer
    mods = dict(model.named_modules())

    cut_of: dict[str, fx.Node] = {}  # the cut node of every module called once with a tensor output
    for name, calls in tracer.calls.items():
        out = tracer.outputs.get(name)
        if (name and calls == 1 and isinstance(out, fx.Proxy) and out.node in node_set
                and out.node.op != "placeholder"):
            cut_of[name] = out.node
    free = _free_nodes(nodes)
    live = _live_sets(nodes, {order[c] for c in cut_of.values()}, free)
    valid = {q for q, c in cut_of.items() if _validate_cut(q, c, live[order[c]], order) is None}

    first: dict[str, int] = {}  # forward order of modules: the first node created inside each
    for i, n in enumerate(nodes):
        scope = n.target if n.op == "call_module" else n.meta.get("scope", "")
        for a in _ancestors(scope)[1:] + [scope]:
            if a:
                first.setdefault(a, i)

    def called_children(q: str) -> list[str]:
        kids = []
        for k, _ in mods[q].named_children():
            k = f"{q}.{k}" if q else k
            if k in first:
                kids += [k] if tracer.calls.get(k) else called_children(k)
        return sorted(kids, key=first.__getitem__)

    probe = _probe(trace, example_input, flops=True)
    total_flops = probe.flops.get(nodes[-1]) or None

    def rank(q: str) -> int:
        return len(probe.shapes.get(cut_of[q], ())) if q in cut_of else 0

    if level == "all":
        names = sorted(valid, key=lambda q: (order[cut_of[q]], -len(q)))
    else:
        total = max(_n_param_modules(model), 1)
        seq = called_children("")
        while seq:
            shares = [_n_param_modules(mods[q]) / total for q in seq]
            i = max(range(len(seq)), key=shares.__getitem__)
            d = seq[i]
            kids = called_children(d)
            peers = [q for q in seq if q != d and _same_kind(mods[q], mods[d]) and rank(q) >= 3]
            if shares[i] < 0.5 or len(kids) < 2 or peers:
                break
            seq = seq[:i] + kids + seq[i + 1 :]
        last_param = max((j for j, q in enumerate(seq) if _n_param_modules(mods[q]) and rank(q) >= 3), default=-1)
        params_after = [any(_n_param_modules(mods[r]) for r in seq[j + 1 :]) for j in range(len(seq))]

        def usable(q: str) -> bool:
            return (q in valid and rank(q) >= 3 and not isinstance(mods[q], _PASS_THROUGH)
                    and _inplace_consumer(cut_of[q], model) is None)

        names = [q for j, q in enumerate(seq) if usable(q) and j <= last_param and params_after[j]]
        if split_large is not None and total_flops:
            changed = True
            while changed:
                changed, refined, previous = False, [], 0.0
                for q in names:
                    fraction = probe.flops[cut_of[q]] / total_flops
                    kids = [k for k in called_children(q) if usable(k) and cut_of[k] is not cut_of[q]]
                    if fraction - previous > split_large and kids:
                        refined += kids
                        changed = True
                    refined.append(q)
                    previous = fraction
                names = refined
        if dedupe and total_flops:
            f = [probe.flops[cut_of[q]] for q in names]
            names = [q for j, q in enumerate(names) if j + 1 == len(names) or f[j + 1] != f[j]]

    tok = _token_index(nodes)
    out = []
    for q in names:
        cut = CutPoint(name=q)
        _describe_cut(cut, cut_of[q], model, probe, tuple(example_input.shape), tok)
        if total_flops:
            cut.flops_fraction = probe.flops[cut_of[q]] / total_flops
        cut.inplace_consumer = _inplace_consumer(cut_of[q], model)
        out.append(cut)
    return out


def pick_exits(candidates: Sequence[CutPoint], fractions: Sequence[float] = (1 / 3, 2 / 3),
               min_saving: float = 0.05) -> list[str]:
    """The distinct candidates closest to ``fractions`` of the model's FLOPs (of the list's length when
    the FLOPs are unknown), in forward order. Candidates after which less than ``min_saving`` of the FLOPs
    remain are passed over: an exit there saves nothing."""
    use_flops = all(c.flops_fraction is not None for c in candidates)
    if use_flops:
        candidates = [c for c in candidates if c.flops_fraction <= 1 - min_saving]
    if not candidates:
        return []
    pos = [c.flops_fraction if use_flops else (i + 1) / len(candidates) for i, c in enumerate(candidates)]
    chosen: list[int] = []
    for f in fractions:
        rest = [i for i in range(len(candidates)) if i not in chosen]
        if not rest:
            break
        chosen.append(min(rest, key=lambda i: abs(pos[i] - f)))
    return [candidates[i].name for i in sorted(set(chosen))]
