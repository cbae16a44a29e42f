"""The status page at `/`: plain server-rendered HTML from the same data as
`/status.json` (monitoring.monitor.StatusBoard.snapshot). No JavaScript, no build
step; one column on a phone. Read-only: it has no form and no link that acts."""
from __future__ import annotations

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
details{margin-top:6px;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:12px}
td,th{border-bottom:1px solid #eaeef2;padding:2px 6px 2px 0;text-align:left;
vertical-align:top}
.wrap{overflow-x:auto}
footer{font-size:12px;color:#57606a;padding:0 12px 12px}
"""


def _badge(outcome: str | None) -> str:
    if not outcome:
        return '<span class="badge" style="background:#8c959f">never ran</span>'
    colour = OUTCOME_COLOURS.get(outcome, "#57606a")
    return f'<span class="badge" style="background:{colour}">{escape(outcome)}</span>'


def _when(iso: str | None) -> str | None:
    """An ISO time as people read it: date and time, the offset kept."""
    return iso.replace("T", " ", 1) if iso else iso


def _field(name: str, value) -> str:
    shown = "-" if value is None or value == "" else escape(str(value))
    return f"<div><b>{escape(name)}</b>{shown}</div>"


def _job(job: dict) -> str:
    last = job["last"]
    outcome = "running" if job["running_since"] else "paused" if job.get("paused") else \
        (last["outcome"] if last else None)
    fields = [
        _field("schedule", job["schedule"] or "no schedule (--once only)"),
        _field("next run", _when(job["next_run"]) or
               ("disabled" if not job["enabled"] else "-")),
        _field("last run", _when(last["finished"]) if last else None),
        _field("duration", f'{last["duration"]:.3f}s' if last else None),
        _field("attempts", last["attempts"] if last else None),
    ]
    if job["running_since"]:
        fields.append(_field("running since", _when(job["running_since"])))
    squares = "".join(
        f'<i style="background:{OUTCOME_COLOURS.get(r["outcome"], "#57606a")}" '
        f'title="{escape(r["finished"])}: {escape(r["outcome"])}"></i>'
        for r in reversed(job["recent"]))
    rows = "".join(
        f'<tr><td>{escape(_when(r["finished"]))}</td><td>{escape(r["outcome"])}</td>'
        f'<td>{r["duration"]:.3f}s</td><td>{r["attempts"]}</td>'
        + (f'<td>{escape(r["node"])}</td>' if r["node"] else "")
        + f'<td>{escape(r["error"] or "")}</td></tr>' for r in job["recent"])
    error = f'<div class="err">{escape(last["error"])}</div>' \
        if last and last["error"] else ""
    recent = (f'<div class="runs" aria-label="recent runs, oldest first">{squares}</div>'
              f'<details><summary>recent runs ({len(job["recent"])})</summary>'
              f'<div class="wrap"><table><tr><th>ended</th><th>outcome</th><th>duration'
              f'</th><th>attempts</th><th>error</th></tr>{rows}</table></div></details>'
              if job["recent"] else "")
    return (f'<section class="job" id="job-{escape(job["name"])}"><h2>'
            f'{escape(job["name"])} {_badge(outcome)}</h2>'
            f'<div class="grid">{"".join(fields)}</div>{error}{recent}</section>')


def render(data: dict) -> str:
    worker = data["worker"]
    if "pid" not in worker:
        body = "<main><section>The worker is starting.</section></main>"
        return _page(body, "starting")
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
        _field("started", _when(worker["started"])),
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
    jobs = "".join(_job(job) for job in data["jobs"])
    body = (f'<main><section><h2>Worker</h2><div class="grid">{"".join(pool)}</div>'
            f'</section>{cluster_html}{jobs}</main>')
    return _page(body, f"{state}; {ready}; pid {worker['pid']}")


def _page(body: str, subtitle: str) -> str:
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            '<meta http-equiv=refresh content=15>'
            f"<title>run-worker status</title><style>{STYLE}</style></head><body>"
            f"<header><h1>run-worker status</h1><p>{escape(subtitle)}</p></header>"
            f"{body}<footer>Read-only. Refreshes every 15 s. Data: "
            '<a href="/status.json">/status.json</a> · <a href="/metrics">/metrics</a>'
            "</footer></body></html>")
