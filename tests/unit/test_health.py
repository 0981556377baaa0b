"""replication/health.py on status documents: the level and the line."""
from replication import health

NOW = 1_000_000.0


def primary(**kw):
    st = {"role": "primary", "state_dir": "/s", "links": {}, "snappoints": [],
          "damaged_intervals": [], "superseded": None, "volume_sync_error": None}
    st.update(kw)
    return st


def link(rpo, running=True):
    return {"rpo_seconds": rpo, "agent_running": running}


def test_rpo_levels_and_perfdata():
    for rpo, want in ((1.0, health.OK), (299.9, health.OK), (300.0, health.WARNING),
                      (899.0, health.WARNING), (900.0, health.CRITICAL)):
        code, text, perf = health.evaluate(primary(links={"dr": link(rpo)}), now=NOW)
        assert code == want, (rpo, text)
        assert perf == [f"rpo_dr={rpo:.3f}s;300;900;0"]
    # the worst link decides; fractional thresholds
    code, text, _ = health.evaluate(primary(links={"a": link(0.4), "b": link(0.6)}), 0.5, 0.7)
    assert code == health.WARNING and "link b: RPO 0.6 s" in text and "link a" not in text


def test_critical_conditions():
    sup = {"by_volume_uuid": "u", "by_uri": "nbds://x", "generation": 2}
    cases = [primary(superseded=sup), primary(volume_sync_error="Input/output error"),
             primary(links={"dr": link(1)}, damaged_intervals=[
                 {"interval": 3, "needed_by": ["dr"]}]),
             primary(links={"dr": link(1)}, snappoints=[
                 {"name": "dr.7", "snapshot": "invalid", "invalidated": "ENOSPC"}])]
    for st in cases:
        assert health.evaluate(st, now=NOW)[0] == health.CRITICAL, st
    # a damaged map no link needs, an operator's invalid snapshot: not critical
    st = primary(links={"dr": link(1)}, damaged_intervals=[{"interval": 3, "needed_by": []}],
                 snappoints=[{"name": "mine", "snapshot": "invalid"}])
    assert health.evaluate(st, now=NOW)[0] == health.OK


def test_secondary_by_the_age_of_its_image():
    def sec(t, **kw):
        return dict({"role": "secondary", "state_dir": "/r", "bound": {"primary_uuid": "p"},
                     "applied": {"target": {"seq": 4, "name": "dr.5", "time": t}},
                     "failback": None}, **kw)
    assert health.evaluate(sec(NOW - 10), now=NOW)[0] == health.OK
    assert health.evaluate(sec(NOW - 400), now=NOW)[0] == health.WARNING
    assert health.evaluate(sec(NOW - 1000), now=NOW)[0] == health.CRITICAL
    assert health.evaluate(sec(NOW, applied=None), now=NOW)[0] == health.WARNING
    assert health.evaluate(sec(NOW, failback={"blocks": 3}), now=NOW)[0] == health.WARNING


def test_line():
    assert health.line(health.OK, "fine", ["a=1s;2;3;0"]) == "PREPL OK - fine | a=1s;2;3;0"
    assert health.line(health.UNKNOWN, "?", []) == "PREPL UNKNOWN - ?"
