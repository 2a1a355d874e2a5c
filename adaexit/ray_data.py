"""Bulk inference on many machines with Ray Data: a callable class for ``Dataset.map_batches``.

Ray Data runs one :class:`AdaptivePredictor` per actor: its ``__init__`` builds the adaptive model once
(and loads its weights, calibrated policy included), its ``__call__`` runs one Ray batch (a dict of numpy
arrays) through it. This module does not import Ray (``map_batches`` only needs the class), so it
imports, and the predictor can be tested, without ``ray`` installed; install the extra
``pip install "adaexit[ray]"`` to run it on Ray.

Example (one machine; on a cluster, ``ray.init(address="auto")``)::

    import ray
    from adaexit.ray_data import AdaptivePredictor

    ds = ray.data.from_numpy(images)                     # one column, "data"
    out = ds.map_batches(
        AdaptivePredictor,
        fn_constructor_kwargs={"build": build_model, "weights": "model.pt", "input_column": "data"},
        compute=ray.data.ActorPoolStrategy(size=4), batch_size=1024, num_cpus=1,
    )                                                    # columns: logits, prediction, exit_index
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Callable, Mapping

import numpy as np
import torch

from .base import AdaptiveModel
from .stream import stream

OUTPUT_COLUMNS = ("logits", "prediction", "exit_index")


class AdaptivePredictor:
    """Adaptive inference on Ray Data batches (``Dataset.map_batches(AdaptivePredictor, ...)``).

    Args:
        build: a picklable zero-argument callable returning the :class:`~adaexit.AdaptiveModel` (a
            module-level function or a ``functools.partial`` of one); called once per actor.
        weights: a ``state_dict`` to load into it, as a file path (it must exist on every node: a shared
            file system) or as the bytes of ``torch.save(model.state_dict(), buffer)`` (shipped with the
            actor); loaded with ``torch.load(..., weights_only=True)``. A saved calibrated policy is
            restored with the weights. ``None``: the model as ``build`` returns it.
        input_column: the column holding the model's input rows (a tensor column: ``[B, ...]``).
        batch_size: ``None`` runs each Ray batch as one eval-mode forward; an integer streams the Ray
            batch in chunks of that many rows through :func:`adaexit.stream` (every node runs on full
            chunks; at most ``16 * batch_size`` rows in flight).
        num_threads: ``torch.set_num_threads`` in the actor (one actor per CPU: 1); ``None`` keeps torch's.
        device: where the model runs (``"cpu"`` default; ``"cuda"`` with ``num_gpus=1`` per actor).

    ``__call__(batch)`` returns the batch's other columns unchanged plus ``logits`` (float32
    ``[B, classes]``), ``prediction`` (int64 ``[B]``, the argmax) and ``exit_index`` (int64 ``[B]``, the
    exit each row left at), row by row in the batch's order.
    """

    def __init__(self, build: Callable[[], AdaptiveModel], weights: str | os.PathLike | bytes | None = None,
                 input_column: str = "x", batch_size: int | None = None, num_threads: int | None = None,
                 device: str = "cpu"):
        if not callable(build):
            raise ValueError(f"AdaptivePredictor: build must be a zero-argument callable, got {type(build).__name__}")
        if not isinstance(input_column, str) or not input_column:
            raise ValueError(f"AdaptivePredictor: input_column must be a column name, got {input_column!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"AdaptivePredictor: batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        model = build()
        if not isinstance(model, AdaptiveModel):
            raise ValueError(f"AdaptivePredictor: build() must return an adaexit AdaptiveModel, got {type(model).__name__}")
        self.device = torch.device(device)
        model.to(self.device)
        if weights is not None:
            model.load_state_dict(_load_state_dict(weights, self.device))
        self.model = model.eval()
        self.input_column, self.batch_size = input_column, batch_size

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.input_column not in batch:
            raise ValueError(
                f"AdaptivePredictor: the batch has no input_column {self.input_column!r} (columns: {sorted(batch)})"
            )
        clash = [c for c in OUTPUT_COLUMNS if c in batch]
        if clash:
            raise ValueError(f"AdaptivePredictor: the batch already has the output column(s) {clash}; rename them")
        # Ray's arrays are read-only zero-copy views: copy once, into a tensor torch may write
        x = torch.from_numpy(np.array(batch[self.input_column])).to(self.device)
        logits, exit_index = self.predict(x)
        out = {name: column for name, column in batch.items() if name != self.input_column}
        out["logits"] = logits.float().cpu().numpy()
        out["prediction"] = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
        out["exit_index"] = exit_index.cpu().numpy().astype(np.int64)
        return out

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, exit_index)`` of the rows ``x``, in their order."""
        with torch.inference_mode():
            if self.batch_size is None or x.shape[0] == 0:
                out, info = self.model(x, return_info=True)
                return _logits(out), info.exit_index
            chunks = x.split(self.batch_size)
            parts = list(stream(self.model, chunks, batch_size=self.batch_size, return_info=True))
            return torch.cat([_logits(out) for out, _ in parts]), torch.cat([info.exit_index for _, info in parts])


def _logits(out) -> torch.Tensor:
    """The logits of what the model returned (a tensor, or a wrapped model's output with ``.logits``)."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _load_state_dict(weights, device) -> dict:
    source = io.BytesIO(weights) if isinstance(weights, (bytes, bytearray, memoryview)) else os.fspath(weights)
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        what = "bytes" if isinstance(source, io.BytesIO) else repr(source)
        raise ValueError(f"AdaptivePredictor: weights ({what}) is not a loadable state_dict: {err}") from err


__all__ = ["AdaptivePredictor", "OUTPUT_COLUMNS"]
