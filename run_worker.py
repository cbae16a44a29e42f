#!/usr/bin/env python3
"""Entry point: `python run_worker.py --help`."""
from worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
