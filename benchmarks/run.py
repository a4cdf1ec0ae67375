"""Run every benchmark (``make bench``): ``python -m benchmarks.run [NAME ...]``.

Each entry of :data:`BENCHMARKS` is a module with a ``main(argv)`` that prints its own
tables. A module that does not exist (yet) is skipped with a note; a benchmark that fails
is reported and the others still run, and the exit status is then non-zero.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

BENCHMARKS = (
    "benchmarks.langevin",
    "benchmarks.pyramid",
    "benchmarks.train_throughput",
    "benchmarks.presets",
)
"""Module names, run in this order; add new benchmarks here."""


def load(name: str):
    """The benchmark module, or None if it does not exist (other import errors propagate)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name or name.startswith(f"{e.name}."):  # the module itself is missing
            return None
        raise


def run_one(name: str) -> bool:
    """Run one benchmark with its default options; False if it failed."""
    try:
        module = load(name)
    except Exception:
        traceback.print_exc()
        print(f"== {name}: FAILED to import", flush=True)
        return False
    if module is None:
        print(f"== {name}: not present, skipped", flush=True)
        return True
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        module.main([])  # [] so that it does not read this command line
    except (Exception, SystemExit):
        traceback.print_exc()
        print(f"== {name}: FAILED after {time.perf_counter() - start:.0f} s", flush=True)
        return False
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks (default: all of :data:`BENCHMARKS`); 1 if any failed."""
    args = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") for a in args):
        print(__doc__)
        return 0 if set(args) <= {"-h", "--help"} else 2
    wanted = [n if "." in n else f"benchmarks.{n}" for n in args] or list(BENCHMARKS)
    results = [run_one(name) for name in wanted]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
