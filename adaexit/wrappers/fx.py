"""``wrap`` for any torch.fx-traceable model: exits at dotted module paths, the model's own tail last.

``wrap(model, exits=["layer1", "layer2"])`` cuts the model's forward into consecutive pieces at the
outputs of the named submodules (names as ``model.named_modules()`` gives them, like
``torchvision.models.feature_extraction``; but the graph is *cut*, so later pieces run only on the rows
that did not exit). Every torchvision classification family splits this way, bit for bit.

How a model is split (:func:`split_model`):

1. **Tracing with maximal leaves.** ``_CutTracer`` (a ``torch.fx.Tracer``) makes every module that is not
   an ancestor of a requested exit a leaf: only the forward code of the root and of the containers on
   the way to an exit is traced; the blocks, the exit modules and the classifier become one
   ``call_module`` node each, which calls the original module object. So the pieces run the model's own
   code (``tail(stages(x)) == model(x)`` bit for bit, at the model's speed); code inside blocks that
   depends on ``self.training`` (dropout, stochastic depth), shape asserts and data-dependent control
   flow never meet the tracer; and the pieces hold the model's own modules and parameters (shared, not
   copied). The tracer records, for every module call, the value its forward returned: that value's node
   is the module's cut point.
2. **One value across each cut.** Nodes are in execution order. A cut after node ``c`` is valid iff the
   only value computed at or before ``c`` and used after it is ``c`` itself. Values that depend only on
   parameters and buffers (ViT's ``pos_embedding``) are *free*: recomputed in whichever piece uses them.
   Anything else crossing a cut is an error naming the value, its later user and the block being cut.
3. **Building the pieces.** Each segment of the node list is copied into its own ``fx.Graph`` with a
   placeholder for the incoming value and wrapped in an ``fx.GraphModule`` rooted at the model.
4. **Probing** (with ``example_input``): the traced graph runs once through an ``fx.Interpreter`` in eval
   mode under ``no_grad`` (BatchNorm statistics untouched), recording each exit's shape, from which its
   layout follows: ``nchw`` map, ``nhwc`` channels-last map (Swin), ``tokens`` ``[N, L, D]`` (ViT) or
   ``flat`` ``[N, D]``; and, for :func:`candidate_exits`, the FLOPs done before each cut.

:class:`ModelExits` holds the result: the model registered once as ``self.model`` (it owns the parameters
and its ``state_dict`` keys, prefixed ``model.``), the pieces held unregistered (their submodules *are*
the model's), fresh exit heads registered as ``exit_heads``. The model's own path from the last exit to
its output (whatever it holds: ``Sequential(Dropout, Linear)``, ViT's ``heads``, SqueezeNet's conv
classifier, functional pooling or flatten) is the last stage; its head passes the logits to the gate.
"""

from __future__ import annotations

import difflib
import math
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from ..base import AdaptiveModel
from ..cost import module_device
from ..early_exit import EarlyExitNet, check_chain
from ..heads import ChannelsFirst, ExitHead, LogitsHead, SelectToken, TokensAsChannels
from ..policies import NeverExitPolicy, Policy

try:  # torchvision is optional: its ops are opaque to the tracer, as in its feature_extraction
    import torchvision.ops as _tv_ops
except Exception:  # pragma: no cover - torchvision absent or broken
    _tv_ops = None

HEAD_KINDS = ("linear", "conv")
LAYOUTS = ("nchw", "nhwc", "tokens", "flat")


# =============================================================================================
# Tracing
# =============================================================================================
def _tv_ops_module_types() -> tuple[type, ...]:
    """The nn.Module classes of torchvision.ops (StochasticDepth, Conv2dNormActivation, ...)."""
    if _tv_ops is None:
        return ()
    return tuple(obj for obj in vars(_tv_ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module))


_TV_OPS_TYPES = _tv_ops_module_types()


