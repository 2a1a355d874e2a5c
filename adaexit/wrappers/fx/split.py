"""Cutting a model into stages at named modules (:func:`split_model`, :class:`Split`)."""

from __future__ import annotations

import difflib
import operator
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from .layouts import CutPoint, _describe_cut, _probe, _token_index
from .liveness import _free_nodes, _inplace_consumer, _live_sets, _validate_cut
from .tracing import _is_impure, _trace, _Trace


class Split:
    """A model cut into ``stages`` (one per exit) and a ``tail`` (the model's own path to its output).

    ``tail(stages[-1](... stages[0](x)))`` equals ``model(x)`` bit for bit. Every piece is an
    ``fx.GraphModule`` holding the model's own submodules and parameters (shared, not copied).
    """

    def __init__(self, model, stages, tail, cuts, notes, trace, cut_nodes):
        self.model = model
        self.stages: list[fx.GraphModule] = stages
        self.tail: fx.GraphModule = tail
        self.cuts: list[CutPoint] = cuts
        self.notes: list[str] = notes
        self.output_shape: tuple[int, ...] | None = None  # the model's output, once probed
        self.probed = False
        self._trace, self._cut_nodes = trace, cut_nodes

    @property
    def pieces(self) -> list[fx.GraphModule]:
        return [*self.stages, self.tail]

    def probe(self, example_input: torch.Tensor, what: str = "wrap: {model} failed on example_input") -> None:
        """Shapes, dtypes and layouts of every cut and of the model's output, from one eval-mode run (``what``
        starts the error message if the model fails on it)."""
        probe = _probe(self._trace, example_input, flops=False, what=what)
        nodes = self._trace.nodes
        tok = _token_index(nodes)
        for cut, node in zip(self.cuts, self._cut_nodes):
            _describe_cut(cut, node, self.model, probe, tuple(example_input.shape), tok)
        output = nodes[-1].args[0]
        self.output_shape = probe.shapes.get(output) if isinstance(output, fx.Node) else None
        self.probed = True

    def __call__(self, x: torch.Tensor):
        for piece in self.pieces:
            x = piece(x)
        return x

    def __repr__(self) -> str:
        rows = [f"  stage {k}: -> {c.name} {c.layout or ''} {c.shape or ''}" for k, c in enumerate(self.cuts)]
        return "Split(\n" + "\n".join(rows) + "\n  tail -> output\n)"


def _ancestors(name: str) -> list[str]:
    """``'a.b.c' -> ['', 'a', 'a.b']`` (the root first)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def _check_names(model: nn.Module, exits: Sequence[str]) -> list[str]:
    if isinstance(exits, str):
        raise ValueError(f"wrap: exits must be a list of module names, not the string {exits!r}")
    if not isinstance(exits, Iterable):
        raise ValueError(f"wrap: exits must be a list of module names (dotted paths), got {exits!r}")
    exits = list(exits)
    names = dict(model.named_modules())
    seen = set()
    for e in exits:
        if not isinstance(e, str):
            raise ValueError(f"wrap: exit names must be strings (dotted module paths), got {e!r}")
        if e in seen:
            raise ValueError(f"wrap: exit '{e}' is listed twice")
        seen.add(e)
        if e == "":
            raise ValueError("wrap: '' names the whole model; its output is the last exit already")
        if e not in names:
            close = difflib.get_close_matches(e, [n for n in names if n], n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
            raise ValueError(
                f"wrap: unknown module name '{e}' in {type(model).__name__} (names as model.named_modules() "
                f"gives them){hint}"
            )
    return exits


def _cut_node(trace: _Trace, name: str, graph_nodes: set[fx.Node]) -> fx.Node:
    """The graph node holding the value module ``name`` returned; the error says why there is none."""
    tracer, model = trace.tracer, trace.model
    calls = tracer.calls.get(name, 0)
    if calls == 0:
        mod = model.get_submodule(name)
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            kids = ", ".join(f"'{name}.{k}'" for k, _ in list(mod.named_children())[:3])
            why = f" ({type(mod).__name__} is a container that is never called; name one of its items, e.g. {kids})"
        else:
            why = (" in eval mode (the split follows the eval-mode forward: modules that run only in train mode, "
                   "such as auxiliary classifiers, cannot be exits)")
        raise ValueError(
            f"wrap: module '{name}' is not called by {type(model).__name__}.forward{why}, so no cut can be placed "
            "at its output"
        )
    if calls > 1:
        raise ValueError(
            f"wrap: module '{name}' is called {calls} times in forward; a cut at its output is ambiguous (choose "
            "the enclosing block instead)"
        )
    out = tracer.outputs[name]
    if not isinstance(out, fx.Proxy):
        raise ValueError(
            f"wrap: module '{name}' returns a {type(out).__name__}, not a tensor: exactly one tensor must flow "
            "across a cut"
        )
    node = out.node
    if node.op == "call_module" and node.users and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users
    ):  # a leaf whose result is only ever unpacked: a tuple
        raise ValueError(
            f"wrap: module '{name}' returns a tuple (its output is only unpacked afterwards): exactly one tensor "
            "must flow across a cut"
        )
    if node not in graph_nodes:
        raise ValueError(f"wrap: the output of module '{name}' is not used by the rest of the model")
    if node.op == "placeholder":
        raise ValueError(f"wrap: module '{name}' returns the model input unchanged; nothing to cut")
    return node


def _build_piece(trace: _Trace, segment: list[fx.Node], incoming: fx.Node | None, result: Any,
                 free: set[fx.Node], name: str) -> fx.GraphModule:
    """Copy ``segment`` into a new graph that takes ``incoming`` (the model input when ``None``) and returns
    ``result``; free values it uses are recomputed in it."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if incoming is not None:
        placeholder = g.placeholder("x_" + incoming.name if incoming.name[0].isdigit() else incoming.name)
        placeholder.meta = dict(incoming.meta)
        env[incoming] = placeholder

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n not in free:  # cannot happen after _validate_cut
                raise RuntimeError(f"{name}: value {n.name} crosses a cut")
            env[n] = g.node_copy(n, lookup)
        return env[n]

    for n in segment:
        if n.op == "placeholder":
            env[n] = g.node_copy(n)
        elif n.op != "output" and n not in free:  # free values are copied on first use
            env[n] = g.node_copy(n, lookup)
    g.output(fx.node.map_arg(result, lookup))
    gm = fx.GraphModule(trace.model, g, name)
    if gm.graph.eliminate_dead_code(is_impure_node=_is_impure):  # e.g. unused parts of an unpacked x.shape
        gm.recompile()
    gm.graph.lint()
    return gm


