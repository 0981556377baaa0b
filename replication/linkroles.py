"""What a cycle checks of the two nodes' roles before it moves anything
(ARCHITECTURE §4a), for the agent (replication/agent.py): this node must
be a primary, its link not paused; a peer promoted from this volume
supersedes it (the server records it); a peer that failed back onto this
superseded primary reinstates it; a peer failing back onto this primary
gives its divergence map, which the cycle sends as changes.  Each
refusal is a RefusedError that names the remedy (the agent exits 5)."""
import json
import logging

import numpy as np

from . import chain, native, peers, transport
from .errors import LinkPausedError, RefusedError
from .maps import bytes_digest

log = logging.getLogger(__name__)


def nblocks(body):
    return chain.geometry(body)[1]


def before_cycle(agent, body):
    """This node is a primary and the link is not paused."""
    check_primary(agent, body)
    check_not_paused(agent, body)


def check_peer_promoted(agent, body, doc):
    """The peer's info document doc: a node promoted from this primary
    (body: its metadata) supersedes it (recorded by the server, which
    fences ""): RefusedError."""
    try:
        peer = peers.primary_info(json.loads(doc))
    except ValueError:
        return
    if peer is not None and peers.promoted_from(body, peer):
        reply = agent.ctl("supersede", info=peer.to_json(), uri=agent.secondary_uri,
                          link=agent.name)
        raise RefusedError(f"{agent.secondary_uri} was promoted from this primary by a "
                           f"failover (generation {peer.generation}): {agent.sd} is "
                           f"superseded and serves \"\" read-only; {reply['remedy']}")


def check_not_paused(agent, body):
    link = body.links.get(agent.name)
    if link is not None and link.paused:
        raise LinkPausedError(f"link {agent.name!r} is paused: no cycle until `prepl link "
                              f"resume {agent.sd} {agent.name}`")


def check_primary(agent, body):
    """A node that a failback or migration made a secondary replicates
    nothing: its agent stops (exit 5)."""
    if body.role != "primary":
        of = body.bound.primary_uuid if body.bound else "?"
        raise RefusedError(f"{agent.sd} is a {body.role} now (a failback or migration "
                           f"made it the replica of {of}): this agent stops; run the "
                           "agent on the new primary, pointed at this node")


def reinstate(agent, body, info):
    """A superseded primary whose promoted node failed back onto it
    (--discard-my-data there) is the primary again: the server records
    it; else RefusedError."""
    s = body.superseded
    fb = info.failback
    if info.replica_uuid == s.by_volume_uuid and fb is not None and info.bound \
            and info.bound.primary_uuid == body.volume_uuid:
        agent.ctl("reinstate", info=info.to_json(), uri=agent.secondary_uri)
        log.warning("link %s: the promoted node %s failed back onto this primary: it "
                    "accepts writes again", agent.name, s.by_volume_uuid)
        return agent.sd.read_meta()
    raise RefusedError(f"{agent.sd} is superseded: its replica {s.by_volume_uuid} at "
                       f"{s.by_uri} was promoted by a failover (generation "
                       f"{s.generation}); no link replicates from it until it fails "
                       f"back (`prepl failback {agent.sd} --peer URI`)")


def divergence(agent, body, info):
    """A failback's divergence map, read from the secondary's export
    "divergence" and checked against the digest its info gives."""
    fb = info.failback
    nbytes = native.words_for(nblocks(body)) * 8
    h = agent.secondary("divergence")
    try:
        raw = transport.pread(h, nbytes, 0, agent.peer_timeout)
    finally:
        transport.close_nbd(h)
    bits = np.frombuffer(raw, dtype=np.uint64).copy()
    if bytes_digest(raw) != fb.digest or native.bm_count(bits, len(bits) * 64) != fb.blocks:
        raise RefusedError(f"the divergence map read from {agent.secondary_uri} does not "
                           "match the digest its info gives; the failback cannot be "
                           "trusted")
    log.warning("link %s: failback: sending the changes since interval %d and %d blocks "
                "the secondary wrote after the divergence point", agent.name,
                info.applied.target.seq, fb.blocks)
    return bits
