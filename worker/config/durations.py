"""Durations as the config writes them ('500ms', '30s', '1h30m') and as we show them."""
from __future__ import annotations

import math
import re
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '500ms', '30s', '5m', '1h30m'."""
    if isinstance(value, bool):
        raise ValueError("a duration, not true/false")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"not a duration: {value!r} (use a finite number of seconds)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total, matched = 0, 0.0, False
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if not m:
                break
            total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
            matched = True
            while pos < len(text) and text[pos] == " ":
                pos += 1
        if matched and pos == len(text) and math.isfinite(total):
            return total
    raise ValueError(f"not a duration: {value!r} (use seconds, or a number with "
                     "ms, s, m, h or d, e.g. '30s', '5m', '1h30m', '7d')")


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
