"""The chaos run: seeded random reloads, stops, kills, pauses, outages and run-table
locks against worker processes, with invariants checked afterwards.

    python -m tests.chaos --backend B --nodes N --seconds S --seed K

- `events`: the event sequence, drawn from the seed alone (same seed, same events);
- `nodes`: the worker processes, their configs, proxies and what they left behind;
- `invariants`: the checks, pure functions of a recorded `History` (no database);
- `report`: one line per invariant, or the violations with the events before them;
- `run`: puts them together against a real database.

Importing the package or any module in it touches no database.
"""
