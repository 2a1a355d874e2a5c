"""Which values cross a cut: free values (parameters only), live sets, and why a cut is invalid."""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import fx, nn

from .tracing import _mutates


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
