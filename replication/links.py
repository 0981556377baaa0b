"""The replication links of a primary, as its server records them.

What it owns: body["links"] of the metadata (through the tracker's
Metadata): per link, the replica's UUID, the secondary's address, the
cursor (the snappoint whose interval the replica holds), the last cycle and
whether a full resync was asked for -- and, in memory only, each link's
state of the moment and its transfer progress (never worth an fsync).
What it promises: a link is identified by its replica's UUID (a link name
cannot be reused for another replica); what an agent did is durable before
the update returns; the RPO and the bytes pending are computed from the
chain, never stored.
"""
import logging
import time

from .errors import NotFoundError, RefusedError
from .state import flocked
from .units import check_name

log = logging.getLogger(__name__)

FIELDS = ("replica_uuid", "secondary", "cursor", "state", "last_cycle", "progress", "resync")
TRANSIENT = {"state", "progress"}


class Links:
    def __init__(self, sd, md, chain):
        """chain: the Tracker, for snappoints (find, seq) and map counts."""
        self.sd, self.md, self.chain = sd, md, chain
        self.transient = {}       # link -> fields never written (state, progress)

    def update(self, name, fields):
        """The agent of link `name` records what it did (only the server
        writes the metadata)."""
        check_name(name, "link name")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise RefusedError(f"unknown link fields {sorted(unknown)}")
        link = self.md.body["links"].get(name, {})
        if link.get("replica_uuid") and fields.get("replica_uuid") not in \
                (None, link["replica_uuid"]):
            raise RefusedError(f"link {name!r} replicates to replica {link['replica_uuid']},"
                               f" not {fields['replica_uuid']}; choose another --name")
        if fields.get("cursor") is not None:
            self.chain.find(fields["cursor"])
        durable = {k: v for k, v in fields.items() if k not in TRANSIENT}
        if durable:
            with self.md.change() as new:
                new["links"].setdefault(name, {}).update(durable)
        now = self.transient.setdefault(name, {})
        now.update({k: v for k, v in fields.items() if k in TRANSIENT})
        return self.view(name)

    def resync(self, name):
        """The operator's remedy for a link whose changes cannot be trusted
        (a damaged closed map, a replica that is no image of this chain):
        its next cycle sends the whole volume (like DRBD's invalidate)."""
        if name not in self.md.body["links"]:
            raise NotFoundError(f"no link named {name!r} in {self.sd} (links: "
                                f"{', '.join(sorted(self.md.body['links'])) or 'none'})")
        with self.md.change() as new:
            new["links"][name]["resync"] = True
        log.warning("link %s: the next cycle replicates the whole volume", name)
        return {"link": name, "resync": True}

    def view(self, name):
        """The recorded fields of a link with its state of the moment."""
        return dict(self.md.body["links"].get(name, {}), **self.transient.get(name, {}))

    def cursor_seq(self, link):
        """The interval a link's replica holds (-1: none)."""
        sp = self.chain.find(link.get("cursor"), None)
        return sp["seq"] if sp else -1

    def needing(self, seq, body=None):
        """The links whose next cycle needs interval seq."""
        body = body or self.md.body
        return [name for name, link in body["links"].items() if self.cursor_seq(link) < seq]

    def is_base(self, snappoint):
        """The links whose cursor is this snappoint."""
        return [name for name, link in self.md.body["links"].items()
                if link.get("cursor") == snappoint]

    def status(self):
        return {name: self.link_status(name) for name in self.md.body["links"]}

    def link_status(self, name):
        """What an operator asks of a link: is its agent running, what does
        the replica hold, how old is it (RPO), how much is waiting."""
        link = self.view(name)
        out = dict(link, name=name)
        out["agent_running"] = flocked(self.sd.p(f"agent.{name}.lock"))
        if not out["agent_running"] and link.get("state") not in (None, "idle"):
            out["state"] = "disconnected"
        cursor = link.get("cursor")
        sp = self.chain.find(cursor, None)
        out["last_applied"] = {"snappoint": cursor, "time": sp["created"]} if sp else None
        out["rpo_seconds"] = round(time.time() - sp["created"], 3) if sp else None
        out["bytes_pending"] = self.chain.blocks_after(sp["seq"] if sp else -1) \
            * self.md.body["block_size"]
        return out
