"""adaexit: adaptive inference for PyTorch with genuinely sparse execution at batch size > 1.

One executor (:mod:`adaexit.executor`) runs every method sparsely on the Triton kernels of
:mod:`adaexit.kernels`; every adaptive model derives from :class:`AdaptiveModel` and only describes
its graph; policies only decide routes.

* the base: :class:`AdaptiveModel`, :class:`ExitInfo`
* early exit: :class:`EarlyExitNet`, :func:`wrap`, :class:`ExitHead`
* policies: :class:`ConfidencePolicy`, :class:`PatiencePolicy`, :class:`LearnedPolicy`,
  :class:`NeverExitPolicy`, :class:`RoutingPolicy`
* calibration: :func:`calibrate` (the accuracy/cost frontier under an accuracy budget)
* training: :class:`MultiExitLoss`, :func:`train`, :func:`train_classifier`
* cascades / network selection: :class:`Cascade`, :class:`NetworkSelectionPolicy`,
  :class:`SelectorPolicy`, :func:`train_reinforce`, :func:`cascade_oracle`
* anytime prediction: :class:`AnytimeRunner`, :func:`anytime_predict`, :func:`anytime_curve`, :class:`EANN`
* dynamic routing (D2NN): :class:`D2NN`, :class:`Controller`, :class:`D2NNTrainer` and the topology builders
* many batches and many callers: :func:`stream` (rows regrouped across batches), :class:`Server`
* Hugging Face encoders: :func:`wrap` on BERT / RoBERTa / DistilBERT / ViT classifiers
* decoder LLMs: :func:`wrap` on Llama-family causal LMs, :func:`generate` (per-row self-speculative decoding
  and per-row early exit), :class:`CausalLMExits`, :class:`DecodeInfo`

On import (before torch), adaexit raises oneDNN's primitive cache to :data:`ONEDNN_PRIMITIVE_CACHE` entries
unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (or ``DNNL_PRIMITIVE_CACHE_CAPACITY``) is already set: see the
comment below.
"""

import os

# Sparse execution runs each convolution at many sub-batch sizes (a batch of 256 can give a node any of 256
# sizes), and oneDNN keeps one compiled CPU primitive per shape in an LRU cache of 1,024 entries by default.
# The demo's systems cycle through more shapes than that, so most calls missed and recompiled (~0.7 ms per
# convolution on a 2-core CPU): the adaptive models took 15-37% longer than with a larger cache, the plain
# models not at all. oneDNN reads the capacity when it creates its first primitive, so this runs before torch
# is imported; a value the user set (or the older DNNL_ name, which oneDNN also reads) is kept.
ONEDNN_PRIMITIVE_CACHE = 16384
if not any(f"{prefix}_PRIMITIVE_CACHE_CAPACITY" in os.environ for prefix in ("ONEDNN", "DNNL")):
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_PRIMITIVE_CACHE)

from .wrappers import wrap
from .decoding import CausalLMExits, DecodeInfo, generate
from .anytime import EANN, AnytimeRunner, anytime_curve, anytime_predict
from .base import AdaptiveModel, ExitInfo
from .calibration import CalibrationPoint, CalibrationResult, calibrate
from .cascade import Cascade, NetworkSelectionPolicy, SelectorPolicy, train_reinforce
from .early_exit import EarlyExitNet
from .evaluation import cascade_oracle, oracle
from .executor import Node, execute
from .heads import ExitHead, LogitsHead
from .policies import (
    ConfidencePolicy,
    LearnedPolicy,
    NeverExitPolicy,
    PatiencePolicy,
    Policy,
    RoutingPolicy,
)
from .routing import D2NN, Controller, D2NNTrainer, cascade_d2nn, chain_d2nn, hierarchy_d2nn, high_low_d2nn
from .serving import Server
from .stream import stream
from .training import MultiExitLoss, train, train_classifier

__version__ = "0.1.0"

__all__ = [
    "AdaptiveModel",
    "AnytimeRunner",
    "CalibrationPoint",
    "CalibrationResult",
    "Cascade",
    "CausalLMExits",
    "ConfidencePolicy",
    "Controller",
    "D2NN",
    "D2NNTrainer",
    "DecodeInfo",
    "EANN",
    "EarlyExitNet",
    "ExitHead",
    "ExitInfo",
    "LearnedPolicy",
    "LogitsHead",
    "MultiExitLoss",
    "NetworkSelectionPolicy",
    "NeverExitPolicy",
    "Node",
    "PatiencePolicy",
    "Policy",
    "RoutingPolicy",
    "SelectorPolicy",
    "Server",
    "anytime_curve",
    "anytime_predict",
    "calibrate",
    "cascade_d2nn",
    "cascade_oracle",
    "chain_d2nn",
    "execute",
    "generate",
    "hierarchy_d2nn",
    "high_low_d2nn",
    "oracle",
    "stream",
    "train",
    "train_classifier",
    "train_reinforce",
    "wrap",
]
