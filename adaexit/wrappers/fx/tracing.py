"""Tracing with maximal leaves (:class:`_CutTracer`), the eval/train-mode switch, and the side-effect rule
dead-code elimination keeps (in-place writes)."""

from __future__ import annotations

import inspect
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from torch import fx, nn

try:  # torchvision is optional: its ops are opaque to the tracer, as in its feature_extraction
    import torchvision.ops as _tv_ops
except Exception:  # pragma: no cover - torchvision absent or broken
    _tv_ops = None


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


def _defaults(model: nn.Module) -> dict[str, Any]:
    """The forward's parameters after the first that have defaults (timm's ViT: ``attn_mask=None``,
    ``is_causal=False``): not inputs, but constants the trace keeps at their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: trace as is
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _drop_specialised(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for parameters traced at their defaults (they carry the default as
    ``args``) and the checks on them (``_assert_is_none``): the pieces then take the one input only."""
    specialised: set[fx.Node] = set()
    for n in graph.nodes:
        if (n.op == "placeholder" and n.args) or (
                n.op != "placeholder" and n.all_input_nodes and all(i in specialised for i in n.all_input_nodes)):
            specialised.add(n)
    for n in reversed(list(graph.nodes)):
        if n in specialised and all(u in specialised for u in n.users):
            graph.erase_node(n)


def _trace(model: nn.Module, leaf: Callable[[nn.Module, str], bool], training: bool = False) -> _Trace:
    """Trace ``model`` (in eval mode unless ``training``) with the given leaf rule; dead code removed. Forward
    parameters after the first that have defaults keep them (a single-input model)."""
    tracer = _CutTracer(leaf)
    defaults = _defaults(model)
    try:
        with _mode(model, training):
            graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as err:
        raise ValueError(
            f"wrap: torch.fx cannot trace {type(model).__name__}.forward ({type(err).__name__}: {err}); only the "
            "forward of the model and of the containers holding an exit is traced, the rest runs as is"
        ) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_specialised(gm.graph)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(
            f"wrap: {type(model).__name__}.forward takes {len(inputs)} inputs without defaults "
            f"({', '.join(str(n.target) for n in inputs)}); only single-input models can be split"
        )
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)  # keeps asserts and in-place writes
    return _Trace(model, gm, tracer)


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