class _CutTracer(fx.Tracer):
    """An fx tracer whose leaves are decided by ``leaf(module, qualname)``, recording module calls.

    For every module call it records (by qualified name) how often the module was called and the value its
    forward returned; every node is tagged (``node.meta["scope"]``) with the module it was created in, for
    error messages. Functions of ``math`` and ``torchvision.ops`` are leaf functions (fx's default for
    ``math``; torchvision's feature_extraction does the same for its ops).
    """

    def __init__(self, leaf: Callable[[nn.Module, str], bool]):
        super().__init__(autowrap_modules=(math,) + ((_tv_ops,) if _tv_ops is not None else ()))
        self._leaf = leaf
        self._scope = ""
        self.calls: Counter[str] = Counter()
        self.outputs: dict[str, Any] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._leaf(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        outer, self._scope = self._scope, qualname
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer
        self.calls[qualname] += 1
        self.outputs[qualname] = out
        return out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        proxy.node.meta["scope"] = self._scope
        return proxy


@dataclass
class _Trace:
    model: nn.Module
    gm: fx.GraphModule
    tracer: _CutTracer

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)


def _standard_leaf(m: nn.Module, qualname: str) -> bool:
    """fx's default leaves (torch.nn built-ins except Sequential) plus torchvision.ops modules."""
    if isinstance(m, _TV_OPS_TYPES):
        return True
    return m.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


class _mode:
    """Put every submodule in train or eval mode; restore each module's own flag afterwards (a user's
    mixed modes survive)."""

    def __init__(self, model: nn.Module, training: bool):
        self.model, self.training = model, training

    def __enter__(self):
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)

    def __exit__(self, *exc):
        for m, flag in self.saved:
            m.training = flag


def _trace(model: nn.Module, leaf: Callable[[nn.Module, str], bool], training: bool = False) -> _Trace:
    """Trace ``model`` (in eval mode unless ``training``) with the given leaf rule; dead code removed."""
    tracer = _CutTracer(leaf)
    try:
        with _mode(model, training):
            graph = tracer.trace(model)
    except Exception as err:
        raise ValueError(
            f"wrap: torch.fx cannot trace {type(model).__name__}.forward ({type(err).__name__}: {err}); only the "
            "forward of the model and of the containers holding an exit is traced, the rest runs as is"
        ) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(
            f"wrap: {type(model).__name__}.forward takes {len(inputs)} inputs "
            f"({', '.join(str(n.target) for n in inputs)}); only single-input models can be split"
        )
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)  # keeps asserts and in-place writes
    return _Trace(model, gm, tracer)


# =============================================================================================
# Graph analysis: which values cross a cut
# =============================================================================================
def _free_nodes(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """Nodes that depend on parameters, buffers and constants only, never on the model input: they can be
    recomputed in any piece. A call with no node input is not free (``torch.rand(3)`` is not duplicated)."""
    free: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr":
            free.add(n)
        elif (n.op.startswith("call") and n.all_input_nodes and not n.is_impure()
              and all(i in free for i in n.all_input_nodes)):
            free.add(n)
    return free


def _live_sets(nodes: Sequence[fx.Node], positions: Iterable[int], free: set[fx.Node]) -> dict[int, list[fx.Node]]:
    """For each position ``i``: the non-free values computed at or before ``i`` and used after it.
    One sweep: a value is live from its index to the index of its last use."""
    order = {n: i for i, n in enumerate(nodes)}
    wanted = set(positions)
    ends: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n in free or not n.users:
            continue
        last = max(order[u] for u in n.users)
        if last > order[n]:
            ends.setdefault(last, []).append(n)
    active: dict[fx.Node, None] = {}
    out: dict[int, list[fx.Node]] = {}
    for i, n in enumerate(nodes):
        for done in ends.get(i, ()):
            active.pop(done, None)
        if n not in free and n.users and max(order[u] for u in n.users) > i:
            active[n] = None
        if i in wanted:
            out[i] = list(active)
    return out


def _scope_name(node: fx.Node) -> str:
    return f"'{node.meta['scope']}'" if node.meta.get("scope") else "the model's forward"


def _describe(node: fx.Node) -> str:
    """A readable name for a graph value, for error messages."""
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "call_module":
        return f"the output of '{node.target}'"
    return f"value '{node.name}' (computed in {_scope_name(node)})"


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
                      operator.setitem}


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into a tensor in place (``x.relu_()``, ``x[i] = v``, ``F.relu(x, inplace=True)``,
    ``ReLU(inplace=True)``): its effect lives on in that tensor even when its result is never used."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or node.target in _INPLACE_FUNCTIONS or (
            name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False))
    return False


