"""Cron expressions: the five-field syntax, parsed once, and their fire times in a
time zone, with cron(8)'s day rule and this worker's DST rules.

Syntax (anything else is refused): five fields `minute hour day-of-month month
day-of-week` made of numbers, names (JAN-DEC, SUN-SAT, any case), `*`, ranges
`a-b` with a <= b, lists `a,b`, and steps on `*` or on a range (`*/5`, `8-18/2`);
or one of @hourly, @daily, @weekly, @monthly, @yearly (any case).

Day rule (cron(8): cronie, Vixie cron): when both day fields are restricted, a day
matches either (OR); when either field starts with `*`, it must match both (AND).

DST rules: a job whose hour field covers all 24 hours follows the real clock: each
of its times that exists runs, both occurrences of a repeated time run, a skipped
time does not run. Every other job runs once per wall-clock time: a repeated time
at its first occurrence, a skipped time at the change (the first instant after
the skipped interval).
"""
from __future__ import annotations

import calendar
from bisect import bisect_right
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Iterator

SEARCH_YEARS = 28   # the Gregorian calendar's weekdays repeat every 28 years (1901-2099)

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, lowest, highest, names for lowest, lowest+1, ...)
_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
           ("month", 1, 12, _MONTHS), ("day-of-week", 0, 7, _DAYS))
_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
           "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_PLANS_KEPT = 16    # days whose offset (or fire times) a CronTimes keeps


class CronSyntaxError(ValueError):
    """An expression this worker does not accept; the message says why."""


@dataclass(frozen=True)
class CronExpression:
    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: tuple[int, ...]
    days_of_week: frozenset[int]    # 0 = Sunday (7 is folded into 0)
    days_and: bool                  # a day field starts with '*': both must match
    day_minutes: tuple[int, ...]    # minute of the day of each (hour, minute), sorted

    @property
    def every_hour(self) -> bool:
        """The hour field covers all 24 hours: the job follows the real clock."""
        return len(self.hours) == 24

    def matches_day(self, day: date) -> bool:
        in_month = day.day in self.days_of_month
        in_week = day.isoweekday() % 7 in self.days_of_week
        return (in_month and in_week) if self.days_and else (in_month or in_week)

    def days_from(self, start: date, step: int = 1) -> Iterator[date]:
        """The matching days from `start` on (step 1) or back (step -1), for
        SEARCH_YEARS years; raise CronSyntaxError when there is none."""
        last_year = start.year + step * SEARCH_YEARS
        year, month = start.year, start.month
        while (year - last_year) * step <= 0:
            if month in self.months:
                days = range(1, calendar.monthrange(year, month)[1] + 1)
                for number in (days if step > 0 else reversed(days)):
                    day = date(year, month, number)
                    if (day - start).days * step >= 0 and self.matches_day(day):
                        yield day
            month += step
            if month in (0, 13):
                year, month = year + step, 12 if step < 0 else 1
        raise CronSyntaxError(f"it has no fire time within {SEARCH_YEARS} years")

    def check_fires(self, today: date) -> None:
        """Raise CronSyntaxError if no day within SEARCH_YEARS from `today` matches."""
        next(self.days_from(today))


def parse(text: str) -> CronExpression:
    """The expression, or CronSyntaxError naming what is wrong."""
    stripped = text.strip(" \t")
    if not stripped:
        raise CronSyntaxError("empty")
    odd = next((c for c in stripped if not c.isascii() or (c.isspace() and c not in " \t")),
               None)
    if odd is not None:   # split() would take a no-break space for a separator
        raise CronSyntaxError(f"non-ASCII character {odd!r}" if not odd.isascii() else
                              f"the fields are separated by spaces or tabs, not {odd!r}")
    fields = _MACROS.get(stripped.lower(), stripped).split()
    if stripped.startswith("@") and stripped.lower() not in _MACROS:
        raise CronSyntaxError(f"unknown {stripped!r} (use @hourly, @daily, @weekly, "
                              "@monthly or @yearly)")
    if len(fields) != 5:
        raise CronSyntaxError(f"{len(fields)} fields; give 5 (minute hour day-of-month "
                              "month day-of-week, no seconds or year field)")
    values = [_field(spec, field) for spec, field in zip(_FIELDS, fields)]
    minutes, hours, days_of_month, months, days_of_week = values
    return CronExpression(
        text=stripped, minutes=tuple(sorted(minutes)), hours=tuple(sorted(hours)),
        days_of_month=frozenset(days_of_month), months=tuple(sorted(months)),
        days_of_week=frozenset(day % 7 for day in days_of_week),
        days_and=fields[2].startswith("*") or fields[4].startswith("*"),
        day_minutes=tuple(sorted(h * 60 + m for h in hours for m in minutes)))


def _field(spec: tuple, text: str) -> set[int]:
    name, lowest, highest, names = spec
    values: set[int] = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            step = _number(step_text)
            if step is None or step == 0:
                raise CronSyntaxError(f"{name} {_shown(text)}: the step after '/' must be a "
                                      "number >= 1")
        if span == "*":
            start, end = lowest, highest
        else:
            first, dash, last = span.partition("-")
            start = _value(first, name, lowest, highest, names, text)
            end = _value(last, name, lowest, highest, names, text) if dash else start
            if slash and not dash:
                raise CronSyntaxError(f"{name} {_shown(text)}: a step needs '*' or a range "
                                      "before it ('*/10', '0-30/10')")
            if start > end:
                raise CronSyntaxError(f"{name} {_shown(text)}: the range {span!r} runs "
                                      "backwards (ranges do not wrap)")
        values.update(range(start, end + 1, step))
    return values


