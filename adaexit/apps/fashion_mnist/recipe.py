"""How the main job's networks are trained, and the checkpoint cache that remembers them.

The recipe (:func:`net_configs`): the wide early-exit CNN is trained first, its exits jointly with
self-distillation from its last exit (:class:`~adaexit.training.MultiExitLoss`); it is the strongest
single network and the *teacher*. The MLP and the small CNN, the cheap members of the cascades, then
learn from its logits on the training images (knowledge distillation): a cascade's budget counts the
images the strongest network gets right and the system gets wrong, so a cheap member that agrees
with the teacher can answer for more rows within it.

The cache key of a checkpoint (:func:`checkpoint_paths`) covers everything that changes what is
trained, so a warm cache gives exactly the numbers a fresh clone gives:

* the recipe: every field of the :class:`NetConfig` (all hyperparameters);
* the code: a hash of the source of every adaexit module defining a class of the network (its
  modules, their base classes) plus the training loop, the data loader, this module and the model
  zoo (:func:`code_fingerprint`), and the torch version;
* the seed, and a hash of the training split's contents (:func:`data_fingerprint`);
* for a student, its teacher's key.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...data import make_loader
from ...early_exit import EarlyExitNet
from ...training import MultiExitLoss, teacher_logits, train, train_classifier
from ..common import cache_dir
from ..common import log as _log
from .models import ZOO, plain_network

#: Modules whose code shapes training whatever the network: the loop and loss, the loader, the recipe
#: (this module) and the zoo. The network's own classes are added per network.
TRAINING_MODULES = ("adaexit.training", "adaexit.data", __name__, "adaexit.apps.fashion_mnist.models")
KEY_VERSION = 2  # bump when the layout of a checkpoint changes


@dataclass
class NetConfig:
    """How one network is built and trained (every field goes into its cache key)."""

    name: str
    builder: str  # key of models.ZOO
    size: int  # hidden width (MLP) or base channel width (CNNs)
    epochs: int
    lr: float
    multi_exit: bool = False
    weighting: str = "linear"
    distill: float = 0.5  # KL share: self-distillation of the exits, or from the teacher
    temperature: float = 3.0
    teacher: str | None = None  # name of an earlier network to distil from (its plain network)
    batch_size: int = 128
    max_steps: int | None = None  # per epoch; smoke runs only


def net_configs(epochs: int, smoke: bool, train_batch_size: int) -> list[NetConfig]:
    """The main job's three networks, teacher first. ``epochs`` is the wide CNN's; the cheap networks
    get twice as many (an epoch of theirs costs a few percent of the wide CNN's)."""
    if smoke:
        steps = 3
        return [
            NetConfig("wide_cnn", "wide_cnn", 4, 1, 2e-3, multi_exit=True, batch_size=64, max_steps=steps),
            NetConfig("mlp", "mlp", 32, 1, 2e-3, distill=0.7, temperature=4.0, teacher="wide_cnn",
                      batch_size=64, max_steps=steps),
            NetConfig("small_cnn", "small_cnn", 4, 1, 3e-3, distill=0.7, temperature=4.0, teacher="wide_cnn",
                      batch_size=64, max_steps=steps),
        ]
    cheap = 2 * epochs
    return [
        NetConfig("wide_cnn", "wide_cnn", 32, epochs, 2e-3, multi_exit=True, batch_size=train_batch_size),
        NetConfig("mlp", "mlp", 256, cheap, 2e-3, distill=0.7, temperature=4.0, teacher="wide_cnn",
                  batch_size=train_batch_size),
        NetConfig("small_cnn", "small_cnn", 16, cheap, 3e-3, distill=0.7, temperature=4.0, teacher="wide_cnn",
                  batch_size=train_batch_size),
    ]


def default_cache() -> Path:
    return cache_dir("demo")


def build(cfg: NetConfig) -> nn.Module:
    """``cfg``'s network, freshly initialised (seed it first)."""
    return ZOO[cfg.builder](cfg.size)


# -- cache keys -------------------------------------------------------------------------------------
def code_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the source of the adaexit modules that define ``model`` (every class of its modules
    and their bases) and of :data:`TRAINING_MODULES`: editing any of them retrains."""
    names = set(TRAINING_MODULES)
    for module in model.modules():
        names.update(cls.__module__ for cls in type(module).__mro__ if cls.__module__.split(".")[0] == "adaexit")
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + inspect.getsource(sys.modules[name]).encode() + b"\0")
    return digest.hexdigest()


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and contents (the training split, in its order)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()


def checkpoint_paths(configs: list[NetConfig], cache: Path, x_train: torch.Tensor, y_train: torch.Tensor,
                     seed: int) -> dict[str, Path]:
    """``name -> cache / "<name>-<key>.pt"`` for every config, keys as the module docstring says.

    A teacher must come before its students in ``configs``."""
    data = data_fingerprint(x_train, y_train)
    keys: dict[str, str] = {}
    for cfg in configs:
        if cfg.teacher is not None and cfg.teacher not in keys:
            raise ValueError(f"{cfg.name}: teacher {cfg.teacher!r} must be an earlier network of the recipe")
        blob = json.dumps({
            "config": asdict(cfg), "data": data, "seed": seed, "code": code_fingerprint(build(cfg)),
            "torch": torch.__version__, "teacher": keys.get(cfg.teacher), "v": KEY_VERSION,
        }, sort_keys=True)  # fmt: skip
        keys[cfg.name] = f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    return {name: Path(cache) / f"{key}.pt" for name, key in keys.items()}


# -- training (cached) ------------------------------------------------------------------------------
def network_weights(model: nn.Module) -> dict:
    """The network's weights and buffers, without its exit policy (calibration sets that later;
    leaving it out keeps checkpoints loadable whatever policy class the model is built with)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("policy.")}


