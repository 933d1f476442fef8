"""All benchmarks in one command: ``python -m bench`` (``scripts/bench.sh`` sets up first).

Runs, in order, ingest (node vs dcmtk storescp vs Orthanc, 1 and 4 associations), end
to end on a 300-slice chest CT (2 rounds) and on 600 slices (1 round), and, with
``--load``, the 2-minute load test; each prints its markdown table to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bench import e2e, ingest, load


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks in turn; the exit status is the first non-zero one, or 0."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--load", action="store_true", help="also run bench.load (about 5 minutes)")
    args = parser.parse_args(argv)
    steps: list[tuple[str, list[str], Callable[[list[str] | None], int]]] = [
        ("ingest", [], ingest.main),
        ("e2e, 300 slices", ["--rounds", "2"], e2e.main),
        ("e2e, 600 slices", ["--rounds", "1", "--slices", "600"], e2e.main),
    ]
    if args.load:
        steps.append(("load", [], load.main))
    status = 0
    for name, step_args, run in steps:
        print(f"\n<!-- bench: {name} -->", flush=True)
        status = status or run(step_args)
    return status


if __name__ == "__main__":
    sys.exit(main())
