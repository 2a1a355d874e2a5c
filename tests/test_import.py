"""What ``import adaexit`` does to the process before anything runs."""

import os
import subprocess
import sys

import pytest

# Records the cache setting at the moment torch is first imported (oneDNN reads it once, at its first
# primitive: it must be in place before torch can run anything), then imports adaexit.
_SCRIPT = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
        return None
sys.meta_path.insert(0, Spy())
import adaexit
print(seen[0], os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
"""


@pytest.mark.parametrize("given", [None, ("ONEDNN", "64"), ("DNNL", "64")])
def test_import_raises_the_onednn_primitive_cache_before_torch_unless_set(given):
    """Sparse execution gives each convolution many sub-batch shapes; oneDNN's default LRU of 1,024
    compiled primitives thrashed on the demo (see adaexit/__init__.py). Importing adaexit raises it
    before torch is imported; a value the user set, under either name oneDNN reads, is kept."""
    import adaexit

    env = {k: v for k, v in os.environ.items() if not k.endswith("_PRIMITIVE_CACHE_CAPACITY")}
    if given is not None:
        env[f"{given[0]}_PRIMITIVE_CACHE_CAPACITY"] = given[1]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    at_torch_import, after = proc.stdout.split()
    expected = {None: str(adaexit.ONEDNN_PRIMITIVE_CACHE), "ONEDNN": "64", "DNNL": "None"}[given and given[0]]
    assert at_torch_import == after == expected