def _is_impure(node: fx.Node) -> bool:
    """Dead-code elimination keeps side effects: fx's own rule (asserts, random ops) plus in-place writes."""
    return node.is_impure() or _mutates(node)


def _inplace_consumer(cut: fx.Node, root: nn.Module) -> str | None:
    """The op after the cut that overwrites the cut value in place, if any (e.g. ``ReLU(inplace=True)``)."""
    for u in cut.users:
        if not u.args or u.args[0] is not cut or not _mutates(u):
            continue
        if u.op == "call_module":
            return f"'{u.target}' ({type(root.get_submodule(u.target)).__name__}, inplace=True)"
        if u.op == "call_function":
            return f"{getattr(u.target, '__name__', u.target)} (in place) in {_scope_name(u)}"
        return f"Tensor.{u.target} in {_scope_name(u)}"
    return None


# =============================================================================================
# Probing: shapes and FLOPs with an example input
# =============================================================================================
class _Probe(fx.Interpreter):
    """Runs the traced graph once, recording every node's output shape and dtype and the FLOPs so far."""

    def __init__(self, gm: fx.GraphModule, counter=None):
        super().__init__(gm)
        self.counter = counter
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
            self.dtypes[n] = out.dtype
        if self.counter is not None:
            self.flops[n] = self.counter.get_total_flops()
        return out


def _probe(trace: _Trace, example_input: torch.Tensor, flops: bool) -> _Probe:
    """One eval-mode, no-grad run: a probe never updates BatchNorm statistics or builds an autograd graph."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("wrap: example_input must be a tensor holding at least one row (a batch of 1-2 is enough)")
    with _mode(trace.model, False), torch.no_grad():
        try:
            if flops:
                with FlopCounterMode(display=False) as counter:
                    probe = _Probe(trace.gm, counter)
                    probe.run(example_input)
            else:
                probe = _Probe(trace.gm)
                probe.run(example_input)
        except Exception as err:
            raise ValueError(
                f"wrap: {type(trace.model).__name__} failed on example_input of shape {tuple(example_input.shape)} "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); pass a batch the model itself accepts"
            ) from err
    return probe


# =============================================================================================
# Cut points and layouts
# =============================================================================================
@dataclass
class CutPoint:
    """What flows across one cut (the output of the module ``name``), and how an exit head reads it.

    Attributes:
        name: the module's dotted path.
        shape: its output's shape for the example input (``None`` without one).
        layout: ``"nchw"`` (``[N, C, H, W]``), ``"nhwc"`` (channels last, Swin), ``"tokens"`` (``[N, L, D]``,
            ViT), ``"flat"`` (``[N, D]``), ``"other"``; ``None`` without an example input.
        layout_ambiguous: the shape alone could not tell NCHW from NHWC, or the producing / consuming
            modules (which decide) disagreed with the input's aspect ratio.
        token_index: for tokens, the token the model's own tail reads (``x[:, 0]``: a class token).
        flops_fraction: FLOPs (matmuls and convolutions) done before the cut / the whole model's.
        inplace_consumer: an op right after the cut that overwrites the value in place (a head must then
            read it before the next stage runs and must not save it for backward).
    """

    name: str
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    layout: str | None = None
    layout_ambiguous: bool = False
    token_index: int | None = None
    flops_fraction: float | None = None
    inplace_consumer: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def feature_dim(self) -> int | None:
        """The width of the vector a pooled head classifies from: C for maps, D for tokens and flat."""
        if self.shape is None or self.layout not in LAYOUTS or len(self.shape) < 2:
            return None
        return self.shape[1] if self.layout == "nchw" else self.shape[-1]

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """The ``[N, feature_dim]`` vector a pooled head classifies from (a torch reference)."""
        if self.layout == "nchw":
            return h.mean(dim=tuple(range(2, h.dim())))
        if self.layout == "nhwc":
            return h.mean(dim=tuple(range(1, h.dim() - 1)))
        if self.layout == "tokens":
            return h[:, self.token_index] if self.token_index is not None else h.mean(dim=1)
        if self.layout == "flat":
            return h
        raise ValueError(f"exit '{self.name}': no head reads the layout {self.layout!r}")


_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                   nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                   nn.GroupNorm, nn.InstanceNorm2d)


def _module_layout_hint(m: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Which axis a module treats as the channels, when it tells."""
    if isinstance(m, _CHANNELS_FIRST):
        return "nchw"
    if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == tuple(shape[-1:]):
        return "nhwc"
    if isinstance(m, nn.Linear) and m.in_features == shape[-1]:
        return "nhwc"
    return None


