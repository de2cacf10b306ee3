"""Check that a benchmark script exists and that its argument parser accepts the given arguments, without
running it: the script's ``main()`` runs until ``parse_args`` returns, then stops.

    python benchmarks/argcheck.py benchmarks/coat_memory.py --model llama2-7b-cut --layers 32 --micro 1,2,4

Prints ``ok SCRIPT ARGS`` and exits 0; an unknown or malformed argument is argparse's own error (exit 2);
a missing script or one without ``main()`` exits 1; a script whose imports are not installed here (e.g.
torchtitan on a CPU machine) prints ``skipped`` with the missing module and exits 0. Used by
``benchmarks/multi_gpu.sh`` in ``MODE=dry``.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


class _Parsed(Exception):
    pass


def check(script: str, argv: list[str]) -> int:
    path = Path(script)
    if not path.is_file():
        print(f"argcheck: {script}: no such script", file=sys.stderr)
        return 1
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module = runpy.run_path(str(path), run_name="__argcheck__")
    except ModuleNotFoundError as e:
        print(f"skipped {script}: needs {e.name}, not installed here")
        return 0
    if "main" not in module:
        print(f"argcheck: {script} has no main()", file=sys.stderr)
        return 1
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *argv]
    try:
        module["main"]()
    except _Parsed:
        print(f"ok {script} {' '.join(argv)}")
        return 0
    finally:
        argparse.ArgumentParser.parse_args = original
    print(f"argcheck: {script}'s main() returned without parsing arguments", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(check(sys.argv[1], sys.argv[2:]))