def split_model(model: nn.Module, exits: Sequence[str], example_input: torch.Tensor | None = None) -> Split:
    """Cut ``model`` at the outputs of the modules named in ``exits`` (dotted paths, in forward order).

    Raises ``ValueError`` for unknown names (listing close matches), duplicates, exits out of forward order,
    modules called zero or several times, non-tensor outputs, and cuts across which more than one value
    lives (inside a residual block), naming the module and why. With ``example_input`` (a row or two),
    every cut's shape and layout and the output's shape are probed.
    """
    exits = _check_names(model, exits)
    traced_through = {a for e in exits for a in _ancestors(e)}

    def leaf(m: nn.Module, qualname: str) -> bool:  # maximal leaves: trace only the way to the exits
        return qualname not in traced_through

    trace = _trace(model, leaf)
    nodes = trace.nodes
    order = {n: i for i, n in enumerate(nodes)}
    cut_nodes = [_cut_node(trace, e, set(nodes)) for e in exits]
    for (e1, c1), (e2, c2) in zip(zip(exits, cut_nodes), zip(exits[1:], cut_nodes[1:])):
        if c1 is c2:
            raise ValueError(f"wrap: '{e1}' and '{e2}' return the same value: they cut at the same point")
        if order[c2] < order[c1]:
            ordered = sorted(exits, key=lambda e: order[cut_nodes[exits.index(e)]])
            raise ValueError(
                f"wrap: exits must be listed in forward order: '{e2}' runs before '{e1}'; forward order is {ordered}"
            )
    free = _free_nodes(nodes)
    live = _live_sets(nodes, [order[c] for c in cut_nodes], free)
    for e, c in zip(exits, cut_nodes):
        reason = _validate_cut(e, c, live[order[c]], order)
        if reason:
            raise ValueError(reason)

    output_node = nodes[-1]
    bounds = [-1] + [order[c] for c in cut_nodes]
    stages = [
        _build_piece(trace, nodes[bounds[k] + 1 : bounds[k + 1] + 1], cut_nodes[k - 1] if k else None, c, free,
                     f"Stage{k}")
        for k, c in enumerate(cut_nodes)
    ]
    tail = _build_piece(trace, nodes[bounds[-1] + 1 : -1], cut_nodes[-1], output_node.args[0], free, "Tail")

    cuts = [CutPoint(name=e) for e in exits]
    for cut, node in zip(cuts, cut_nodes):
        cut.inplace_consumer = _inplace_consumer(node, model)
        if cut.inplace_consumer:
            cut.notes.append(f"{cut.inplace_consumer} overwrites this exit's input in place: a head must read it "
                             "before the next stage runs, and must not save it for backward")
    split = Split(model, stages, tail, cuts, _mode_notes(model, traced_through, trace), trace, cut_nodes)
    if example_input is not None:
        split.probe(example_input)
    return split


def _mode_notes(model: nn.Module, traced_through: set[str], eval_trace: _Trace) -> list[str]:
    """A note when the traced code (root and containers) differs between train and eval mode: the split
    follows the eval-mode graph in both modes. GoogLeNet and Inception3 call their auxiliary classifiers only
    in train mode (and then return a namedtuple): those are not part of the split."""
    try:
        train_trace = _trace(model, lambda m, q: q not in traced_through, training=True)
    except ValueError as err:
        return [f"could not trace in train mode ({err}); the split follows the eval-mode graph"]

    def signature(t: _Trace):  # arguments too: `F.dropout(x, p, self.training)` differs only in them
        return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in t.nodes]

    if signature(train_trace) == signature(eval_trace):
        return []
    extra = sorted({str(n.target) for n in train_trace.nodes if n.op == "call_module"}
                   - {str(n.target) for n in eval_trace.nodes if n.op == "call_module"})
    note = ("the forward of the traced containers differs between train and eval mode; the split follows the "
            "eval-mode graph in both modes")
    return [note + (f" (train mode would also call {extra}: not part of the split)" if extra else "")]