def _layout_hint(cut: fx.Node, root: nn.Module, shape) -> str | None:
    """NCHW or NHWC, as the module producing the cut value or the ops consuming it reveal."""
    hints = []
    if cut.op == "call_module":
        leaves = [m for m in root.get_submodule(cut.target).modules() if not list(m.children())]
        if leaves:  # the last leaf in registration order usually produced the value
            hints.append(_module_layout_hint(leaves[-1], shape))
    for u in cut.users:
        if u.op == "call_module":
            sub = root.get_submodule(u.target)
            first = next((m for m in sub.modules() if not list(m.children())), sub)
            hints.append(_module_layout_hint(first, shape))
        elif u.op in ("call_method", "call_function") and "permute" in str(u.target):
            dims = tuple(u.args[1:]) if len(u.args) > 2 else tuple(u.args[1]) if len(u.args) > 1 else ()
            if dims == (0, 3, 1, 2):
                hints.append("nhwc")
            elif dims == (0, 2, 3, 1):
                hints.append("nchw")
    hints = [h for h in hints if h]
    return Counter(hints).most_common(1)[0][0] if hints else None


def _infer_layout(shape: tuple[int, ...], input_shape: tuple[int, ...], hint: str | None) -> tuple[str, bool]:
    """``(layout, ambiguous)`` from the exit's shape, the input's shape and a module hint.

    A 4-D map keeps the input's aspect ratio: ``[N, a, b, c]`` is NCHW when ``b / c`` matches ``H / W``
    better than ``a / b`` does (a square input gives ``b == c`` for NCHW, ``a == b`` for NHWC). When both
    match equally (``[N, 7, 7, 7]``) the producing or consuming modules decide; when they tell (a convolution
    or BatchNorm: channels first; a LayerNorm or Linear over the last axis: channels last) they win over the
    ratio, and a disagreement is flagged as ambiguous. A 3-D ``[N, a, b]`` is a token sequence unless those
    modules say channels first (``Conv1d``: ``[N, C, L]``, pooled over ``L``).
    """
    if len(shape) == 2:
        return "flat", False
    if len(shape) == 3:
        return ("nchw" if hint == "nchw" else "tokens"), False
    if len(shape) != 4:
        return "other", False
    _, a, b, c = shape
    target = 0.0
    if len(input_shape) == 4 and min(input_shape[2:]) > 0:
        target = math.log(input_shape[2] / input_shape[3])
    err_nchw = abs(math.log(max(b, 1) / max(c, 1)) - target)
    err_nhwc = abs(math.log(max(a, 1) / max(b, 1)) - target)
    if abs(err_nchw - err_nhwc) > 1e-6:
        by_ratio = "nchw" if err_nchw < err_nhwc else "nhwc"
        return (hint or by_ratio), hint is not None and hint != by_ratio
    return (hint or "nchw"), True


def _token_index(nodes: Sequence[fx.Node]) -> int | None:
    """The token the graph reads as ``x[:, i]`` from a sequence (ViT's class token: 0), else None."""
    for n in nodes:
        if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
            idx = n.args[1]
            if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], int):
                return idx[1]
    return None


def _describe_cut(cut: CutPoint, node: fx.Node, model: nn.Module, probe: _Probe, input_shape, tok) -> None:
    """Fill ``cut``'s shape, dtype, layout and token index from a probe."""
    cut.shape, cut.dtype = probe.shapes.get(node), probe.dtypes.get(node)
    if cut.shape is None:
        raise ValueError(
            f"wrap: module '{cut.name}' does not return a tensor for the example input: exactly one tensor must "
            "flow across a cut"
        )
    cut.layout, cut.layout_ambiguous = _infer_layout(cut.shape, input_shape, _layout_hint(node, model, cut.shape))
    if cut.layout == "tokens":
        cut.token_index = tok


