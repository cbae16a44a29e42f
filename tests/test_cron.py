"""worker.cron: the syntax accepted and refused, and the fire times compared with
two oracles not built on our code: cron(8)'s own loop (cronie's cron.c and
entry.c, written below as a small minute-by-minute model) and APScheduler 3.11's
CronTrigger, over generated expressions around every 2026 DST change of five zones.
Each known difference of each oracle is a named class; any other difference fails."""
from __future__ import annotations

import calendar
import random
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from worker.cron import CronSyntaxError, CronTimes, parse
from worker.scheduler import CronSchedule

ACCEPTED = ["* * * * *", "*/5 * * * *", "0 3 * * *", "0 8-18/2 * * MON-FRI",
            "0,30 * 1,15 JAN-jun sun", "59 23 31 12 7", "0 0 29 2 *", "0 0 */2 * 1",
            "@hourly", "@DAILY", "@Weekly", "@monthly", "@yearly", "5-5 * * * *"]
REFUSED = {
    "0 0 30 2 *": "no fire time within 28 years",
    "0 0 31 4,6 *": "no fire time within 28 years",
    "* * * * * * 2020": "7 fields",
    "* * * * * *": "6 fields",
    "0 */5 * * * *": "6 fields",
    "10-5 * * * *": "runs backwards",
    "5/10 * * * *": "a step needs '*' or a range",
    "*/0 * * * *": "the step after '/' must be a number >= 1",
    "L * * * *": "not a number 0-59",
    "0 0 L * *": "not a number 1-31",
    "0 0 15W * *": "not a number 1-31",
    "0 0 * * 5#3": "not a number 0-7 or SUN-SAT",
    "0 0 ? * MON": "not a number 1-31",
    "H * * * *": "not a number 0-59",
    "60 * * * *": "60 is outside 0-59",
    "0 0 * * SAT-SUN": "runs backwards",
    "@reboot": "unknown '@reboot'",
    "@annually": "unknown '@annually'",
    "": "empty",
    # str.split() and str.strip() also take Unicode spaces; cron(8) takes spaces and tabs
    "0\u00a00 * * *": "non-ASCII character '\\xa0'",
    "0 0\u2003* * *": "non-ASCII character '\\u2003'",
}


@pytest.mark.parametrize("expression", ACCEPTED)
def test_the_documented_syntax_is_accepted(expression):
    parse(expression).check_fires(date(2026, 1, 1))


@pytest.mark.parametrize("expression, reason", REFUSED.items(), ids=list(REFUSED))
def test_anything_else_is_refused_with_the_reason(expression, reason):
    with pytest.raises(CronSyntaxError, match=None) as refused:
        parse(expression).check_fires(date(2026, 1, 1))
    assert reason in str(refused.value)


def test_a_day_once_in_28_years_is_accepted():
    # 29 February on a Sunday (day-of-week starts with '*': AND): 2032, 2060, ...
    parse("0 0 29 2 */7").check_fires(date(2033, 1, 1))


# --- the oracle comparison -----------------------------------------------------------

ZONES = ("Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe",
         "Pacific/Chatham")
FIELD_CHOICES = (
    ("*", "0", "30", "*/7", "*/15", "0,30", "5-20/5", "45", "10-50", "59"),
    ("*", "0", "1", "2", "3", "23", "*/2", "0-23", "1-3", "2,14", "*/1", "0-23/1", "22-23"),
    ("*", "1", "*/2", "5", "1-15", "25-31", "4,5,6"),
    ("*", "3,4", "MAR-NOV", "*/2", "10", "9-11", "jan-dec"),
    ("*", "0", "SUN", "1-5", "sat,sun", "*/2", "0-6", "7", "6"),
)
NAMED = ["0 */1 * * *", "0 0-23 * * *", "@HOURLY", "@daily", "*/30 1 * * *", "*/7 * * * *",
         "30 23 * 4 6", "0 0 */2 * 1", "30 2 * * *", "45 2 * * *", "15 3 * * *",
         "*/30 2 * * *", "0 0 * * *", "0 2-3 * * *"]
RANDOM_EXPRESSIONS = 240
WINDOW = 25 * 3600    # seconds on each side of a change


def expressions() -> list[str]:
    chooser = random.Random(2026)
    generated = {" ".join(chooser.choice(choices) for choices in FIELD_CHOICES)
                 for _ in range(RANDOM_EXPRESSIONS)}
    return NAMED + sorted(generated - set(NAMED))


def changes(zone: ZoneInfo, year: int = 2026) -> list[int]:
    """The instants of the year at which the zone's UTC offset changes."""
    def offset(instant: int):
        return datetime.fromtimestamp(instant, zone).utcoffset()
    start = int(datetime(year, 1, 1, tzinfo=timezone.utc).timestamp())
    found = []
    for hour in range(start, start + 366 * 86400, 3600):
        if offset(hour) != offset(hour + 3600):
            low, high = hour, hour + 3600
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset(middle) == offset(hour) else (low, middle)
            found.append(high)
    return found


