"""replication/links.py: what an agent records is checked (fields, types,
the replica it belongs to) before anything is written; transient fields
never reach the file; a refused update changes neither file nor memory."""
import json

import pytest

from replication import meta, state
from replication.errors import NotFoundError, RefusedError
from replication.links import Links


class Chain:
    """The tracker's part that links ask (snappoints by name, map counts)."""

    def __init__(self, md):
        self.md = md

    def find(self, name, default=NotFoundError):
        sp = self.md.body.snappoint(name)
        if sp is None and default is NotFoundError:
            raise NotFoundError(f"no snappoint named {name!r}")
        return sp or default

    def blocks_after(self, seq):
        return 0


@pytest.fixture
def links(tmp_path):
    sd, body = state.init(tmp_path / "st", tmp_path / "v.img", size=1 << 20)
    md = meta.Metadata(sd.path, body)
    with md.change() as b:
        b.snappoints.append(meta.Snappoint("a", 0, 1.0))
    return Links(sd, md, Chain(md)), md, tmp_path / "st" / "meta.json"


def file_links(path):
    return json.loads(path.read_text())["body"]["links"]


def test_durable_fields_written_transient_ones_not(links):
    ln, md, path = links
    view = ln.update("dr", {"replica_uuid": "r1", "cursor": "a", "state": "syncing",
                            "progress": {"percent": 5}})
    assert view["state"] == "syncing" and view["progress"] == {"percent": 5}
    assert file_links(path) == {"dr": {"replica_uuid": "r1", "secondary": None, "cursor": "a",
                                       "last_cycle": None, "resync": False, "tls_psk": None,
                                       "paused": False}}
    assert md.body.links["dr"] == meta.Link(replica_uuid="r1", cursor="a")


@pytest.mark.parametrize("fields,msg", [
    ({"cursor": 7}, "missing or invalid: cursor"),
    ({"resync": "yes"}, "missing or invalid: resync"),
    ({"last_cycle": [1]}, "missing or invalid: last_cycle"),
    ({"colour": "red"}, "unknown link fields"),
    ({"replica_uuid": "r2"}, "replicates to replica r1"),
    ({"cursor": "nope"}, "no snappoint named 'nope'"),
])
def test_bad_updates_are_refused_and_change_nothing(links, fields, msg):
    ln, md, path = links
    ln.update("dr", {"replica_uuid": "r1"})
    before, body = path.read_bytes(), md.body
    with pytest.raises((RefusedError, NotFoundError), match=msg):
        ln.update("dr", fields)
    assert path.read_bytes() == before and md.body is body


def test_resync_is_recorded_and_unknown_links_named(links):
    ln, md, path = links
    with pytest.raises(NotFoundError, match="links: none"):
        ln.resync("dr")
    ln.update("dr", {"replica_uuid": "r1"})
    ln.resync("dr")
    assert file_links(path)["dr"]["resync"] is True
    assert ln.needing(1) == ["dr"] and ln.is_base("a") == []
