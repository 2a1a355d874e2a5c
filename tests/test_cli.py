"""`python -m adaexit info`: versions and the kernel backend chosen per device."""

import os
import subprocess
import sys

import pytest

from adaexit.__main__ import main
from adaexit.kernels import set_backend


def test_info_reports_the_cpu_backend(capsys, use_backend):
    use_backend("auto")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    assert "cpu     -> torch" in out


def test_info_reports_the_interpreter(capsys, use_backend):
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    use_backend("triton")  # conftest sets TRITON_INTERPRET=1 before adaexit is imported
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "interpreter  on" in out and "cpu     -> triton" in out


def test_an_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="backend='cuda'"):
        set_backend("cuda")
    # ADAEXIT_BACKEND is read once, when adaexit is imported: a wrong value stops the import, named
    env = {**os.environ, "ADAEXIT_BACKEND": "cuda"}
    proc = subprocess.run([sys.executable, "-m", "adaexit", "info"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "ADAEXIT_BACKEND='cuda'" in proc.stderr

