"""The status page at `/`: plain server-rendered HTML from the same data as
`/status.json` (monitoring.monitor.StatusBoard.snapshot). No JavaScript, no build
step; one column on a phone. Read-only: it has no form and no link that acts."""
from __future__ import annotations

import time
from datetime import datetime
from html import escape

OUTCOME_COLOURS = {"success": "#1a7f37", "failed": "#cf222e", "timeout": "#bc4c00",
                   "cancelled": "#6e7781", "abandoned": "#8250df", "running": "#0969da",
                   "skipped": "#6e7781", "paused": "#9a6700"}

STYLE = """
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;
background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 16px}
header h1{font-size:18px;margin:0}
header p{margin:2px 0 0;font-size:13px;color:#d0d7de}
main{padding:8px 12px;max-width:1100px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:10px 0;
padding:10px 12px}
h2{font-size:16px;margin:0 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:4px 12px;
font-size:13px}
.grid div{overflow-wrap:anywhere}
.grid b{display:block;font-weight:600;color:#57606a;font-size:12px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;color:#fff;font-size:12px;
font-weight:600}
.runs{margin-top:6px;line-height:0}
.runs i{display:inline-block;width:12px;height:12px;margin:0 2px 2px 0;border-radius:2px}
.err{font:12px ui-monospace,monospace;color:#cf222e;word-break:break-word;margin-top:4px}
.toggle{display:inline-block;margin-top:6px;font-size:13px}
.rel{color:#57606a;white-space:nowrap}
.summary{font-size:16px;font-weight:600;margin:10px 0;padding:8px 12px;border-radius:6px}
.summary.good{background:#dafbe1;color:#1a7f37}
.summary.bad{background:#ffebe9;color:#cf222e}
.grid b.warn{color:#cf222e}
section.failing,section.stuck{border-left:4px solid #cf222e}
section.disabled{opacity:.75}
table{border-collapse:collapse;width:100%;font-size:12px}
td,th{border-bottom:1px solid #eaeef2;padding:2px 6px 2px 0;text-align:left;
vertical-align:top}
.wrap{overflow-x:auto}
footer{font-size:12px;color:#57606a;padding:0 12px 12px}
"""


FAILING = ("failed", "timeout", "abandoned")


def _badge(label: str | None, colour: str | None = None) -> str:
    if not label:
        return '<span class="badge" style="background:#8c959f">never ran</span>'
    colour = colour or OUTCOME_COLOURS.get(label, "#57606a")
    return f'<span class="badge" style="background:{colour}">{escape(label)}</span>'


def _when(iso: str | None) -> str | None:
    """An ISO time as people read it: date and time, the offset kept."""
    return iso.replace("T", " ", 1) if iso else iso


def _ago(iso: str | None, now: float) -> str:
    """How long before (or after) now: "12s ago", "in 3m", "2h ago", "5d ago"."""
    if not iso:
        return ""
    seconds = now - datetime.fromisoformat(iso).timestamp()
    size = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if size >= length:
            amount = f"{int(size // length)}{unit}"
            break
    else:
        amount = f"{int(size)}s"
    return f"{amount} ago" if seconds >= 0 else f"in {amount}"


def _time(iso: str | None, now: float, empty: str = "-") -> str:
    """Absolute and relative: "2026-12-06 02:47:36+00:00 (12s ago)", escaped."""
    if not iso:
        return escape(empty)
    return f'{escape(_when(iso))} <span class="rel">({_ago(iso, now)})</span>'


def _field(name: str, value) -> str:
    shown = "-" if value is None or value == "" else escape(str(value))
    return _field_html(name, shown)


def _field_html(name: str, html: str) -> str:
    return f"<div><b>{escape(name)}</b>{html}</div>"


def state_of(job: dict) -> str:
    """What a job is, for its badge and the page's order: stuck, failing, running,
    paused, disabled, ok or never."""
    last = job["last"]
    outcome = last["outcome"] if last else None
    if job.get("stuck"):
        return "stuck"
    if not job["enabled"]:
        return "disabled"
    if job.get("paused") and not job["running_since"]:
        return "paused"
    if outcome in FAILING:
        return "failing"
    if job["running_since"]:
        return "running"
    return "ok" if outcome else "never"


ORDER = {"stuck": 0, "failing": 1, "running": 2, "ok": 3, "never": 4, "paused": 5,
         "disabled": 6}
STATE_BADGES = {"stuck": ("stuck", "#cf222e"), "disabled": ("disabled", "#8c959f"),
                "paused": ("paused", "#9a6700"),
                "running": ("running", OUTCOME_COLOURS["running"])}


