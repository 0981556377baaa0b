"""`prepl status --json` has a versioned, documented schema (README):
checked here key by key and type by type, on a primary with a link and on
a secondary."""
import json

from tests.conftest import served_pair, prepl

PRIMARY = {"schema": str, "running": bool, "state_dir": str, "role": str, "volume": str,
           "volume_uuid": str, "generation": int, "size": int, "region_size": int,
           "block_size": int, "al_extent": int, "tracked_since_empty": bool, "pid": int,
           "uri": str, "recovered": type(None), "open_interval": dict, "intervals": int,
           "snappoints": list, "links": dict, "writers_in_c": int,
           "max_concurrent_writers_in_c": int, "activity_log_syncs": int,
           "writes_total": int, "volume_sync_error": type(None), "damaged_intervals": list,
           "unrecorded_invalidations": list, "promoted": type(None),
           "superseded": type(None), "read_only": bool, "snappoint_pause": dict,
           "frame_stack_cache": dict, "volume_durability": dict, "spare_maps": dict}
LINK = {"name": str, "replica_uuid": str, "secondary": str, "cursor": str, "state": str,
        "last_cycle": dict, "agent_running": bool, "last_applied": dict,
        "rpo_seconds": float, "bytes_pending": int, "progress": type(None), "resync": bool,
        "counters": dict, "paused": bool,
        "tls_psk": type(None)}
SNAPPOINT = {"name": str, "interval": int, "created": float, "snapshot": str,
             "invalidated": type(None), "export": str, "changed_regions": int,
             "changed_blocks": int, "copied_blocks": int,
             "snapshot_changes_after": (int, type(None))}
SECONDARY = {"schema": str, "running": bool, "role": str, "replica_uuid": str, "size": int,
             "region_size": int, "block_size": int, "bound": dict, "applied": dict,
             "staging": type(None), "state_dir": str, "volume": str, "volume_uuid": str,
             "generation": int, "pid": int, "uri": str, "tracked_since_empty": bool,
             "failback": type(None), "staging_held_bytes": int, "staging_received_bytes": int,
             "frame_stack_cache": dict}

FRAME_STACKS = {"hits": int, "misses": int, "held": int}
VOLUME_DURABILITY = {"interval_s": float, "syncs": int, "pending_extents": int}
SPARE_MAPS = {"ready": int, "made": int, "missed": int}


def check(doc, schema):
    assert set(doc) == set(schema), set(doc) ^ set(schema)
    for k, t in schema.items():
        assert isinstance(doc[k], t), (k, doc[k])


def test_status_schema(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, "8M")
    prim.connect().pwrite(b"x" * 8192, 0)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    prim.connect().pwrite(b"y" * 4096, 65536)
    p = json.loads(prepl("status", prim.state, "--json").stdout)
    assert p["schema"] == "prepl.status/3"
    check(p, PRIMARY)
    check(p["snappoints"][0], SNAPPOINT)
    link = p["links"]["default"]
    check(link, LINK)
    assert link["bytes_pending"] == 4096 and link["agent_running"] is False
    assert link["state"] == "idle" and 0 <= link["rpo_seconds"] < 60
    lc = link["last_cycle"]
    check(lc, {"snappoint": str, "bytes": int, "zero_bytes": int, "seconds": float,
               "applied_at": float, "full": bool, "phases": dict})
    ph = lc["phases"]
    assert set(ph) == {"snappoint", "plan", "transfer", "transfer_copy", "commit"}
    assert all(v >= 0 for v in ph.values()) and ph["transfer_copy"] <= ph["transfer"]
    assert sum(ph.values()) - ph["transfer_copy"] <= lc["seconds"] + 0.01
    check(p["frame_stack_cache"], FRAME_STACKS)
    check(p["volume_durability"], VOLUME_DURABILITY)
    check(p["spare_maps"], SPARE_MAPS)
    sm = p["spare_maps"]
    assert 0 <= sm["ready"] <= sm["made"] and sm["missed"] >= 0, sm
    # the agent took a snappoint: its interval's extents wait for a durable point,
    # or one took them already
    d = p["volume_durability"]
    assert d["pending_extents"] >= 1 or d["syncs"] >= 1, d
    s = json.loads(prepl("status", sec.state, "--json").stdout)
    check(s, SECONDARY)
    check(s["frame_stack_cache"], FRAME_STACKS)
    assert s["applied"]["target"]["name"] == link["cursor"]
    text = prepl("status", prim.state).stdout
    assert "link default: idle" in text and "RPO" in text

