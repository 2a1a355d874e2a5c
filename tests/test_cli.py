"""`python -m adaexit info`: versions and the kernel backend chosen per device."""

import pytest

from adaexit.__main__ import main


def test_info_reports_the_cpu_backend(capsys, monkeypatch):
    monkeypatch.setenv("ADAEXIT_BACKEND", "auto")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    assert "cpu     -> torch" in out


def test_info_reports_the_interpreter(capsys, monkeypatch):
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    monkeypatch.setenv("ADAEXIT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "interpreter  on" in out and "cpu     -> triton" in out


def test_info_rejects_an_unknown_backend(monkeypatch):
    monkeypatch.setenv("ADAEXIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ADAEXIT_BACKEND='cuda'"):
        main(["info"])
