"""What the applications share: where they cache what they train or download, and their progress log."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/adaexit/<name>`` (``~/.cache/adaexit/<name>`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaexit" / name


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)