# =============================================================================================
# Split
# =============================================================================================
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

    def probe(self, example_input: torch.Tensor) -> None:
        """Shapes, dtypes and layouts of every cut and of the model's output, from one eval-mode run."""
        probe = _probe(self._trace, example_input, flops=False)
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


def _validate_cut(name: str, cut: fx.Node, live: list[fx.Node], order: dict[fx.Node, int]) -> str | None:
    """``None`` if exactly the module's output is live across the cut, else why the cut is invalid."""
    others = [n for n in live if n is not cut]
    if others:
        n = others[0]
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        user = min((u for u in n.users if order[u] > order[cut]), key=order.__getitem__)
        by = f"'{user.target}'" if user.op == "call_module" else f"'{user.name}'"
        # the innermost module holding both the cut and the later use is the block being cut
        a, b = name.split("."), (user.meta.get("scope") or "").split(".")
        k = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        where = ".".join(a[:k])
        region = (f"the cut is inside '{where}' (a residual/dense block or multi-branch region)" if where
                  else "the cut is inside a residual/dense block or multi-branch region")
        return (f"wrap: cannot cut at the output of '{name}': {_describe(n)}, computed before the cut, is still "
                f"used after it by {by}{more}; {region}; exactly one value may cross a cut")
    if cut not in live:
        return f"wrap: cannot cut at the output of '{name}': its output is not used later"
    if len(cut.users) == 1 and all(u.op == "output" for u in cut.users):
        return (f"wrap: '{name}' produces the model's output: nothing would be left for the tail (the model's own "
                "output is always the last exit)")
    return None


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


# =============================================================================================
# Candidate exits
# =============================================================================================
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


# =============================================================================================
# The wrapped model
# =============================================================================================
def _layout_reader(cut: CutPoint) -> nn.Module | None:
    """What a pooled-linear head applies first so that the exit-gate kernel reads the features directly:
    nothing for NCHW maps and flat features, a channels-first view of a channels-last map, the class token
    (or the tokens as channels, to average them) of a sequence. All are views: the kernel reads them in place."""
    if cut.layout in ("nchw", "flat"):
        return None
    if cut.layout == "nhwc":
        return ChannelsFirst()
    if cut.layout == "tokens":
        return SelectToken(cut.token_index) if cut.token_index is not None else TokensAsChannels()
    raise ValueError(
        f"wrap: exit '{cut.name}' outputs a tensor of shape {cut.shape}, which no default head reads; pass "
        "head=<callable (width, num_classes) -> nn.Module>"
    )


def _make_head(kind, cut: CutPoint, num_classes: int, device, dtype) -> nn.Module:
    """An exit head for ``cut``: ``"linear"`` (pooled linear on the layout's view, fused), ``"conv"`` (a conv
    block before it, for feature maps) or a callable ``(width, num_classes) -> nn.Module``, which receives
    the stage output as it is (see ``cut.layout``)."""
    width = cut.feature_dim if cut.feature_dim is not None else cut.shape[1]
    if callable(kind) and not isinstance(kind, str):
        head = kind(width, num_classes)
        if not isinstance(head, nn.Module):
            raise ValueError(f"wrap: head(width, num_classes) must return an nn.Module, got {type(head).__name__} "
                             f"(exit '{cut.name}')")
    elif kind == "linear":
        head = ExitHead(width, num_classes, features=_layout_reader(cut))
    elif kind == "conv":
        if cut.layout not in ("nchw", "nhwc"):
            raise ValueError(
                f"wrap: head='conv' needs a feature map, but exit '{cut.name}' outputs {cut.layout} {cut.shape}; "
                "use head='linear' or a callable"
            )
        head = ExitHead.conv(width, num_classes)
        if cut.layout == "nhwc":
            head.features = nn.Sequential(ChannelsFirst(), head.features)
    else:
        raise ValueError(f"wrap: head must be one of {HEAD_KINDS} or a callable, got {kind!r} (exit '{cut.name}')")
    return head.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})