# cron(8) as cronie runs it: entry.c's fields and flags, cron.c's minute loop.

MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
          "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}
NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
             "dec"], 4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}
BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


class CronEntry:
    """entry.c: one bit set per field, and the *_STAR flags from a leading '*'."""

    def __init__(self, expression: str):
        fields = MACROS.get(expression.lower(), expression).split()
        self.sets = [self._field(index, text) for index, text in enumerate(fields)]
        if 7 in self.sets[4]:
            self.sets[4].add(0)
        self.min_star, self.hr_star, dom_star, _, dow_star = (f[0] == "*" for f in fields)
        self.dom_or_dow = not (dom_star or dow_star)
        self.wild = self.min_star or self.hr_star

    @staticmethod
    def _field(index: int, text: str) -> set[int]:
        low, high = BOUNDS[index]
        names = NAMES.get(index, [])

        def number(word: str) -> int:
            return names.index(word.lower()) + low if word.lower() in names else int(word)
        bits: set[int] = set()
        for item in text.split(","):
            span, _, step = item.partition("/")
            first, _, last = span.partition("-")
            start, end = (low, high) if span == "*" else (number(first), number(last or first))
            bits.update(range(start, end + 1, int(step or 1)))
        return bits

    def matches(self, wall: datetime) -> bool:
        minutes, hours, doms, months, dows = self.sets
        in_dom, in_dow = wall.day in doms, (wall.isoweekday() % 7) in dows
        day = (in_dom or in_dow) if self.dom_or_dow else (in_dom and in_dow)
        return wall.minute in minutes and wall.hour in hours and wall.month in months and day


def cron_loop(zone: ZoneInfo, start: int, end: int) -> list[tuple[int, int, bool, bool]]:
    """cron.c's main loop from `start` to `end` (epoch seconds, whole minutes), as
    (real minute, virtual minute, do wildcard jobs, do fixed-time jobs): what
    find_jobs() is asked each minute. Minutes count local wall time as cron does
    (time + GMToff)."""
    def clock(real: int) -> int:
        return (real + int(datetime.fromtimestamp(real, zone).utcoffset().total_seconds())) // 60
    asked = []
    virtual = clock(start)
    for real in range(start + 60, end + 1, 60):
        running = clock(real)
        diff = running - virtual
        if diff == 1:
            virtual = running
            asked.append((real, virtual, True, True))
        elif 1 < diff <= 5:                       # woke up late: each minute, all jobs
            while virtual < running:
                virtual += 1
                asked.append((real, virtual, True, True))
        elif 5 < diff <= 180:                     # clocks went forward
            asked.append((real, running, True, False))
            while virtual < running:
                virtual += 1
                asked.append((real, virtual, False, True))
        elif -180 <= diff <= 0:                   # clocks went back: wildcard jobs only
            asked.append((real, running, True, False))
        else:
            virtual = running
            asked.append((real, running, True, True))
    return asked


def cron_fires(entry: CronEntry, asked, walls: dict[int, datetime]) -> set[int]:
    fires = set()
    for real, virtual, wild, fixed in asked:
        if (wild if entry.wild else fixed) and entry.matches(walls[virtual]):
            fires.add(real)
    return fires


def apscheduler_fires(expression: str, zone: ZoneInfo, start: int, end: int) -> set[int]:
    from apscheduler.triggers.cron import CronTrigger
    fields = MACROS.get(expression.lower(), expression).split()
    days = sorted(CronEntry(expression).sets[4] - {7})
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")   # its 0 is Monday
    day_of_week = "*" if fields[4] == "*" else ",".join(names[(d - 1) % 7] for d in days)
    trigger = CronTrigger(minute=fields[0], hour=fields[1], day=fields[2], month=fields[3],
                          day_of_week=day_of_week, timezone=zone)
    fires, instant = set(), start
    while True:
        fire = trigger.get_next_fire_time(None, datetime.fromtimestamp(instant + 1, zone))
        if fire is None or fire.timestamp() > end:
            return fires
        instant = int(fire.timestamp())
        fires.add(instant)


def our_fires(times: CronTimes, start: int, end: int) -> set[int]:
    fires, instant = set(), start
    while (instant := int(times.next_after(instant))) <= end:
        fires.add(instant)
    return fires


