"""What this node learns from and asks of another node, over NBD only
(ARCHITECTURE §3): what it is (its export "info": probe), whether it was
promoted from this volume, and a migration's promotion (its export
"promote").  Nothing here changes this node's state."""
import json

import nbd

from . import transport
from .errors import RefusedError
from .meta import PrimaryInfo, RecordError
from .transport import TransportError

PSK_USER = "prepl"     # the TLS-PSK username `prepl keygen` writes


def _open(uri, export, tls_psk_file, timeout):
    return transport.open_nbd(uri, export=export, tls_psk_file=tls_psk_file,
                              tls_username=PSK_USER if tls_psk_file else None,
                              connect_timeout=timeout)


def probe(uri, tls_psk_file=None, timeout=5.0):
    """What the node at NBD address uri says of itself (its export "info",
    a JSON object), or (None, why) if it cannot be reached within timeout
    seconds (nothing answers, or it serves no such export)."""
    try:
        h = _open(uri, "info", tls_psk_file, timeout)
    except (TransportError, nbd.Error, OSError) as e:
        return None, str(e)
    try:
        doc = transport.read_document(h, timeout)
        return json.loads(doc), None
    except (TransportError, nbd.Error, ValueError) as e:
        return None, f"its info export could not be read: {e}"
    finally:
        transport.close_nbd(h)


def primary_info(doc):
    """The PrimaryInfo in an info document (a dict), or None if it is no
    primary's."""
    if not isinstance(doc, dict) or doc.get("role") != "primary":
        return None
    try:
        return PrimaryInfo.from_json(doc)
    except RecordError:
        return None


def promoted_from(body, info):
    """Whether info (a PrimaryInfo) is a node promoted by a failover from
    the volume of body (a Body)."""
    return (info.role == "primary" and info.promoted is not None
            and info.promoted.from_volume_uuid == body.volume_uuid)


def promote(uri, tls_psk_file, primary_uuid, target, timeout=60.0):
    """A migration's last step on the peer: its export "promote" is asked
    to promote it, if it holds interval target (an IntervalRef) of volume
    primary_uuid; returns the reply (RefusedError if refused)."""
    h = _open(uri, "promote", tls_psk_file, timeout)
    try:
        req = {"primary_uuid": primary_uuid, "target": target.to_json()}
        transport.pwrite(h, json.dumps(req, sort_keys=True).encode(), 0, timeout)
        transport.flush(h, timeout)
        reply = json.loads(transport.pread(h, 65536, 0, timeout).split(b"\0", 1)[0])
    finally:
        transport.close_nbd(h)
    if not reply.get("ok"):
        raise RefusedError(f"{uri} refused to be promoted: {reply.get('error')}")
    return reply
