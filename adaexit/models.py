"""Moved to :mod:`adaexit.apps.fashion_mnist.models`; this alias keeps earlier imports working."""

import sys

from .apps.fashion_mnist import models as _models

sys.modules[__name__] = _models
