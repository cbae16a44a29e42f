"""python -m tests.sqlserver --port PORT --database FILE [--faults FILE]

Prints `listening on 127.0.0.1:PORT` once it accepts connections; stops on SIGTERM.
A bad argument (port in use, database that cannot be created, faults file that does
not parse) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
from pathlib import Path

from .faults import FaultsError
from .server import TdsServer
from .types import register_sqlite_types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sqlserver",
                                     description="A TDS 7.4 test server over one SQLite file.")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--database", type=Path, required=True, help="the SQLite file")
    parser.add_argument("--faults", type=Path, help="YAML list of faults, re-read on change")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s tds %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    register_sqlite_types()
    try:
        server = TdsServer(args.database, args.faults, args.port)
    except OSError as exc:
        print(f"tds server: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"tds server: cannot open database {args.database}: {exc}", file=sys.stderr)
        return 2
    except FaultsError as exc:
        print(f"tds server: bad faults file: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
        target=server.stop, daemon=True).start())
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
