"""What `prepl status` shows of a primary (the schema is in the README's
reference), and its maps as runs for tests and debugging.  Computed from
the tracker on demand; nothing here is stored."""
import os

import numpy as np

from . import native
from .maps import KINDS
from .meta import PrimaryInfo
from .roles import FAILBACK


def primary(t):
    """The status of tracker t (the caller holds t.lock)."""
    b = t.body
    return {
        "state_dir": t.sd.path,
        "role": b.role,
        "volume": b.volume,
        "volume_uuid": b.volume_uuid,
        "generation": b.generation,
        "size": b.size,
        "region_size": b.region_size,
        "block_size": b.block_size,
        "al_extent": b.al_extent,
        "tracked_since_empty": b.tracked_since_empty,
        "promoted": b.promoted.to_json() if b.promoted else None,
        "superseded": b.superseded.to_json() if b.superseded else None,
        "read_only": t.writes_refused,
        "pid": os.getpid(),
        "uri": t.uri,
        "recovered": t.recovered,
        "open_interval": {"seq": t.open_interval.seq,
                          "changed_regions": t.maps.cmap.count(),
                          "changed_blocks": t.maps.bmap.count()},
        "intervals": len(b.intervals),
        "snappoints": [t.snappoints.info(sp) for sp in b.snappoints],
        "links": t.links.status(),
        "damaged_intervals": t.damaged(),
        "volume_sync_error": os.strerror(t.vol.sync_error)
        if t.vol.sync_error else None,
        "unrecorded_invalidations": sorted(t.snaps.invalidated),
        "writers_in_c": t.vol.writers,
        "max_concurrent_writers_in_c": t.vol.max_writers,
        "activity_log_syncs": t.vol.al_syncs,
        "writes_total": t.vol.writes_total,
        "snappoint_pause": switch_pauses(t.vol),
        "volume_durability": t.durability.status(),
        "spare_maps": t.spares.status(),
        "frame_stack_cache": native.frame_stack_cache_stats(),
    }


PAUSE_BUCKETS_MS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def switch_pauses(vol):
    """How long writers waited at the snappoint switches (the last 1024):
    count (all switches), p50, p99, max and a histogram [[upper bound,
    count]] in ms (the last bucket's bound is null: longer)."""
    n, ns = vol.switch_pauses()
    ms = np.sort(ns.astype(np.float64) / 1e6)
    if not len(ms):
        return {"count": n, "p50_ms": None, "p99_ms": None, "max_ms": None, "histogram": []}
    counts = np.histogram(ms, bins=(0,) + PAUSE_BUCKETS_MS + (np.inf,))[0]
    return {"count": int(n), "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "max_ms": round(float(ms[-1]), 4),
            "histogram": [[b, int(c)] for b, c in zip(PAUSE_BUCKETS_MS + (None,), counts)]}


def primary_info(t):
    """What a primary says of itself to other nodes (its export "info", a
    meta.PrimaryInfo)."""
    b = t.body
    info = PrimaryInfo(b.role, b.volume_uuid, b.generation, b.size, b.region_size,
                       b.block_size, b.promoted, b.superseded,
                       last_write=t.clock.written)
    if b.promoted:
        with t.lock:
            iv = b.closed_by(FAILBACK)
            if iv is not None:
                info.failback_base = iv.ref()
                info.written_since_failover = t.blocks_after(iv.seq) * b.block_size
    return info.to_json()


def stopped(path, body):
    """The status of a state directory whose server is not running, from its
    metadata (a meta.Body)."""
    return {"running": False, "state_dir": path, "role": body.role, "volume": body.volume,
            "volume_uuid": body.volume_uuid, "size": body.size,
            "generation": body.generation, "clean_stop": body.clean,
            "superseded": body.superseded.to_json() if body.superseded else None,
            "snappoints": [{"name": sp.name, "created": sp.created,
                            "snapshot": snapshot_state(sp, sp.snapshot is not None)}
                           for sp in body.snappoints]}


def snapshot_state(sp, valid):
    """"valid", "invalid" (dropped: sp.invalidated says why) or "none"
    (dataless) for snappoint sp whose snapshot is valid or not."""
    return "valid" if valid else ("invalid" if sp.invalidated else "none")


def maps(t, limit):
    """Every map of tracker t as runs [[start, length], ...]."""
    def runs(m):
        s, n = m.runs(limit)
        return [[a, b] for a, b in zip(s.tolist(), n.tolist())]
    out = {"intervals": [], "snapshots": {}}
    for iv in t.body.intervals:
        maps = t.interval_maps(iv)
        out["intervals"].append({"seq": iv.seq, "closed_by": iv.closed_by,
                                 **{k: runs(m) for k, m in zip(KINDS, maps)}})
    for name, snap in t.snaps.active.items():
        out["snapshots"][name] = {"valid": snap.c.valid, "vmap": runs(snap.vmap)}
    return out
