"""python -m tests.chaos --backend B --nodes N --seconds S --seed K [--exclude KINDS]"""
from __future__ import annotations

import argparse
import sys

from .events import JOB_MODES, KINDS, MUTATIONS


def parse(argv: list[str] | None = None):
    from .run import Settings
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Seeded random reloads, stops, kills, pauses, outages and run-table "
                    "locks against worker processes; the invariants checked afterwards. "
                    "Exit 0: no violation; 1: a violation (printed with its seed and the "
                    "events that led to it).")
    parser.add_argument("--backend", required=True,
                        choices=("sqlite", "mariadb", "postgresql", "sqlserver"))
    parser.add_argument("--nodes", type=int, default=1, help="daemon nodes (cluster mode "
                        "when more than 1)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    kinds = list(KINDS) + [f"reload:{m}" for m in MUTATIONS] + [f"job:{m}" for m in JOB_MODES]
    parser.add_argument("--exclude", default="", metavar="KINDS",
                        help=f"comma-separated event kinds never to draw: {', '.join(kinds)}")
    parser.add_argument("--keep", action="store_true",
                        help="keep the processes' logs and configs even without a "
                             "violation, and the recorded history (history.pickle)")
    args = parser.parse_args(argv)
    exclude = frozenset(k.strip() for k in args.exclude.split(",") if k.strip())
    unknown = exclude - set(kinds)
    if unknown:
        parser.error(f"unknown event kind(s) in --exclude: {', '.join(sorted(unknown))}")
    if args.nodes < 1 or args.seconds <= 0:
        parser.error("--nodes must be at least 1 and --seconds positive")
    return Settings(args.backend, args.nodes, args.seconds, args.seed, exclude, args.keep)


def main(argv: list[str] | None = None) -> int:
    from .run import main as run
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
