"""What every wrapped model shares, whichever backend built it.

* the ``wrap`` keywords and how a backend refuses one it cannot honour (:func:`refuse_options`);
* the ``heads=`` argument checked and turned into modules (:func:`early_heads`);
* the exit points saved in ``state_dict`` (:class:`SavedExits`: loading weights saved for other exits is
  refused, naming both);
* the mode of the wrapped model (:func:`follow_mode`).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

#: every keyword ``wrap`` takes (see :func:`adaexit.wrap`); a backend refuses, by name, those it cannot honour
WRAP_OPTIONS = ("heads", "policy", "example_input", "trim", "gate")


def refuse_options(backend: str, options: dict, supported: Sequence[str]) -> None:
    """Raise ``ValueError`` for a keyword ``wrap`` does not know, or one ``backend`` cannot honour."""
    for key, value in options.items():
        if key not in WRAP_OPTIONS:
            raise ValueError(f"wrap: unknown keyword {key}=; wrap takes {', '.join(k + '=' for k in WRAP_OPTIONS)}")
        if key not in supported and value is not None:
            raise ValueError(f"wrap: {key}= is not supported for {backend}; it takes "
                             f"{', '.join(k + '=' for k in supported)}")


def early_heads(heads, count: int, width: int | Sequence[int] | None, num_classes: int | None, what: str) -> list[nn.Module] | None:
    """The ``heads=`` argument as one module per early exit: ``None`` stays ``None`` (the backend's default
    heads); a sequence must hold ``count`` modules; a callable ``(width, num_classes) -> nn.Module`` is called
    once per exit (it needs the width: ``what`` says where it comes from when it is unknown)."""
    if heads is None:
        return None
    if isinstance(heads, nn.Module):
        raise ValueError(f"wrap: heads= takes one module per early exit (a list of {count}), got one "
                         f"{type(heads).__name__}")
    if callable(heads):
        if width is None or num_classes is None:
            raise ValueError(f"wrap: heads={getattr(heads, '__name__', 'callable')} (a head factory) needs each "
                             f"exit's width: {what}")
        made = [heads(width if isinstance(width, int) else width[k], num_classes) for k in range(count)]
        for k, head in enumerate(made):
            if not isinstance(head, nn.Module):
                raise ValueError(f"wrap: heads(width, num_classes) must return an nn.Module, got "
                                 f"{type(head).__name__} (exit {k})")
        return made
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise ValueError(f"wrap: heads= must be None, a list of {count} modules (one per early exit) or a callable "
                         f"(width, num_classes) -> nn.Module; got {heads!r}")
    heads = list(heads)
    if len(heads) != count:
        raise ValueError(f"wrap: got {len(heads)} heads for {count} early exits (heads= takes one module per "
                         "early exit; the model's own head is the last exit)")
    for k, head in enumerate(heads):
        if not isinstance(head, nn.Module):
            raise ValueError(f"wrap: heads[{k}] is a {type(head).__name__}, not an nn.Module")
    return heads


class SavedExits:
    """Mixin: the exit names and layouts are part of ``state_dict`` (the key ``_extra_state``), and loading a
    state saved for other exits raises ``ValueError`` naming both. The class provides ``exits`` (names) and
    ``layouts`` (one per exit, ``None`` where not known yet)."""

    exits: list[str]
    layouts: list

    def get_extra_state(self) -> dict:
        return {"exits": list(self.exits), "layouts": list(self.layouts)}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "exits" not in state:
            raise ValueError(f"{type(self).__name__}: this state_dict does not say which exits it was saved for")
        saved, ours = list(state["exits"]), list(self.exits)
        if saved != ours:
            raise ValueError(
                f"{type(self).__name__}: this state_dict was saved for exits {saved}, but this model has exits "
                f"{ours}: wrap the model at the saved exits to load it"
            )
        layouts = state.get("layouts") or [None] * len(saved)
        for name, theirs, mine in zip(saved, layouts, self.layouts):
            if theirs is not None and mine is not None and theirs != mine:
                raise ValueError(
                    f"{type(self).__name__}: exit '{name}' was saved with layout {theirs!r}, but reads {mine!r} "
                    "here (a different input shape or model?)"
                )


def follow_mode(wrapped: nn.Module, model: nn.Module) -> nn.Module:
    """Put ``wrapped`` in ``model``'s mode (train or eval) without touching ``model``'s own modules (a user's
    mixed modes survive): its own flag and those of the modules it adds (exit heads, the policy)."""
    inside = {id(m) for m in model.modules()}
    for m in wrapped.modules():
        if id(m) not in inside:
            m.training = model.training
    return wrapped


__all__ = ["WRAP_OPTIONS", "SavedExits", "early_heads", "follow_mode", "refuse_options"]
