"""The live fleet table of `fleet up` / `fleet status`: robots, heads, endpoints and the learner in 80 columns."""

from __future__ import annotations

from urllib.parse import urlsplit

from rich import box
from rich.table import Table

from fleet.names import ROBOT_PREFIX


def _fmt(value, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


# the live table's columns: (header, justify); fits 80 columns with 12-character robot names and states
COLUMNS = (
    ("robot", "left"), ("state", "left"), ("Hz", "right"), ("eps", "right"), ("succ", "right"),
    ("recent", "right"), ("interv", "right"), ("head", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
)  # fmt: skip
STATE_COLORS = {
    "normal": "green",
    "demo": "cyan",
    "estop": "bold red",
    "holding": "red",
    "escalated": "red",
    "paused": "yellow",
    "human": "cyan",
}
LEGEND = "succ: all episodes, recent: last 100; interv: corrections; ms: policy latency"


def _short_id(robot_id: str) -> str:
    return robot_id.removeprefix(ROBOT_PREFIX)


def added_line(name: str, body: dict) -> str:
    """One body `fleet embodiment add` brought in: its phase, and how far the first round is."""
    phase = body.get("phase") or "-"
    if phase != "demonstrations":
        return f"added {name}: {phase}" + (f", head v{body['head_version']}" if body.get("head_version") else "")
    t = body.get("training")
    if t:
        steps = f"{t['done']} / {t['steps']} steps" + (f", {t['demos']} demos" if t.get("demos") else "")
        return f"added {name}: demonstrations, round {t['round']} {t['stage']} ({steps})"
    return f"added {name}: demonstrations, {body.get('demos', 0)} / {body.get('first_round_demos', '?')} for round 1"


def render_table(status: dict, title: str = "fleet", width: int = 80):
    """A rich Table of one `fleet.cluster.launcher.status()` result that fits `width` columns: no vertical rules,
    robot ids without their "robot-" prefix, errors on their own lines under the table."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, min_width=width)
    table.padding = (0, 1, 0, 0)  # one space right of a cell, one for the (invisible) rule: two between columns
    for header, justify in COLUMNS:
        table.add_column(header, justify=justify, no_wrap=True)
    errors = []
    for r in status.get("robots", []):
        hz = r.get("control_hz")
        state = r.get("state") or "-"
        if state == "normal" and r.get("phase") == "demonstrations":
            state = "demo"  # a body being onboarded: the operator drives it (`fleet embodiment status`)
        table.add_row(
            _short_id(r["id"]),
            f"[{STATE_COLORS.get(state, 'white')}]{state}[/]",
            _fmt(hz, ".1f"),
            _fmt(r.get("episodes")),
            _fmt(r.get("success_rate"), ".0%"),
            _fmt(r.get("recent_success_rate"), ".0%"),
            _fmt(r.get("interventions")),
            _fmt(r.get("head_version"), "", "-") if r.get("head_version") is None else f"v{r['head_version']}",
            _fmt(r.get("latency_p50_ms"), ".1f"),
            _fmt(r.get("latency_p99_ms"), ".1f"),
        )
        if r.get("last_error"):
            errors.append(_clip(f"{_short_id(r['id'])}: {r['last_error']}", width))
    heads = status.get("heads") or {}
    lines = ["heads: " + (", ".join(f"{k} v{v}" for k, v in sorted(heads.items())) or "unknown")]
    for name, body in sorted((status.get("added") or {}).items()):
        lines.append(added_line(name, body))
    if status.get("endpoints"):
        lines.append(endpoints_caption(status["endpoints"]))
    if status.get("learner") is not None:
        lines.append(learner_line(status["learner"]))
        if status["learner"].get("image_adapters"):
            lines.append(image_adapters_line(status["learner"]["image_adapters"]))
    latched = [r["id"] for r in status.get("robots", []) if r.get("estop_latched")]
    if latched:
        # a latch outlives `fleet down` (log_dir/robots): say how an operator clears it
        short = ", ".join(_short_id(rid) for rid in latched)
        lines.append(f"e-stop latched: {short}; once clear: fleet estop reset {latched[0]}")
    lines += errors
    lines.append(LEGEND)
    table.caption = "\n".join(_clip(line, width) for line in lines)
    table.caption_justify = "left"
    return table


def endpoints_caption(endpoints: dict) -> str:
    """One line that fits 80 columns: "endpoints on 127.0.0.1: http :8000  openpi :8001  metrics :8002/metrics"."""
    on = {k: urlsplit(v) for k, v in endpoints.items() if v}
    if not on:
        return "endpoints: none"
    hosts = {u.hostname for u in on.values()}
    if len(hosts) != 1:
        return "endpoints: " + "  ".join(f"{k} {u.netloc}{u.path}" for k, u in on.items())
    return f"endpoints on {hosts.pop()}: " + "  ".join(f"{k} :{u.port}{u.path}" for k, u in on.items())


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def image_adapters_line(adapters: dict) -> str:
    """The robots whose camera the learner maps back onto the rig (fleet.learning.vision_round), a line."""
    shown = ", ".join(
        f"{_short_id(robot)} ({a['dx']:+d},{a['dy']:+d} px, gain {sum(a['gain']) / 3:.2f})"
        for robot, a in sorted(adapters.items())[:3]
    )
    more = f" and {len(adapters) - 3} more" if len(adapters) > 3 else ""
    return f"image adapters: {shown}{more}"


def learner_line(learner: dict) -> str:
    """One line about the learner: state, rounds, what it published or refused last, rollouts watched."""
    state = learner.get("state", "?")
    current = learner.get("current")
    if state == "adapting" and current:
        state = f"adapting {current['embodiment']} on {current['corrections']} corrections"
    parts = [f"learner: {state}"]
    parts.append(
        f"{learner.get('rounds', 0)} rounds, {learner.get('published', 0)} published, "
        f"{learner.get('rollbacks', 0)} rolled back"
    )
    last = learner.get("last_round")
    if last:
        if last.get("event") == "published":
            parts.append(f"last: {last['embodiment']} v{last['version']} in {last['seconds']:.1f} s")
        else:
            parts.append(f"last: {last['embodiment']} refused ({last.get('reason')})")
    for name, w in sorted((learner.get("watch") or {}).items()):
        parts.append(f"watching {name} v{w['version']} ({w['episodes']}/{w['needed']} episodes)")
    if learner.get("last_error"):
        parts.append(f"error: {learner['last_error']}")
    return "; ".join(parts)