def where(instant: int, zone: ZoneInfo, change: int) -> str:
    """Where an instant sits relative to the change: 'second' (the second occurrence
    of a repeated time), 'change' (the instant clocks jumped forward), 'gap-old'
    (a skipped wall time read with the offset before the change), or 'plain'."""
    before = datetime.fromtimestamp(change - 1, zone).utcoffset().total_seconds()
    after = datetime.fromtimestamp(change, zone).utcoffset().total_seconds()
    if after < before and change <= instant < change + (before - after):
        return "second"
    if after > before:
        if instant == change:
            return "change"
        if change < instant < change + (after - before):
            return "gap-old"
    return "plain"


def classify(oracle: str, ours: set[int], theirs: set[int], expression: str,
             zone: ZoneInfo, change: int) -> list[str]:
    """A known-difference class for each instant only one side has, or 'UNKNOWN'."""
    parsed, entry = parse(expression), CronEntry(expression)
    classes = []
    for instant, side in [(i, "ours") for i in ours - theirs] + \
                         [(i, oracle) for i in theirs - ours]:
        place = where(instant, zone, change)
        wall, changed = datetime.fromtimestamp(instant, zone), datetime.fromtimestamp(change, zone)
        spring = changed.utcoffset() > datetime.fromtimestamp(change - 1, zone).utcoffset()
        if oracle == "cron" and parsed.every_hour and not entry.wild and \
                (place, side) in {("second", "ours"), ("change", "cron")}:
            classes.append("cron: every hour not written with '*' (0-23) is fixed-time "
                           "there: once in a repeated hour, skipped times at the change")
        elif oracle == "cron" and not parsed.every_hour and entry.wild and \
                (place, side) in {("second", "cron"), ("change", "ours")}:
            classes.append("cron: a job with '*' in minute or hour but not every hour "
                           "runs in both occurrences of a repeated time and not at all "
                           "in a skipped one")
        elif oracle == "apscheduler" and entry.dom_or_dow:
            classes.append("apscheduler: both day fields restricted, it ANDs them")
        elif oracle == "apscheduler" and not parsed.every_hour and \
                (place, side) == ("second", "apscheduler"):
            classes.append("apscheduler: every job runs in both occurrences of a "
                           "repeated time")
        elif oracle == "apscheduler" and not parsed.every_hour and \
                (place, side) in {("change", "ours"), ("gap-old", "apscheduler")}:
            classes.append("apscheduler: a skipped time runs at that wall time read "
                           "with the old offset, or not at all, not at the change")
        elif oracle == "apscheduler" and side == "ours" and spring and place == "plain" \
                and wall.hour == 0 and wall.date() == changed.date() + timedelta(days=1):
            classes.append("apscheduler: after a day that sprang forward, it misses the "
                           "next day's runs before 01:00")
        elif oracle == "apscheduler" and side == "ours" and changed.minute != 0 and \
                place in ("second", "gap-old"):
            classes.append("apscheduler: a change not on the hour (Chatham's 02:45): it "
                           "misses the second occurrences of a repeated time, and real "
                           "times in the hour after a skipped interval")
        else:
            classes.append(f"UNKNOWN {oracle} {expression!r} {zone.key} "
                           f"{datetime.fromtimestamp(instant, zone).isoformat()} only "
                           f"{side} ({place})")
    return classes


def test_fire_times_match_cron8_and_apscheduler_but_for_the_known_differences():
    pytest.importorskip("apscheduler.triggers.cron")
    listed = expressions()
    cases, fires, differences = 0, 0, Counter()
    for name in ZONES:
        zone = ZoneInfo(name)
        for change in changes(zone):
            start, end = (change - WINDOW) // 60 * 60, change + WINDOW
            asked = cron_loop(zone, start, end)
            walls = {virtual: datetime(1970, 1, 1) + timedelta(minutes=virtual)
                     for _, virtual, _, _ in asked}
            for expression in listed:
                ours = our_fires(CronTimes(parse(expression), zone), start, end)
                cron = cron_fires(CronEntry(expression), asked, walls)
                aps = apscheduler_fires(expression, zone, start, end)
                cases, fires = cases + 1, fires + len(ours)
                differences.update(classify("cron", ours, cron, expression, zone, change))
                differences.update(classify("apscheduler", ours, aps, expression, zone,
                                            change))
    report = "\n".join(f"{count:6d}  {kind}" for kind, count in differences.most_common())
    print(f"\n{len(listed)} expressions, {cases} cases (expression x zone x change, "
          f"+-25 h), {fires} fire times\n{report}")
    assert len(listed) >= 200 and cases >= 2000
    assert not [kind for kind in differences if kind.startswith("UNKNOWN")], report
    assert set(differences) <= KNOWN_DIFFERENCES, report


