"""The health of a node, as monitoring wants it (`prepl check`): one line
and a Nagios-style code, from what `prepl status --json` says.

What it promises: OK (0) when every link's RPO is under the warning
threshold; WARNING (1) or CRITICAL (2) by the worst RPO; CRITICAL also for
a server that does not answer, corrupt metadata, a damaged map or an
invalid snapshot a link needs, a volume whose flush failed, a superseded
primary (its replica was promoted: a split brain if it also took writes);
UNKNOWN (3) when it cannot tell.  A secondary is judged by the age of the
point in time its replica holds.  Nothing here asks the server anything:
evaluate() is pure, on the status document.
"""
import re
import time

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
DEFAULT_WARN, DEFAULT_CRIT = 300.0, 900.0


def evaluate(st, warn=DEFAULT_WARN, crit=DEFAULT_CRIT, now=None):
    """(code, text, perfdata) for status document st of a running server."""
    now = time.time() if now is None else now
    if st.get("role") == "secondary":
        return _secondary(st, warn, crit, now)
    return _primary(st, warn, crit)


def _level(rpo, warn, crit):
    return CRITICAL if rpo >= crit else WARNING if rpo >= warn else OK


def _primary(st, warn, crit):
    problems, code, perf = [], OK, []
    sup = st.get("superseded")
    if sup:
        problems.append(f"superseded: its replica {sup.get('by_volume_uuid')} at "
                        f"{sup.get('by_uri')} was promoted (generation {sup.get('generation')});"
                        " fail back")
        code = CRITICAL
    if st.get("volume_sync_error"):
        problems.append(f"the volume's flush failed ({st['volume_sync_error']})")
        code = CRITICAL
    links = st.get("links") or {}
    for d in st.get("damaged_intervals") or []:
        if d.get("needed_by"):
            problems.append(f"damaged map of interval {d.get('interval')} needed by "
                            f"{', '.join(d['needed_by'])}")
            code = CRITICAL
    for sp in st.get("snappoints") or []:
        owner = re.fullmatch(r"(.+)\.[0-9]+", sp.get("name", ""))
        if sp.get("snapshot") == "invalid" and owner and owner.group(1) in links:
            problems.append(f"snapshot {sp['name']} of link {owner.group(1)} is invalid "
                            f"({sp.get('invalidated')})")
            code = CRITICAL
    worst = None
    paused = []
    for name, ln in sorted(links.items()):
        rpo = ln.get("rpo_seconds")
        if ln.get("paused"):          # reported, never raises the level
            paused.append(f"link {name} paused" + (f" (RPO {rpo:.1f} s)" if rpo else ""))
            continue
        if rpo is None:
            problems.append(f"link {name}: no image replicated yet")
            code = max(code, WARNING)
            continue
        perf.append(f"rpo_{name}={rpo:.3f}s;{warn:g};{crit:g};0")
        level = _level(rpo, warn, crit)
        if level:
            limit = warn if level == WARNING else crit
            problems.append(f"link {name}: RPO {rpo:.1f} s (limit {limit:g} s"
                            f"{'' if ln.get('agent_running') else ', no agent running'})")
            code = max(code, level)
        if worst is None or rpo > worst[1]:
            worst = (name, rpo)
    problems += paused
    if problems:
        text = "; ".join(problems)
    elif not links:
        text = "primary with no replication link"
    else:
        text = (f"{len(links)} link{'s' if len(links) > 1 else ''}"
                + (f", worst RPO {worst[1]:.1f} s ({worst[0]})" if worst else ""))
    return code, f"primary {st.get('state_dir')}: {text}", perf


def _secondary(st, warn, crit, now):
    a = st.get("applied")
    where = f"secondary {st.get('state_dir')}"
    if st.get("failback"):
        return WARNING, f"{where}: a failback is pending (its first interval from " \
            f"{(st.get('bound') or {}).get('primary_uuid')} has not applied yet)", []
    if not a:
        return WARNING, f"{where}: no image replicated yet", []
    age = now - a["target"]["time"] if a["target"].get("time") else None
    if age is None:
        return UNKNOWN, f"{where}: the applied interval has no time", []
    level = _level(age, warn, crit)
    return level, (f"{where}: holds interval {a['target']['seq']} "
                   f"({a['target'].get('name')}), {age:.1f} s old"), \
        [f"age={age:.3f}s;{warn:g};{crit:g};0"]


def line(code, text, perf):
    """The Nagios plugin line: "PREPL CODE - text | perfdata"."""
    return f"PREPL {NAMES[code]} - {text}" + (f" | {' '.join(perf)}" if perf else "")
