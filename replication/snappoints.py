"""Snappoints of a primary: created, converted, deleted and listed, and the
snapshots the write path invalidated recorded.

What it owns: the snappoint operations on a tracked volume
(replication/tracker.py holds what they act on: the volume, the open maps,
the closed maps, the lock; replication/snapshots.py the snapshots' files).
What it promises:

* Creation, in order: switch (new maps, new snapshot), msync of the closed
  maps, digests, metadata written durably, and only then snap/NAME exists
  and the activity log is trimmed.  Nothing reads a closed interval before
  its maps are durable; its data becomes durable later, and the activity
  log keeps its extents until then (replication/durability.py).  A volume
  whose fdatasync failed takes no snappoint.  If anything before the record
  fails, the switch is undone.
* Deleting a snappoint merges its interval forward (nothing is lost, and
  a damaged map is never laundered into a fresh digest) and refuses while
  a link needs it as its base.
* Convert and delete write the record first, then free the snapshot and
  remove files; an invalidated snapshot is dropped at once and its record
  retried until it is written (ARCHITECTURE §4).
"""
import logging
import os
import time

import numpy as np

from . import faults, status
from .chain import carry_damage, create_interval_files, map_names, merge_into_closed, \
    new_interval, remove_files, sync_created
from .errors import MetadataWriteError, RefusedError
from .meta import SnapshotRecord
from .snapshots import MAX_SNAPSHOTS
from .units import check_name

log = logging.getLogger(__name__)