KNOWN_DIFFERENCES = {
    "cron: every hour not written with '*' (0-23) is fixed-time there: once in a "
    "repeated hour, skipped times at the change",
    "cron: a job with '*' in minute or hour but not every hour runs in both "
    "occurrences of a repeated time and not at all in a skipped one",
    "apscheduler: both day fields restricted, it ANDs them",
    "apscheduler: every job runs in both occurrences of a repeated time",
    "apscheduler: a skipped time runs at that wall time read with the old offset, "
    "or not at all, not at the change",
    "apscheduler: after a day that sprang forward, it misses the next day's runs "
    "before 01:00",
    "apscheduler: a change not on the hour (Chatham's 02:45): it misses the second "
    "occurrences of a repeated time, and real times in the hour after a skipped interval",
}


# --- the cases of the issue, one by one ----------------------------------------------

def fires_from(expression: str, zone: str, start: datetime, count: int) -> list[str]:
    schedule = CronSchedule(expression, ZoneInfo(zone))
    instant, found = start.timestamp(), []
    for _ in range(count):
        instant = schedule.next_after(instant, instant)
        found.append(datetime.fromtimestamp(instant, ZoneInfo(zone)).isoformat())
    return found


@pytest.mark.parametrize("expression", ["0 */1 * * *", "0 0-23 * * *", "@HOURLY",
                                        "0 * * * *"])
def test_every_hour_however_spelled_runs_in_the_repeated_hour(expression):
    start = datetime(2026, 10, 25, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert fires_from(expression, "Europe/Berlin", start, 3) == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00"]


def test_lord_howe_half_hour_fall_back_repeats_the_half_hour():
    start = datetime(2026, 4, 5, 1, 50, tzinfo=timezone(timedelta(hours=11)))
    assert fires_from("*/7 * * * *", "Australia/Lord_Howe", start, 4) == [
        "2026-04-05T01:56:00+11:00", "2026-04-05T01:35:00+10:30",
        "2026-04-05T01:42:00+10:30", "2026-04-05T01:49:00+10:30"]


def test_day_of_month_and_day_of_week_combine_as_in_cron():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # day-of-month starts with '*': both must match (odd days that are Mondays)
    assert fires_from("0 0 */2 * 1", "UTC", start, 3) == [
        "2026-01-05T00:00:00+00:00", "2026-01-19T00:00:00+00:00",
        "2026-02-09T00:00:00+00:00"]
    # both restricted: either matches (the 1st, and Mondays)
    assert fires_from("0 0 1 * 1", "UTC", start, 3) == [
        "2026-01-05T00:00:00+00:00", "2026-01-12T00:00:00+00:00",
        "2026-01-19T00:00:00+00:00"]


def test_wildcard_minute_with_a_fixed_hour_runs_once_in_the_repeated_hour():
    start = datetime(2026, 10, 24, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    assert fires_from("*/30 2 * * *", "Europe/Berlin", start, 3) == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:00:00+01:00"]


def test_skipped_times_of_a_fixed_hour_run_once_at_the_change():
    start = datetime(2026, 3, 28, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    assert fires_from("*/30 2 * * *", "Europe/Berlin", start, 2) == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]


def test_the_look_back_inside_a_repeated_hour_finds_the_first_occurrence():
    from worker.cluster import nearest_slot
    santiago = ZoneInfo("America/Santiago")
    schedule = CronSchedule("30 23 * 4 6", santiago)
    now = datetime(2026, 4, 4, 23, 45, tzinfo=timezone(timedelta(hours=-4))).timestamp()
    expected = datetime(2026, 4, 4, 23, 30, tzinfo=timezone(timedelta(hours=-3)))
    assert schedule.previous_at_or_before(now) == expected.timestamp()
    assert nearest_slot(schedule, now, 60) == expected.timestamp()


def test_one_parse_per_expression(monkeypatch):
    import worker.cron
    parsed = []
    real = worker.cron.parse
    monkeypatch.setattr(worker.cron, "parse", lambda text: parsed.append(text) or real(text))
    schedule = CronSchedule("*/5 * * * *", ZoneInfo("UTC"))
    instant = 0.0
    for _ in range(100):
        instant = schedule.next_after(instant, instant)
    assert parsed == ["*/5 * * * *"] and instant == 100 * 300


def test_days_are_searched_within_the_calendar():
    assert calendar.isleap(2032) and date(2032, 2, 29).isoweekday() == 7
    times = CronTimes(parse("0 0 29 2 */7"), ZoneInfo("UTC"))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    assert datetime.fromtimestamp(times.next_after(start), timezone.utc).date() == \
        date(2032, 2, 29)


def test_a_step_of_5000_digits_is_a_step_larger_than_the_field():
    """int() refuses 4,300 digits: parse raised a bare ValueError (a traceback at
    --check); a step larger than the field's range gives its first value, as in
    Vixie cron."""
    assert parse("*/1" + "0" * 5000 + " * * * *").minutes == (0,)
    assert parse("*/100 * * * *").minutes == (0,)
