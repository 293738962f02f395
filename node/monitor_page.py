"""The monitor's HTML page: the swarm at a glance (like health.petals.dev), one table of stages and
one of nodes, refreshed by the browser every few seconds. Pure function of a snapshot and its summary."""
from __future__ import annotations

import time
from html import escape

STYLE = ("body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
         "{text-align:left}.bad{color:#b00;font-weight:bold}.ok{color:#080}code{font-size:12px}")


def _num(value, fmt: str = ".0f") -> str:
    return "–" if value is None else format(value, fmt)


def _steps(s: dict) -> str:
    if s["step_max"] is None:
        return "–"
    return str(s["step_max"]) if s["step_min"] == s["step_max"] else f"{s['step_min']} – {s['step_max']}"


def _banner(snap: dict, summary: dict) -> str:
    problems = []
    if snap["error"]:
        problems.append(escape(snap["error"]))
    if summary["missing"]:
        problems.append("no replica for stage(s) " + ", ".join(map(str, summary["missing"])) +
                        ": training waits until each stage has one")
    if len(summary["fingerprints"]) > 1:
        problems.append(f"{len(summary['fingerprints'])} run config fingerprints among the nodes")
    if len(summary["versions"]) > 1:
        problems.append(f"{len(summary['versions'])} protocol versions among the nodes")
    if not problems:
        return '<p class="ok">healthy: every stage has a replica, every node runs the same config</p>'
    return "".join(f'<p class="bad">{p}</p>' for p in problems)


def _stage_rows(summary: dict) -> str:
    slowest = summary["slowest"]["stage"] if summary["slowest"] else None
    rows = []
    for s in summary["stages"]:
        mark = ' class="bad"' if not s["replicas"] else ""
        note = " (slowest)" if s["stage"] == slowest else ""
        rows.append(f"<tr><td>{s['stage']} {escape(s['role'])}{note}</td><td{mark}>{s['replicas']}</td>"
                    f"<td>{_num(s['tokens_per_s'])}</td><td>{_num(s['throughput'], '.1f')}</td>"
                    f"<td>{_steps(s)}</td><td>{s['relayed']}</td><td>{_num(s['max_age_s'])}</td></tr>")
    return "".join(rows)


def _apart(distance) -> str:
    """Relative distance from the replicas' mean at the last averaging round ('–' before any)."""
    return "–" if distance is None else f"{100 * distance:.2f}%"


def _node_rows(snap: dict) -> str:
    rows = []
    for s in snap["stages"]:
        for r in s["replicas"]:
            rows.append(f"<tr><td><code>{escape(r['peer_id'])}</code></td><td>{s['stage']}</td>"
                        f"<td>{escape(r.get('role', ''))}</td><td>{escape(str(r.get('state', '')))}</td>"
                        f"<td>{_num(r.get('tokens_per_s'))}</td><td>{r.get('step', '–')}</td>"
                        f"<td>{_apart(r.get('distance'))}</td>"
                        f"<td>{_num(r.get('age_s'))}</td><td>{'relay' if r.get('relayed') else 'direct'}</td></tr>")
    return "".join(rows)


def render_page(snap: dict | None, summary: dict | None, last_update: float | None, refresh_s: float) -> str:
    head = (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh_s:.0f}">'
            f"<title>ResBM swarm</title><style>{STYLE}</style></head><body>")
    if snap is None:
        return head + "<h1>ResBM swarm</h1><p>no read of the DHT has finished yet</p></body></html>"
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_update)) if last_update else "never"
    return (head + f"<h1>ResBM swarm <code>{escape(snap['run_id'])}</code></h1>"
            f"<p>fingerprint <code>{escape(snap['fingerprint'] or '?')}</code> · protocol {snap['version'] or '?'} · "
            f"{summary['n_stages']} stages · {summary['nodes']} nodes ({summary['trainers']} trainers, "
            f"{summary['relayed']} relayed) · updated {updated}</p>" + _banner(snap, summary) +
            "<table><tr><th>stage</th><th>replicas</th><th>tokens/s</th><th>microbatches/s</th><th>step</th>"
            "<th>relayed</th><th>oldest record (s)</th></tr>" + _stage_rows(summary) + "</table>"
            "<table><tr><th>peer</th><th>stage</th><th>role</th><th>state</th><th>tokens/s</th><th>step</th>"
            "<th>apart from replicas</th><th>record age (s)</th><th>via</th></tr>" + _node_rows(snap) + "</table>"
            '<p><a href="/metrics">/metrics</a> · <a href="/json">/json</a></p></body></html>')