class ModelExits(EarlyExitNet):
    """An existing model split at named modules (:func:`split_model`), with an exit head after each.

    ``stages`` are the split's stages plus its tail (the model's own path to its output); ``heads`` the exit
    heads plus, last, a :class:`~adaexit.heads.LogitsHead` that hands the model's logits to the gate. So
    with a never-exit policy the output is ``model(x)``, bit for bit, and ``train(heads_only=True)`` trains
    only the new exit heads (the whole model, its classifier included, is the frozen backbone).

    The model is registered once, as ``self.model`` (its ``state_dict`` keys prefixed ``model.``); the
    pieces are held unregistered, so nothing is counted twice. Without ``example_input`` the default
    (``"linear"``) heads are built from the first batch the model sees: their parameters exist from the
    start (uninitialised, so an optimizer built before holds them) and take their width, and the heads
    their layout reader, from that batch's shapes.

    Attributes:
        model: the wrapped model. exits: the exit names. cuts: a :class:`CutPoint` per exit (shape, layout).
        notes: what differs from the model (e.g. train-mode auxiliary heads left out).
    """

    def __init__(self, model: nn.Module, split: Split, head="linear", policy: Policy | None = None):
        AdaptiveModel.__init__(self)  # not EarlyExitNet's: the stages must not be registered a second time
        if not (callable(head) or head in HEAD_KINDS):
            raise ValueError(f"wrap: head must be one of {HEAD_KINDS} or a callable, got {head!r}")
        self.model = model
        self.exits = [c.name for c in split.cuts]
        self._split = split
        device = module_device(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if split.probed:
            heads = [_make_head(head, cut, self._classes(), device, dtype) for cut in split.cuts]
        elif head == "linear":
            with warnings.catch_warnings():  # torch warns that lazy modules are new
                warnings.simplefilter("ignore", UserWarning)
                heads = [ExitHead(classifier=nn.LazyLinear(0, device=device, dtype=dtype)) for _ in split.cuts]
        else:
            raise ValueError(
                f"wrap: head={getattr(head, '__name__', head)!r} needs each exit's width: pass example_input (a "
                "batch of one or two inputs), from whose traced shapes the widths are read"
            )
        self.exit_heads = nn.ModuleList(heads)
        self._logits_head = LogitsHead(self._classes() if split.probed else None)
        self._pending = not split.probed
        check_chain(self.stages, self.heads)
        self.set_policy(policy or NeverExitPolicy())
        # load_state_dict(assign=True) replaces the model's tensors: the traced code must read the new ones
        self.register_load_state_dict_post_hook(lambda module, keys: module._resync_traced_tensors())

    # -- the chain ------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[nn.Module, ...]:
        """The split's stages, then its tail (the model's own path from the last exit to its output)."""
        return (*self._split.stages, self._split.tail)

    @property
    def heads(self) -> tuple[nn.Module, ...]:
        """The exit heads, then the logits head of the model's own output."""
        return (*self.exit_heads, self._logits_head)

    @property
    def cuts(self) -> list[CutPoint]:
        return self._split.cuts

    @property
    def notes(self) -> list[str]:
        return self._split.notes

    def output_dtype(self) -> torch.dtype:
        """The dtype the model returns (the gate computes in fp32): that of the last floating-point parameter
        on its own path to the output (its classifier's), read now so that it follows ``.half()``."""
        for module in (self._split.tail, self.model):
            floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
            if floating:
                return floating[-1]
        return torch.float32

    def _classes(self) -> int:
        shape = self._split.output_shape
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"wrap: {type(self.model).__name__} must return logits [N, classes]; it returned "
                f"{'a non-tensor' if shape is None else f'shape {shape}'} for the example input"
            )
        return shape[1]

    # -- heads built from the first batch (wrap without example_input) ---------------------------
    def _materialize(self, x) -> None:
        """Probe the split with one row of ``x``, then give every lazily built head its width (its
        parameters are initialised in place) and its layout reader."""
        if not self._pending:
            return
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
            return  # an empty batch tells nothing; nothing runs a head on it
        self._split.probe(x[:1])
        classes = self._classes()
        for cut, head in zip(self._split.cuts, self.exit_heads):
            reader = _layout_reader(cut)  # raises for a shape no default head reads, naming the exit
            if reader is not None:
                head.features = reader
            lazy = head.classifier
            lazy.in_features, lazy.out_features = cut.feature_dim, classes
            # A first call initialises the parameters in place (unless a loaded state_dict did) and makes the
            # module a Linear; never as inference tensors, even when the first batch comes in inference mode.
            with torch.inference_mode(False), torch.no_grad():
                lazy(torch.zeros(1, cut.feature_dim, device=lazy.weight.device, dtype=lazy.weight.dtype))
        self._logits_head.num_classes = classes
        self._pending = False

    def prepare_input(self, x):
        x = super().prepare_input(x)
        self._materialize(x)
        return x

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._materialize(x)
        return super().exit_logits(x)

    def exit_costs(self, x: torch.Tensor, cost: str = "flops"):
        self._materialize(x)
        return super().exit_costs(x, cost)

    # -- the pieces' own references ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """After ``.to()`` / ``.half()`` / ...: the pieces follow the model (see :meth:`_resync_traced_tensors`)."""
        result = super()._apply(fn, recurse)
        self._resync_traced_tensors()
        return result

    def _resync_traced_tensors(self) -> None:
        """Tensors the traced code reads directly (``get_attr`` nodes: a ViT's class token, a root-level
        buffer) are re-read from the model, in the pieces and in the traced graph that probes the first
        batch: ``.to()`` replaces buffers, ``load_state_dict(assign=True)`` parameters too."""
        for piece in [*self._split.pieces, self._split._trace.gm]:
            for node in piece.graph.nodes:
                if node.op == "get_attr":
                    *path, attr = node.target.split(".")
                    owner, source = piece, self.model
                    for part in path:
                        owner, source = getattr(owner, part), getattr(source, part)
                    value = getattr(source, attr)
                    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                        owner._buffers[attr] = value
                    elif isinstance(value, nn.Parameter):
                        owner._parameters[attr] = value

    def extra_repr(self) -> str:
        return f"exits={self.exits}"


