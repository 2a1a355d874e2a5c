"""Moved to :mod:`adaexit.apps.fashion_mnist.demo`; this alias keeps earlier imports working."""

import sys

from .apps.fashion_mnist import demo as _demo

sys.modules[__name__] = _demo  # the same module object: attribute patches reach the real one
