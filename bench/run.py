"""Run the benchmarks: `python -m bench.run NAME [ARGS]` or `python -m bench.run all`.
Results: bench/results/NAME.json and NAME.md (see bench/README.md)."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("hypernet_step", "orchestration", "scale", "time_to_target")  # `all`: speed and cost
FIDELITY = "fidelity"  # the papers' claims reproduced: trains for minutes, run by name only


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in (*BENCHMARKS, FIDELITY, "all"):
        print(f"usage: python -m bench.run {{{'|'.join(BENCHMARKS)}|all|{FIDELITY}}} [ARGS]", file=sys.stderr)
        sys.exit(2)
    for name in (BENCHMARKS if args[0] == "all" else (args[0],)):
        module = importlib.import_module(f"bench.{name}")
        if name in ("time_to_target", FIDELITY):
            module.main(args[1:] if args[0] == name else [])
        elif name == "hypernet_step":
            module.main([])
        else:
            module.main()


if __name__ == "__main__":
    main()