def load_weights(model: nn.Module, state: dict, path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("policy.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "delete it or pass --retrain"
        )


def load_checkpoint(cfg: NetConfig, path: Path) -> tuple[nn.Module, dict]:
    """``cfg``'s network with the weights saved at ``path``, and the saved training record."""
    model = build(cfg)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    load_weights(model, saved["state_dict"], path)
    return model.eval(), saved["record"]


def train_or_load(cfg: NetConfig, data, path: Path, seed: int, retrain: bool, progress: bool,
                  teacher: nn.Module | None = None):
    """``cfg``'s network: loaded from ``path`` (see :func:`checkpoint_paths`) or trained and saved there.

    ``teacher``: the trained network named by ``cfg.teacher`` (its plain, no-exit forward is the teacher).
    Returns ``(model, record)`` with ``record = {"cached", "checkpoint", "train_seconds",
    "train_cpu_seconds", "history", "config"}``.
    """
    path = Path(path)
    if path.is_file() and not retrain:
        model, record = load_checkpoint(cfg, path)
        _log(f"[demo] {cfg.name}: loaded cached checkpoint {path}")
        return model, {"cached": True, "checkpoint": str(path), **record}
    if (cfg.teacher is None) != (teacher is None):
        raise ValueError(f"{cfg.name}: recipe teacher {cfg.teacher!r} but teacher network {type(teacher).__name__}")
    torch.manual_seed(seed)
    model = build(cfg)
    x_train, y_train = data
    wall, cpu = time.perf_counter(), time.process_time()
    targets = y_train
    if teacher is not None:  # the teacher's logits, once: the training images never change
        net = plain_network(teacher) if isinstance(teacher, EarlyExitNet) else teacher
        targets = (y_train, teacher_logits(net, x_train))
    loader = make_loader(x_train, targets, cfg.batch_size, shuffle=True, seed=seed)
    common = dict(max_steps=cfg.max_steps, progress=progress, desc=cfg.name)
    if cfg.multi_exit:
        loss = MultiExitLoss(model.num_exits, cfg.weighting, distill=cfg.distill, temperature=cfg.temperature)
        history = train(model, loader, cfg.epochs, cfg.lr, loss=loss, **common)
    else:
        distill = cfg.distill if teacher is not None else 0.0
        history = train_classifier(model, loader, cfg.epochs, cfg.lr, distill=distill,
                                   temperature=cfg.temperature, **common)
    record = {
        "train_seconds": time.perf_counter() - wall,
        "train_cpu_seconds": time.process_time() - cpu,
        "history": history,
        "config": asdict(cfg),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": network_weights(model), "record": record}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written checkpoint
    _log(f"[demo] {cfg.name}: trained in {record['train_seconds']:.1f} s, saved {path}")
    return model.eval(), {"cached": False, "checkpoint": str(path), **record}


def train_all(configs: list[NetConfig], data, cache: Path, seed: int, retrain: bool, progress: bool):
    """Train (or load) every network of the recipe in order, teachers first: ``(nets, records)``."""
    x_train, y_train = data
    paths = checkpoint_paths(configs, cache, x_train, y_train, seed)
    nets, records = {}, {}
    for cfg in configs:
        teacher = nets[cfg.teacher] if cfg.teacher is not None else None
        nets[cfg.name], records[cfg.name] = train_or_load(cfg, data, paths[cfg.name], seed, retrain, progress,
                                                          teacher=teacher)
    return nets, records
