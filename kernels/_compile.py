"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Each op module (``ops/<op>.py``) lists representative launches in ``COMPILE_SPECS``; :func:`compile_spec`
compiles one for a compute capability (80 = A100, 90 = H100) and reads the resource usage that
``cuobjdump -res-usage`` reports for the cubin: registers, stack, local memory (spills) and shared memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

TARGETS = (80, 90)


@dataclass(frozen=True)
class CompileSpec:
    """One representative launch of a kernel: its Triton signature and constexpr values."""

    label: str
    fn: object  # a @triton.jit function
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class CompileResult:
    label: str
    arch: int
    kernel: str
    registers: int
    stack: int
    local: int
    shared: int

    @property
    def spills(self) -> int:
        """Bytes of spill traffic: any stack or local memory means registers spilled."""
        return self.stack + self.local


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: CompileSpec, arch: int) -> CompileResult:
    """Compile ``spec`` for ``sm_<arch>`` and return the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump output for {spec.label}:\n{report}")
    name, reg, stack, shared, local = match.groups()
    # Dynamic shared memory (Triton's scratch for reductions/layout conversions) is not in the cubin.
    shared_total = int(shared) + int(compiled.metadata.shared)
    return CompileResult(spec.label, arch, name, int(reg), int(stack), int(local), shared_total)