def wrap(model: nn.Module, exits: Sequence[str], *, head="linear", policy: Policy | None = None,
         example_input: torch.Tensor | None = None) -> ModelExits:
    """Wrap ``model`` as an :class:`~adaexit.EarlyExitNet` with an exit after each module named in ``exits``.

    Args:
        model: any single-input model whose forward torch.fx can trace along the way to the exits (every
            torchvision classification model). Its modules are shared, not copied.
        exits: dotted module paths as ``model.named_modules()`` names them (``"layer2"``, ``"features.3"``,
            ``"encoder.layers.encoder_layer_5"``), in forward order. A name must be a valid cut: called
            once, returning one tensor, with nothing else live across it (not inside a residual block).
            :func:`candidate_exits` lists the valid ones. The model's own output is always the last exit.
        head: ``"linear"`` (default: the layout's view, then a pooled linear, fused into the exit-gate
            kernel: NCHW maps pooled, channels-last maps through a channels-first view, token sequences
            through their class token), ``"conv"`` (a conv block first; feature maps only) or a callable
            ``(width, num_classes) -> nn.Module`` that receives the stage output as it is.
        policy: the exit policy (default: never exit early, which reproduces ``model``).
        example_input: a batch of one or two inputs. Widths, layouts and the class count come from its
            traced shapes; ``head="conv"`` and callables need it. Without it the default heads are built
            from the first batch the model sees.
    """
    exits = _check_names(model, exits)
    if not exits:
        raise ValueError("wrap: exits is empty: name at least one module to put an early exit after")
    split = split_model(model, exits, example_input)
    for note in split.notes:
        warnings.warn(f"wrap({type(model).__name__}): {note}", stacklevel=3)  # the caller of adaexit.wrap
    return ModelExits(model, split, head=head, policy=policy)


__all__ = ["CutPoint", "HEAD_KINDS", "ModelExits", "Split", "candidate_exits", "pick_exits", "split_model", "wrap"]
