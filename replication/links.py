"""The replication links of a primary, as its server records them.

What it owns: the links of the metadata (meta.Link records, through the
tracker's Metadata): per link, the replica's UUID, the secondary's address, the
cursor (the snappoint whose interval the replica holds), the last cycle and
whether a full resync was asked for -- and, in memory only, each link's
state of the moment and its transfer progress (never worth an fsync).
What it promises: a link is identified by its replica's UUID (a link name
cannot be reused for another replica); what an agent did is durable before
the update returns; the RPO and the bytes pending are computed from the
chain, never stored.
"""
import dataclasses
import logging
import re
import time

from .errors import NotFoundError, RefusedError
from .meta import Link, RecordError
from .state import flocked
from .units import check_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Moment:
    """A link's state of the moment, kept in memory only (never worth an
    fsync): idle, syncing, transferring ...; the transfer's progress."""
    state: str | None = None
    progress: dict | None = None


TRANSIENT = tuple(f.name for f in dataclasses.fields(Moment))
FAILED = ("disconnected", "failing")     # what the agent's daemon reports of a failed cycle
FIELDS = tuple(f.name for f in dataclasses.fields(Link)) + TRANSIENT


@dataclasses.dataclass
class Counters:
    """What a link's agents reported since this server started, in memory
    only (metrics: counters that restart with the server)."""
    cycles_applied: int = 0
    cycles_failed: int = 0
    bytes_sent: int = 0           # data bytes of applied cycles
    zero_bytes_sent: int = 0


class Links:
    def __init__(self, sd, md, chain):
        """chain: the Tracker, for snappoints (find, seq) and map counts."""
        self.sd, self.md, self.chain = sd, md, chain
        self.transient = {}       # link -> Moment (never written)
        self.counters = {}        # link -> Counters (never written)

    def update(self, name, fields):
        """The agent of link `name` records what it did (only the server
        writes the metadata)."""
        check_name(name, "link name")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise RefusedError(f"unknown link fields {sorted(unknown)}")
        link = self.md.body.links.get(name) or Link()
        durable = {k: v for k, v in fields.items() if k not in TRANSIENT}
        try:
            changed = Link.from_json(dict(link.to_json(), **durable))
        except RecordError as e:
            raise RefusedError(f"link {name!r}: {e}") from None
        if link.replica_uuid and changed.replica_uuid != link.replica_uuid:
            raise RefusedError(f"link {name!r} replicates to replica {link.replica_uuid},"
                               f" not {changed.replica_uuid}; choose another --name")
        if durable.get("cursor") is not None:
            self.chain.find(changed.cursor)
        if durable and (name not in self.md.body.links    # a cycle's start repeats them
                        or changed.to_json() != link.to_json()):
            with self.md.change() as new:
                new.links[name] = changed
        now = self.transient.setdefault(name, Moment())
        for k in TRANSIENT:
            if k in fields:
                setattr(now, k, fields[k])
        self._count(name, fields)
        return self.view(name)

    def _count(self, name, fields):
        c = self.counters.setdefault(name, Counters())
        if fields.get("last_cycle"):          # the agent records an applied cycle
            c.cycles_applied += 1
            c.bytes_sent += int(fields["last_cycle"].get("bytes") or 0)
            c.zero_bytes_sent += int(fields["last_cycle"].get("zero_bytes") or 0)
        elif fields.get("state") in FAILED:
            c.cycles_failed += 1

    def resync(self, name):
        """The operator's remedy for a link whose changes cannot be trusted
        (a damaged closed map, a replica that is no image of this chain):
        its next cycle sends the whole volume (like DRBD's invalidate)."""
        self._known(name)
        with self.md.change() as new:
            new.links[name].resync = True
        log.warning("link %s: the next cycle replicates the whole volume", name)
        return {"link": name, "resync": True}

    def _known(self, name):
        if name not in self.md.body.links:
            raise NotFoundError(f"no link named {name!r} in {self.sd} (links: "
                                f"{', '.join(sorted(self.md.body.links)) or 'none'})")

    def set_paused(self, name, paused):
        """`prepl link pause/resume`: tracking goes on either way; a paused
        link's agent makes no cycle (its RPO grows) until it is resumed."""
        self._known(name)
        if self.md.body.links[name].paused != paused:
            with self.md.change() as new:
                new.links[name].paused = paused
        log.warning("link %s %s", name, "paused" if paused else "resumed")
        return {"link": name, "paused": paused}

    def remove(self, name):
        """`prepl link remove`: the link is forgotten (durably), then every
        snappoint of its own (NAME.N) that no other link needs is deleted,
        its interval merged forward and its snapshot freed.  Refused while
        its agent runs."""
        self._known(name)
        if flocked(self.sd.p(f"agent.{name}.lock")):
            raise RefusedError(f"the agent of link {name!r} runs: stop it first")
        with self.md.change() as new:
            del new.links[name]
        self.transient.pop(name, None)
        self.counters.pop(name, None)
        mine = re.compile(rf"{re.escape(name)}\.[0-9]+")
        freed = []
        for sp in list(self.md.body.snappoints):
            if mine.fullmatch(sp.name) and not self.is_base(sp.name):
                self.chain.snappoints.delete(sp.name)
                freed.append(sp.name)
        log.warning("link %s removed; snappoints freed: %s", name, ", ".join(freed) or "none")
        return {"link": name, "removed": True, "snappoints_freed": freed}

    def view(self, name):
        """The recorded fields of a link with its state of the moment (the
        status schema's link object)."""
        link = self.md.body.links.get(name) or Link()
        return dict(link.to_json(), **dataclasses.asdict(self.transient.get(name, Moment())))

    def cursor_seq(self, link):
        """The interval a link's replica holds (-1: none)."""
        sp = self.chain.find(link.cursor, None)
        return sp.seq if sp else -1

    def needing(self, seq, body=None):
        """The links whose next cycle needs interval seq."""
        body = body or self.md.body
        return [name for name, link in body.links.items() if self.cursor_seq(link) < seq]

    def is_base(self, snappoint):
        """The links whose cursor is this snappoint."""
        return [name for name, link in self.md.body.links.items() if link.cursor == snappoint]

    def status(self):
        return {name: self.link_status(name) for name in self.md.body.links}

    def link_status(self, name):
        """What an operator asks of a link: is its agent running, what does
        the replica hold, how old is it (RPO), how much is waiting."""
        state = self.transient.get(name, Moment()).state
        running = flocked(self.sd.p(f"agent.{name}.lock"))
        cursor = (self.md.body.links.get(name) or Link()).cursor
        sp = self.chain.find(cursor, None)
        return dict(
            self.view(name), name=name, agent_running=running,
            state="disconnected" if not running and state not in (None, "idle") else state,
            last_applied={"snappoint": cursor, "time": sp.created} if sp else None,
            rpo_seconds=round(time.time() - sp.created, 3) if sp else None,
            counters=dataclasses.asdict(self.counters.get(name, Counters())),
            bytes_pending=self.chain.blocks_after(sp.seq if sp else -1)
            * self.md.body.block_size)
