"""A planned migration (ARCHITECTURE §4a), as `prepl migrate` runs it on
the primary: nothing lost, no resync, both volumes byte-identical.

The sequence, each step done by the node that owns it:
  1. the primary's server fences export "" once no write is in flight
     (replication/roles.py fence_when_quiet; refused if writes keep coming);
  2. a final cycle of the link to the peer (replication/agent.py);
  3. the peer promotes itself, asked through its export "promote" (only if
     it holds exactly that final interval of this volume);
  4. the primary's server demotes this node into the peer's secondary with
     the final interval as the common point and nothing pending.
A failure before 3, or a refusal of 3, unfences (nothing changed).  A
request 3 whose answer was lost leaves this node fenced unless the peer
then says it is not promoted.  After 3 the peer is the primary: running
the command again finds it promoted from this volume and does step 4 only
(a crash of this node in between leaves it superseded, which the same step
resolves).
"""
import logging

from . import faults, peers
from .agent import Agent
from .errors import PreplError, RefusedError

log = logging.getLogger(__name__)


def migrate(sd, peer_uri, tls_psk, name, wait_quiet, request, said=lambda r, p: None):
    """Runs the migration of state directory sd (a StateDir) to the peer
    at peer_uri; request(op, **kw) asks this node's server.  Returns (the
    demotion's reply, the peer's info, the final receipt as JSON or None
    when an earlier run had done it); said(receipt, reply) is told once
    the peer is promoted."""
    body = sd.read_meta()
    doc, why = peers.probe(peer_uri, tls_psk)
    if doc is None:
        raise PreplError(f"the peer at {peer_uri} does not answer ({why}); a migration needs "
                         "it running; nothing was changed")
    peer = peers.primary_info(doc)
    final = None
    if peer is None or not peers.promoted_from(body, peer):
        link = _check(sd, body, doc, peer_uri, name, request)
        request("fence", wait_quiet=wait_quiet, timeout=wait_quiet + 60)
        asked = False
        try:
            receipt = Agent(sd.path, peer_uri, name=link, tls_psk_file=tls_psk).cycle()
            faults.point("migrate.before_promote")
            asked = True
            reply = peers.promote(peer_uri, tls_psk, body.volume_uuid, receipt.target)
        except BaseException as e:
            if asked and not isinstance(e, RefusedError) and \
                    _promoted_maybe(body, peer_uri, tls_psk):
                raise PreplError(f"{e}\nwhether {peer_uri} promoted itself is unknown: this "
                                 "node keeps refusing writes; run `prepl migrate` again to "
                                 "finish (or restart its server if the peer is not "
                                 "promoted)") from None
            _unfence(request)
            raise
        said(receipt, reply)
        faults.point("migrate.promoted")
        final = receipt.to_json()
        doc, why = peers.probe(peer_uri, tls_psk)
        if doc is None:
            raise PreplError(f"the promoted peer at {peer_uri} does not answer ({why}); run "
                             "`prepl migrate` again to finish")
    res = request("failback", info=doc, uri=peer_uri, peer_uuid=doc.get("volume_uuid"),
                  migrate=True)
    return res, doc, final


def _unfence(request):
    try:
        request("unfence")
    except PreplError as e:
        log.error("could not accept writes again (%s); restart the server", e)


def _promoted_maybe(body, peer_uri, tls_psk):
    """After a promote request failed without an answer: True unless the
    peer now says it is not promoted from this volume."""
    doc, _ = peers.probe(peer_uri, tls_psk)
    if doc is None:
        return True
    info = peers.primary_info(doc)
    return info is not None and peers.promoted_from(body, info)


def _check(sd, body, doc, peer_uri, name, request):
    """The link to migrate over (RefusedError if there is none to)."""
    if body.role != "primary":
        raise RefusedError(f"{sd.path} is a {body.role}: migrate runs on the primary")
    if doc.get("role") != "secondary" or (doc.get("bound") or {}).get(
            "primary_uuid") != body.volume_uuid:
        raise RefusedError(f"{peer_uri} is no secondary of this volume ({body.volume_uuid}) "
                           "holding an interval of it: nothing to migrate to (replicate to "
                           "it first); nothing was changed")
    link = next((n for n, ln in body.links.items()
                 if ln.replica_uuid == doc.get("replica_uuid")), name)
    st = request("status")
    if (st.get("links", {}).get(link) or {}).get("agent_running"):
        raise RefusedError(f"the agent of link {link!r} runs: stop it first (its unit or "
                           "process); the migration makes its final cycle itself")
    return link
