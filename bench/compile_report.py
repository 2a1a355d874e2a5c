"""Compile every adaexit kernel ahead of time for sm_80 and sm_90 and report its resources.

    python -m bench.compile_report [--json PATH]

No GPU is needed: Triton compiles for a named target, and the cubin's resource usage comes from the
``cuobjdump`` that ships in the triton wheel. A non-zero ``spill`` column (stack or local memory)
means registers spilled; the test ``tests/test_compile_report.py`` asserts there are none.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from adaexit.kernels import all_specs
from adaexit.kernels._compile import TARGETS, compile_spec


def report() -> list[dict]:
    rows = []
    for spec in all_specs():
        for arch in TARGETS:
            result = compile_spec(spec, arch)
            rows.append({**asdict(result), "spills": result.spills, "num_warps": spec.num_warps})
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'kernel launch':<50} {'arch':>5} {'regs':>5} {'spills':>7} {'shared B':>9} {'warps':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['label']:<50} {'sm_' + str(r['arch']):>5} {r['registers']:>5} {r['spills']:>7} "
            f"{r['shared']:>9} {r['num_warps']:>5}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = report()
    print(format_table(rows))
    spilled = [r for r in rows if r["spills"]]
    print(f"\n{len(rows)} compilations, {len(spilled)} with spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