def _value(text: str, name: str, lowest: int, highest: int, names: tuple[str, ...],
           field: str) -> int:
    number = _number(text)
    if number is not None:
        if lowest <= number <= highest:
            return number
        shown = number if number < 10 ** 9 else _shown(text)
        raise CronSyntaxError(f"{name} {_shown(field)}: {shown} is outside "
                              f"{lowest}-{highest}")
    if text.upper() in names:   # ASCII only (parse refuses the rest): 'ſun'.upper() is 'SUN'
        return names.index(text.upper()) + lowest
    allowed = f" or {names[0]}-{names[-1]}" if names else ""
    raise CronSyntaxError(f"{name} {_shown(field)}: {_shown(text)} is not a number "
                          f"{lowest}-{highest}"
                          f"{allowed} (L, W, #, ?, H and the like are not supported)")


def _shown(text: str) -> str:
    """repr, shortened: the message is one line even for a 5,000-digit field."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def _number(text: str) -> int | None:
    """ASCII digits as a number (None otherwise); more than 9 digits is kept as
    10**9, larger than any field allows (int() refuses 4,300 digits)."""
    if not (text.isdigit() and text.isascii()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10 ** 9


class CronTimes:
    """The fire times of one parsed expression in one zone, as epoch seconds."""

    def __init__(self, expression: CronExpression, zone: tzinfo):
        self.expression = expression
        self.zone = zone
        self._plans: dict[date, tuple[float, list[float] | None]] = {}

    def next_after(self, instant: float) -> float:
        """The first fire time strictly after `instant`."""
        for day in self.expression.days_from(self._local_day(instant) - timedelta(days=1)):
            fires = [t for t in self._day_fires(day, instant, after=True) if t > instant]
            if fires:
                return min(fires)
        raise AssertionError("unreachable: days_from raises when it runs out")

    def previous_at_or_before(self, instant: float) -> float:
        """The last fire time at or before `instant`."""
        start = self._local_day(instant) + timedelta(days=1)
        for day in self.expression.days_from(start, step=-1):
            fires = [t for t in self._day_fires(day, instant, after=False) if t <= instant]
            if fires:
                return max(fires)
        raise AssertionError("unreachable: days_from raises when it runs out")

    def _local_day(self, instant: float) -> date:
        return datetime.fromtimestamp(instant, self.zone).date()

    def _day_fires(self, day: date, instant: float, after: bool) -> list[float]:
        """The day's fire times nearest `instant` on the asked side: a bisection
        on the day's minutes, or, on a day the offset changes, on its fire times
        (worked out once per such day)."""
        midnight = (day.toordinal() - _EPOCH_ORDINAL) * 86400
        offset, fires = self._day_plan(day, midnight)
        if fires is None:
            minutes = self.expression.day_minutes
            position = bisect_right(minutes, (instant + offset - midnight) // 60)
            nearest = position if after else position - 1
            return [midnight + minutes[nearest] * 60 - offset] \
                if 0 <= nearest < len(minutes) else []
        position = bisect_right(fires, instant)
        nearest = position if after else position - 1
        return [fires[nearest]] if 0 <= nearest < len(fires) else []

    def _day_plan(self, day: date, midnight: int) -> tuple[float, list[float] | None]:
        """(the day's UTC offset, None), or (0, its sorted fire times) on a day the
        offset changes. Kept for the last days asked: a schedule asks about the
        same few days again and again."""
        plan = self._plans.get(day)
        if plan is None:
            offsets = {self._offset(wall, fold) for wall in (midnight, midnight + 86400)
                       for fold in (0, 1)}
            if len(offsets) == 1:
                plan = (offsets.pop(), None)
            else:
                fires: set[float] = set()
                for minute in self.expression.day_minutes:
                    fires.update(self._instants(midnight + minute * 60))
                plan = (0.0, sorted(fires))
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[day] = plan
        return plan

    def _offset(self, wall: float, fold: int) -> float:
        moment = datetime(1970, 1, 1) + timedelta(seconds=wall)
        offset = moment.replace(tzinfo=self.zone, fold=fold).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0

    def _instants(self, wall: float) -> list[float]:
        """The instants a wall-clock time (local seconds since 1970) fires at."""
        before, after = self._offset(wall, 0), self._offset(wall, 1)
        if before == after:
            return [wall - before]
        if before > after:   # clocks went back: the time happens twice
            return [wall - before, wall - after] if self.expression.every_hour \
                else [wall - before]
        if self.expression.every_hour:   # a skipped time does not exist on the real clock
            return []
        return [self._change_in_gap(wall - after, wall - before, after)]

    def _change_in_gap(self, low: float, high: float, offset_after: float) -> float:
        """The instant the clocks jumped forward, between `low` (still before it)
        and `high` (after it)."""
        low, high = int(low), int(high)
        while high - low > 1:
            middle = (low + high) // 2
            if self._offset_at(middle) == offset_after:
                high = middle
            else:
                low = middle
        return float(high)

    def _offset_at(self, instant: float) -> float:
        offset = datetime.fromtimestamp(instant, self.zone).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0