def _job(job: dict, now: float, cluster: bool, shown: set[str]) -> str:
    last = job["last"]
    state = state_of(job)
    badge = _badge(*STATE_BADGES[state]) if state in STATE_BADGES \
        else _badge(last["outcome"] if last else None)
    last_run = "-"
    if last:
        verb = "started" if last["outcome"] == "running" else "ended"
        last_run = f'{escape(last["outcome"])}, {verb} {_time(last["finished"], now)}'
    fields = [
        _field("schedule", job["schedule"] or "no schedule (--once only)"),
        _field_html("next run", _time(job["next_run"], now) if job["next_run"] else
                    ("disabled" if not job["enabled"] else "-")),
        _field_html("last run", last_run),
        _field_html("last success", _time(job.get("last_success"), now, "never")),
        _field("duration", f'{last["duration"]:.3f}s' if last else None),
        _field("attempts", last["attempts"] if last else None),
    ]
    if job["running_since"]:
        fields.append(_field_html("running since", _time(job["running_since"], now)
                                  + (" <b class=warn>past its deadline; its thread "
                                     "has not returned</b>" if job.get("stuck") else "")))
    squares = "".join(
        f'<i style="background:{OUTCOME_COLOURS.get(r["outcome"], "#57606a")}" '
        f'title="{escape(r["finished"])}: {escape(r["outcome"])}"></i>'
        for r in reversed(job["recent"]))
    error = f'<div class="err">{escape(last["error"])}</div>' \
        if last and last["error"] else ""
    recent = ""
    if job["recent"]:
        name = job["name"]
        is_open = name in shown
        others = sorted(shown - {name}) if is_open else sorted(shown | {name})
        link = (f'<a class="toggle" href="?open={escape(",".join(others))}#job-'
                f'{escape(name)}">{"hide" if is_open else "show"} recent runs '
                f'({len(job["recent"])})</a>')
        recent = f'<div class="runs" aria-label="recent runs, oldest first">{squares}</div>' \
            + link
        if is_open:
            recent += _recent_table(job["recent"], now, cluster)
    return (f'<section class="job {state}" id="job-{escape(job["name"])}"><h2>'
            f'{escape(job["name"])} {badge}</h2>'
            f'<div class="grid">{"".join(fields)}</div>{error}{recent}</section>')


def _recent_table(runs: list, now: float, cluster: bool) -> str:
    head = ["when", "outcome", "duration", "attempts"] + (["node"] if cluster else []) \
        + ["error"]
    rows = []
    for r in runs:
        verb = "started" if r["outcome"] == "running" else "ended"
        cells = [f'{verb} {_time(r["finished"], now)}', escape(r["outcome"]),
                 f'{r["duration"]:.3f}s', str(r["attempts"])]
        if cluster:
            cells.append(escape(r["node"] or ""))
        cells.append(escape(r["error"] or ""))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<div class="wrap"><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
            f'{"".join(rows)}</table></div>')


def summary_line(jobs: list) -> tuple[str, bool]:
    """"5 jobs: 1 failing, 1 stuck, 1 disabled" and whether anything is wrong."""
    states = [state_of(job) for job in jobs]
    parts = [f"{states.count(state)} {state}" for state in
             ("failing", "stuck", "running", "disabled") if state in states]
    return (f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: "
            + (", ".join(parts) if parts else "all fine")), \
        any(state in ("failing", "stuck") for state in states)


def render(data: dict, shown: set[str] | frozenset = frozenset()) -> str:
    """The page; `shown`: the jobs whose recent-runs table is open (?open=a,b)."""
    worker = data["worker"]
    if "pid" not in worker:
        body = "<main><section>The worker is starting.</section></main>"
        return _page(body, "starting")
    now = time.time()
    state = "live" if worker.get("live", True) else f'not live: {worker.get("live_reason")}'
    ready = "database answering" if worker.get("database_ready") \
        else "database NOT answering"
    pool = [
        _field("config", worker["config"]),
        _field("database", worker["database"]),
        _field("workers", f'{worker["running"]} busy of {worker["max_workers"]}'),
        _field("connections", f'{worker["connections_checked_out"]} checked out of '
                              f'{worker["pool_size"]}'),
        _field("version", worker["version"]),
        _field_html("started", _time(worker["started"], now)),
    ]
    cluster = data.get("cluster")
    cluster_html = ""
    if cluster:
        note = f'<div class="err">{escape(cluster["history_error"])}</div>' \
            if cluster.get("history_error") else ""
        cluster_html = (f'<section><h2>Cluster</h2><div class="grid">'
                        f'{_field("this node", cluster["node"])}'
                        f'{_field("nodes seen", ", ".join(cluster["nodes"]))}'
                        f'{_field("run table", "reachable" if cluster["healthy"] else "out of reach")}'
                        f'</div>{note}</section>')
    ordered = sorted(data["jobs"], key=lambda job: ORDER[state_of(job)])  # stable
    line, wrong = summary_line(data["jobs"])
    jobs = "".join(_job(job, now, bool(cluster), set(shown)) for job in ordered)
    body = (f'<main><p class="summary {"bad" if wrong else "good"}">{escape(line)}</p>'
            f'{jobs}<section><h2>Worker</h2><div class="grid">{"".join(pool)}</div>'
            f'</section>{cluster_html}</main>')
    return _page(body, f"{line}; {state}; {ready}; pid {worker['pid']}")


def _page(body: str, subtitle: str) -> str:
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            '<meta http-equiv=refresh content=15>'
            f"<title>run-worker status</title><style>{STYLE}</style></head><body>"
            f"<header><h1>run-worker status</h1><p>{escape(subtitle)}</p></header>"
            f"{body}<footer>Read-only. Refreshes every 15 s. Data: "
            '<a href="/status.json">/status.json</a> · <a href="/metrics">/metrics</a>'
            "</footer></body></html>")
