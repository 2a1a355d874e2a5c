"""README's usage example runs as written (on small synthetic data)."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="README's example wraps a torchvision ResNet")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    namespace = {
        "train_loader": [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)],
        "val_loader": [(x, y)],
        "x": x[:8],
    }
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    logits, info = namespace["logits"], namespace["info"]
    assert logits.shape == (8, 10)
    assert info.exit_index.shape == (8,)