class Snappoints:
    """The snappoint operations of tracker t (replication/tracker.py)."""

    def __init__(self, tracker):
        self.t = tracker

    def create(self, name, dataless=False, changes_after=None):
        """Closes the open interval at one instant.  Its effects outside the
        metadata come in an order that nothing observable runs ahead of the
        record: the C switch (writers see new maps), then the closed
        interval made durable and digested, then the metadata written; only
        then does snap/NAME exist and the log get trimmed.  If anything
        before the record fails, the switch is undone (the closed maps take
        the new interval's bits back) and the operation fails.

        changes_after (an interval's number, -1: from the start): the
        snapshot holds only the blocks changed in the intervals after that
        one up to the one this snappoint closes -- what a link's cycle from
        that base reads -- and copies nothing else (see snapshot_of_changes)."""
        t = self.t
        check_name(name)
        if changes_after is not None and (dataless or type(changes_after) is not int
                                          or changes_after < -1):
            raise RefusedError("changes_after is an interval's number (-1: from the start) "
                               "and needs a snapshot (not dataless)")
        with t.lock:
            t.check_open()
            if t.find(name, None) is not None:
                raise RefusedError(f"snappoint {name!r} already exists in {t.sd}")
            if not dataless and len(t.snaps) >= MAX_SNAPSHOTS:
                raise RefusedError(f"{MAX_SNAPSHOTS} snapshots are active already; convert or "
                                   "delete one first (prepl snappoint convert NAME --dataless)")
            new = t.md.draft()
            seq = new.next_seq
            iv = new_interval(seq, new.take_file_id())
            snap = None
            spare = t.spares.take()
            if spare is not None:
                iv.maps = spare.names()
            created = [t.sd.p("maps", f) for f in iv.maps.values()]
            switched = False
            old_maps = t.maps
            try:
                # every new file allocated first, then made durable: one
                # journal commit for them all (none for spare maps: they
                # are durable already)
                new_maps = spare or create_interval_files(t.sd, new, iv.maps, sync=False)
                if not dataless:
                    snap = t.snaps.create(t.body, new, sync=False)
                    created += [snap.img_path, snap.vmap_path]
                    if changes_after is not None:
                        self.snapshot_of_changes(snap, changes_after)
                sync_created(t.sd, () if spare else new_maps, *([snap.vmap] if snap else []))
                t.vol.switch(new_maps.bits(), snap.c if snap else None)
                switched = True
                faults.point("primary.snappoint.after_switch")
                closed = self._close_interval(new, name, old_maps, snap)
                new.append_interval(iv)
                t.md.commit(new)
            except BaseException:
                if switched:
                    t.vol.unswitch(old_maps.bits(), snap.c if snap else None)
                if snap is not None:
                    snap.remove(t.vol)
                remove_files(created)
                raise
            t.maps = new_maps
            t.keep_maps(closed, old_maps)
            if snap:
                t.snaps.active[name] = snap
            t.snaps.reaper.snappoint_taken()
            faults.point("primary.snappoint.after_save")
            t.vol.al_trim()
            log.info("snappoint %s created (%s), interval %d closed", name,
                     "dataless" if dataless else "with snapshot", closed.seq)
            return self.info(t.find(name))

    def snapshot_of_changes(self, snap, after):
        """Before the switch: snap will hold only the blocks written in the
        closed intervals after interval `after` (their block maps' union,
        computed now) or in the open interval (its block map, which the
        switch freezes and snap keeps mapped).  A cycle from that base
        reads no other block, and a write during it copies into snap only
        if it overwrites one of them: under random writes a few percent of
        what a whole snapshot copies.  Not recorded: a clean stop makes
        such a snapshot dataless (close_snapshots_of_changes), since the
        metadata would reopen it as a whole image."""
        t = self.t
        older = None
        for iv in t.body.closed_intervals:
            if iv.seq > after:
                bits = t.interval_maps(iv).bmap.bits
                older = bits.copy() if older is None else np.bitwise_or(older, bits, out=older)
        snap.changes_after = after
        snap.c.set_need(*([older] if older is not None else []), t.maps.bmap.bits)

    def close_snapshots_of_changes(self, body):
        """At a clean stop (in body, the metadata about to be written):
        snapshots of changes become dataless; returns their snappoints'
        names (the caller frees their files once body is written)."""
        names = [n for n, s in self.t.snaps.active.items() if s.changes_after is not None]
        for sp in body.snappoints:
            if sp.name in names:
                sp.snapshot = None
        return names

    def _close_interval(self, new, name, old_maps, snap):
        """After the switch: the interval old_maps belong to is made durable
        and recorded (in new, not yet written) as closed by snappoint name."""
        t = self.t
        now = time.time()
        if t.vol.sync_error:       # its data may be lost: nothing of it is sent
            raise OSError(t.vol.sync_error, f"the volume of {t.sd} could not be made durable "
                          f"({os.strerror(t.vol.sync_error)}); restart the server to recover")
        old_maps.sync()
        # nothing writes the closed maps any more: their digests are final
        return new.close_interval(name, now, old_maps.digests(),
                                  SnapshotRecord(snap.id) if snap else None)

    def convert(self, name):
        t = self.t
        with t.lock:
            t.check_open()
            if t.find(name).snapshot is not None:
                with t.md.change() as new:
                    new.snappoint(name).snapshot = None
                t.snaps.free(name, t.vol)
                log.info("snappoint %s converted to dataless", name)
            return self.info(t.find(name))

    def delete(self, name):
        t = self.t
        with t.lock:
            t.check_open()
            t.find(name)
            users = t.links.is_base(name)
            if users:
                raise RefusedError(f"snappoint {name!r} is the base of link(s) "
                                   f"{', '.join(users)}; it cannot be deleted")
            new = t.md.draft()
            ivs = new.intervals
            i = ivs.index(new.closed_by(name))
            src, dst = ivs[i], ivs[i + 1]
            src_bits = t.interval_maps(src).bits()
            old_files = [t.sd.p("maps", f) for f in src.maps.values()]
            carry_damage(t.sd, new, src, dst, t.links.needing)
            created, merged = [], None
            try:
                if not dst.closed:
                    # more bits in the open interval are harmless if the
                    # record then fails (a change counted twice is sent
                    # twice); bits missing after the record would be lost
                    t.vol.merge_open(src_bits)
                    t.maps.sync()
                else:
                    old_files += [t.sd.p("maps", f) for f in dst.maps.values()]
                    spare = t.spares.take()
                    names = map_names(dst.seq, new.take_file_id()) if spare is None else \
                        spare.names()
                    created = [t.sd.p("maps", f) for f in names.values()]
                    merged = spare or create_interval_files(t.sd, new, names, sync=False)
                    merge_into_closed(t.sd, new, src_bits, dst, t.interval_maps(dst), merged,
                                      fresh=spare is None)
                del ivs[i]
                new.snappoints.remove(new.snappoint(name))
                t.md.commit(new)
            except BaseException:
                remove_files(created)
                raise
            t.snaps.free(name, t.vol)
            t.forget_maps(src.seq, dst.seq)
            if merged:
                t.keep_maps(dst, merged)
            for p in old_files:
                os.unlink(p)
            log.info("snappoint %s deleted; interval %d merged into interval %d", name,
                     src.seq, dst.seq)

    def info(self, sp):
        t = self.t
        iv = t.interval_closed_by(sp.name)
        snap = t.snaps.active.get(sp.name)
        maps = t.interval_maps(iv)
        return {"name": sp.name, "interval": iv.seq, "created": sp.created,
                "snapshot": status.snapshot_state(sp, snap is not None),
                "invalidated": sp.invalidated,
                "export": f"snap/{sp.name}" if snap else None,
                "changed_regions": maps.cmap.count(),
                "changed_blocks": maps.bmap.count(),
                "copied_blocks": snap.vmap.count() if snap else 0,
                "snapshot_changes_after": snap.changes_after if snap else None}

    def list_all(self):
        t = self.t
        with t.lock:
            self.record_invalidations()
            return [self.info(sp) for sp in t.body.snappoints]

    def record_invalidations(self):
        """Records invalidations that the C write path made (e.g. ENOSPC
        during copy-on-write); the snapshots are dropped at once
        (replication/snapshots.py), the record is retried on every
        housekeeping tick until it is written."""
        t = self.t
        with t.lock:
            if t.closed:
                return
            pending = t.snaps.collect_invalidated(
                [sp.name for sp in t.body.snappoints], t.vol)
            if not pending:
                return
            try:
                with t.md.change() as new:
                    for x in new.snappoints:
                        if x.name in pending:
                            x.snapshot = None
                            x.invalidated = pending[x.name]
                pending.clear()
            except MetadataWriteError as e:
                log.error("%s; will retry", e)
