"""Command line: ``python -m adaexit info`` (environment report), ``demo`` (the main job: Fashion-MNIST),
``encoders`` (Hugging Face encoders with early exits) and ``llm`` (SmolLM2 decoding with exits)."""

from __future__ import annotations

import argparse
import platform
import sys

import numpy
import torch

from . import __version__
from .apps.encoders import job as encoders_job
from .apps.fashion_mnist import demo as demo_job
from .apps.llm import job as llm_job
from .cost import device_name
from .kernels import _dispatch


def info() -> str:
    """Versions, the kernel backend chosen per device, and whether Triton's interpreter is on."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"adaexit      {__version__}",
        f"python       {platform.python_version()} ({platform.machine()})",
        f"torch        {torch.__version__}",
        f"triton       {triton_version}",
        f"numpy        {numpy.__version__}",
        f"cpu threads  {torch.get_num_threads()}",
        f"interpreter  {'on' if _dispatch.interpreter_enabled() else 'off'} (TRITON_INTERPRET)",
        f"requested    ADAEXIT_BACKEND={_dispatch.requested_backend()}",
    ]
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        name = device_name(device)
        try:
            backend = _dispatch.backend_for(device)
        except RuntimeError as err:
            backend = f"unavailable ({err})"
        lines.append(f"backend      {device:<7} -> {backend:<6} [{name}]")
    if not torch.cuda.is_available():
        lines.append("gpu          none visible: CPU tensors use the torch references")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaexit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions and the kernel backend per device")
    jobs = {
        "demo": (demo_job, "train, calibrate and measure adaptive models on Fashion-MNIST"),
        "encoders": (encoders_job, "Hugging Face encoders with early exits: MiniLM on Debian descriptions, a ViT"),
        "llm": (llm_job, "decoder LLM: SmolLM2-135M with trained exits, self-speculative and early-exit decoding"),
    }
    for name, (job, help_text) in jobs.items():
        job.add_arguments(commands.add_parser(name, help=help_text, description=job.__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    return jobs[args.command][0].run(args)


if __name__ == "__main__":
    sys.exit(main())
