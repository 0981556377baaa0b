"""The metadata of a state directory: the one durable record of a node's
state, its typed records, and the one way to change it.

STATE/meta.json is {"format", "checksum", "body"}; the checksum is the
SHA-256 of the canonical JSON of body, so a damaged file is detected,
never trusted.  The body is read into typed records (Body, Interval,
Snappoint, SnapshotRecord, Link, Binding, Staging, Applied, Receipt,
IntervalRef); this module alone turns them into JSON and back, checking
every field's type (a body that does not fit is corrupt, never half-read).
Keys it does not know are kept as they are, except a link's transient
state and progress, which format 1 saved and nothing reads.

Memory follows the disk.  A server holds its body in a Metadata object.
A change edits a deep copy (`with md.change() as body: ...`), writes it
durably -- temp file, write, fsync, rename over meta.json, fsync of the
directory -- and only then makes the copy the body everybody reads.

* A failure before the rename (the temp file's write or fsync: ENOSPC,
  EIO; the rename itself) leaves the file and the memory as they were and
  raises MetadataWriteError with the errno: the operation failed, nothing
  changed, and it can be retried once the cause is gone.
* A failure after the rename (the directory's fsync) leaves the new file
  visible but perhaps not durable: nobody can tell which of the two a power
  loss would keep.  That is fail-stop: Metadata.fail_stop is called (the
  server logs and exits at once, like a crash) and the next start trusts
  whatever file it finds, recovering as after any unclean stop.
"""
import copy
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import faults
from .errors import MetadataFailStop, MetadataWriteError, PreplError, StateError

log = logging.getLogger(__name__)

FORMAT = 2     # 2: closed maps' digests are XXH3-128 ("xxh3-128:HEX"); 1: SHA-256 hex
NAME = "meta.json"
ROLES = ("primary", "secondary")


# ---- typed records ------------------------------------------------------------
class RecordError(ValueError):
    """A record's JSON lacks a field or has one of the wrong type; .where
    names it (e.g. "intervals[2].seq")."""

    def __init__(self, where):
        super().__init__(f"missing or invalid: {where}")
        self.where = where


_LOADERS = {}       # type hint -> its loader (built once: a body is read at every change)


def _loader(hint):
    """A function of a JSON value that returns it checked against the type
    hint (records built), or raises RecordError whose .where is the path
    below the value ("" for the value itself, ".field", "[3].field")."""
    load = _LOADERS.get(hint)
    if load is None:
        load = _LOADERS[hint] = _build_loader(hint)
    return load


def _bad(value):
    raise RecordError("")


def _build_loader(hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        load_inner = _loader(inner)
        return lambda value: None if value is None else load_inner(value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint._from
    if origin is list:
        return _list_loader(_loader(args[0]))
    if origin is dict:
        return _dict_loader(_loader(args[1]))
    if hint is float:
        return lambda value: value if type(value) in (int, float) else _bad(value)
    if hint in (int, str, bool):
        return lambda value: value if type(value) is hint else _bad(value)
    if hint is dict:
        return lambda value: copy.deepcopy(value) if isinstance(value, dict) else _bad(value)
    return _bad


def _list_loader(item):
    def load(value):
        if not isinstance(value, list):
            raise RecordError("")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except RecordError as e:
                raise RecordError(f"[{i}]{e.where}") from None
        return out
    return load


def _dict_loader(item):
    def load(value):
        if not (isinstance(value, dict) and all(type(k) is str for k in value)):
            raise RecordError("")
        out = {}
        for k, v in value.items():
            try:
                out[k] = item(v)
            except RecordError as e:
                raise RecordError(f".{k}{e.where}") from None
        return out
    return load


def _dump(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


class _Fields(typing.NamedTuple):
    """What reading and writing a record class needs of its fields, found
    once per class."""
    load: list        # [(name, loader, required)] of the fields __init__ takes
    dump: list        # [(name, leave out when None)] of every field
    known: frozenset  # every field's name


@dataclass
class Record:
    """A record of the metadata: its fields are its JSON keys; .extra holds
    the keys it does not know, written back as they were."""
    DROPPED = ()        # keys read and forgotten (transient ones old formats saved)
    OMIT_NONE = False   # optional fields that are None are left out of the JSON

    def __post_init__(self):
        self.extra = {}

    @classmethod
    def _fields(cls):
        f = cls.__dict__.get("_FIELDS")
        if f is None:
            hints, fields = typing.get_type_hints(cls), dataclasses.fields(cls)
            missing = dataclasses.MISSING
            f = _Fields([(x.name, _loader(hints[x.name]),
                          x.default is missing and x.default_factory is missing)
                         for x in fields if x.init],
                        [(x.name, cls.OMIT_NONE and x.default is None) for x in fields],
                        frozenset(x.name for x in fields))
            cls._FIELDS = f
        return f

    @classmethod
    def from_json(cls, doc, where=""):
        """The record of JSON object doc (RecordError if it does not fit,
        naming the field's path below where, e.g. "intervals[2].seq")."""
        try:
            return cls._from(doc)
        except RecordError as e:
            raise RecordError((where.rstrip(".") + e.where).lstrip(".") or "body") from None

    @classmethod
    def _from(cls, doc):
        if not isinstance(doc, dict):
            raise RecordError("")
        fields, kw = cls._fields(), {}
        for name, load, required in fields.load:
            if name in doc:
                try:
                    kw[name] = load(doc[name])
                except RecordError as e:
                    raise RecordError(f".{name}{e.where}") from None
            elif required:
                raise RecordError("." + name)
        rec = cls(**kw)
        rec.extra = {k: copy.deepcopy(v) for k, v in doc.items()
                     if k not in fields.known and k not in cls.DROPPED}
        return rec

    def to_json(self):
        out = copy.deepcopy(self.extra) if self.extra else {}
        for name, omit_none in self._fields().dump:
            value = getattr(self, name)
            if not (omit_none and value is None):
                out[name] = _dump(value)
        return out


class Geometric:
    """A record with a volume's size, region size and block size."""

    def geometry(self):
        """(size, region size, block size): what a replica must match."""
        return (self.size, self.region_size, self.block_size)


@dataclass
class IntervalRef(Record):
    """An interval as another node names it: its number, the snappoint that
    closed it and when (a manifest's base and target, a receipt's).  A name
    or time the sender left out stays out (a manifest's fingerprint is of
    what was sent)."""
    OMIT_NONE = True
    seq: int
    name: str | None = None
    time: float | None = None


@dataclass
class Interval(Record):
    """An interval of the chain: its map files and, once a snappoint closed
    it, their digests (replication/chain.py)."""
    seq: int
    maps: dict[str, str]              # map kind (replication/maps.py KINDS) -> file in maps/
    closed_by: str | None = None      # the snappoint that closed it (None: the open one)
    closed_at: float | None = None
    digests: dict[str, str] | None = None     # map kind -> digest, once closed
    damaged: str | None = None        # why its maps cannot be trusted (a merge of a damaged map)

    @property
    def closed(self):
        return self.closed_by is not None

    def ref(self):
        return IntervalRef(self.seq, self.closed_by, self.closed_at)


@dataclass
class SnapshotRecord(Record):
    """The files of a snapshot: snaps/sID.img and maps/sID.vmap."""
    id: int


@dataclass
class Snappoint(Record):
    name: str
    seq: int                          # the interval it closed
    created: float
    snapshot: SnapshotRecord | None = None    # None: dataless (or invalidated)
    invalidated: str | None = None    # why its snapshot was dropped


@dataclass
class Link(Record):
    """A replication link of a primary (replication/links.py); state and
    progress are transient and never written."""
    DROPPED = ("state", "progress")
    replica_uuid: str | None = None
    secondary: str | None = None      # its address (URI)
    cursor: str | None = None         # the snappoint whose image the replica holds
    tls_psk: str | None = None        # the key file its agent uses (the serve probe's too)
    last_cycle: dict | None = None    # the agent's account of its last cycle (for status)
    resync: bool = False              # the next cycle sends the whole volume
    paused: bool = False              # tracked, but no cycles (`prepl link pause`)


@dataclass
class Binding(Record):
    """Whose replica a secondary is: bound by its first commit."""
    primary_uuid: str
    bound_at: float
    size: int
    region_size: int
    block_size: int


@dataclass
class Manifest(Record, Geometric):
    """What a commit verifies: interval (base, target] of a primary, staged
    as extents with a digest (built, parsed and checked in
    replication/manifest.py; kept in a complete staging)."""
    version: int
    primary_uuid: str
    replica_uuid: str
    size: int
    region_size: int
    block_size: int
    base: IntervalRef | None
    target: IntervalRef
    extents: int
    bytes: int
    digest: str


@dataclass
class Staging(Record):
    """The interval a secondary receives (replication/staging.py)."""
    DROPPED = ("files",)      # saved by early format-1 versions, never read
    primary_uuid: str
    base: str                         # manifest.base_key: "none" or the base's seq
    target: str                       # the target's seq
    state: str                        # "receiving" or "complete"
    started: float
    in_place: bool = False            # the first interval, staged into the replica
    manifest: Manifest | None = None  # once complete
    manifest_digest: str | None = None
    bytes: int | None = None
    zero_bytes: int | None = None

    @property
    def complete(self):
        return self.state == "complete"

    def key(self):
        return (self.primary_uuid, self.base, self.target)


@dataclass
class Applied(Record):
    """The interval whose image a secondary's export "" serves."""
    OMIT_NONE = True
    target: IntervalRef
    base: IntervalRef | None
    applied_at: float
    seed: str | None = None           # the seed's snappoint, when a seed import applied it


@dataclass
class Receipt(Record):
    """What a secondary answers a commit with, and keeps (KEEP_RECEIPTS)."""
    replica_uuid: str
    primary_uuid: str
    base: IntervalRef | None
    target: IntervalRef
    manifest_digest: str
    bytes: int
    zero_bytes: int
    applied_at: float


@dataclass
class Promotion(Record):
    """What a primary promoted by failover was a replica of
    (replication/roles.py): the old primary's volume and the last interval
    the replica applied of it (the divergence point)."""
    from_volume_uuid: str
    divergence: IntervalRef
    at: float
    generation: int                   # the generation the failover began
    planned: bool = False             # by `prepl migrate`: nothing diverged


@dataclass
class Supersession(Record):
    """A primary whose replica was promoted (replication/roles.py): what
    it learned of the node that took over, and when.  Until it fails back
    (or is served with --force) its export "" refuses writes."""
    by_volume_uuid: str               # the promoted node's volume (the replica's UUID)
    by_uri: str | None                # where it was reached
    generation: int                   # the promoted node's generation
    promoted_at: float                # its failover, by its clock
    divergence: IntervalRef           # our last interval it holds
    learned_at: float                 # by our clock
    learned_by: str                   # "agent" (a cycle), "probe" (`prepl serve`), "failback"
    link: str | None = None


@dataclass
class Failback(Record):
    """A demoted node (replication/roles.py) until the first interval of
    its new primary is applied: it holds the new primary's image at base
    plus its own writes after the divergence point, the blocks set in its
    divergence map, which that interval must overwrite."""
    base: IntervalRef                 # the new primary's interval "failback" (the failover)
    map: str                          # file in maps/: a bit per block (the divergence map)
    digest: str                       # of that file (replication/maps.py file_digest)
    blocks: int                       # bits set in it
    at: float
    report: dict                      # what will be overwritten (roles.divergence_report)


@dataclass
class PrimaryInfo(Record, Geometric):
    """What a primary says of itself to other nodes (its export "info"):
    a failover's --peer check, a superseded primary's agent and probe, a
    failback."""
    role: str
    volume_uuid: str
    generation: int
    size: int
    region_size: int
    block_size: int
    promoted: Promotion | None = None
    superseded: Supersession | None = None
    failback_base: IntervalRef | None = None      # its interval "failback" (a promoted node)
    written_since_failover: int | None = None     # bytes (a promoted node)
    last_write: float | None = None   # its write clock (replication/writeclock.py)


@dataclass
class ReplicaInfo(Record, Geometric):
    """What a secondary says of its replica (its export "info", read by the
    agent before each cycle)."""
    role: str
    replica_uuid: str
    size: int
    region_size: int
    block_size: int
    tracked_since_empty: bool
    bound: Binding | None = None
    applied: Applied | None = None
    staging: Staging | None = None
    failback: Failback | None = None


@dataclass
class Body(Record, Geometric):
    """A node's metadata: its volume, the chain of intervals and snappoints,
    its links (a primary), its binding, staging, applied interval and
    receipts (a secondary)."""
    volume_uuid: str
    volume: str                       # the volume's path
    size: int
    region_size: int
    block_size: int
    role: str
    generation: int
    clean: bool                       # the last stop was clean
    intervals: list[Interval]         # the chain; the last one is open
    snappoints: list[Snappoint]
    links: dict[str, Link]
    al_extent: int
    created: float
    tracked_since_empty: bool         # created empty by `prepl init --size`
    next_seq: int
    next_snap_id: int
    next_file_id: int
    chain_truncated: bool = False     # a damaged map was merged away: not every change is held
    bound: Binding | None = None
    applied: Applied | None = None
    receipts: list[Receipt] = field(default_factory=list)
    staging: Staging | None = None
    promoted: Promotion | None = None     # a primary made by failover
    superseded: Supersession | None = None    # a primary whose replica was promoted
    failback: Failback | None = None      # a secondary made by failback, until it applies

    @property
    def open_interval(self):
        return self.intervals[-1]

    @property
    def closed_intervals(self):
        return self.intervals[:-1]

    def interval(self, seq):
        """The interval numbered seq, or None."""
        return next((iv for iv in self.intervals if iv.seq == seq), None)

    def closed_by(self, name):
        """The interval snappoint name closed, or None."""
        return next((iv for iv in self.intervals if iv.closed_by == name), None)

    def snappoint(self, name):
        """The snappoint named name, or None."""
        return next((sp for sp in self.snappoints if sp.name == name), None)

    def close_interval(self, name, when, digests, snapshot=None):
        """In a draft: the open interval closed by a new snappoint `name` at
        time when, with its maps' digests (snapshot: a SnapshotRecord or
        None); returns the closed interval."""
        closed = self.open_interval
        closed.closed_by, closed.closed_at, closed.digests = name, when, digests
        self.snappoints.append(Snappoint(name, closed.seq, when, snapshot))
        return closed

    def append_interval(self, opened):
        """In a draft: opened (numbered next_seq) becomes the open interval."""
        self.intervals.append(opened)
        self.next_seq = opened.seq + 1

    def take_file_id(self):
        n = self.next_file_id
        self.next_file_id = n + 1
        return n


def canonical(body):
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def checksum(body):
    return _checksum(canonical(body))


def _checksum(canon):
    return "sha256:" + hashlib.sha256(canon).hexdigest()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(state_path):
    """The metadata body of the state directory (a Body), checked: format,
    checksum, every record's fields."""
    path = os.path.join(state_path, NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not os.path.isdir(state_path):
            raise StateError(f"{state_path} does not exist: create it with `prepl init`")
        raise StateError(f"{state_path} is not a prepl state directory (no {NAME}): "
                         "create one with `prepl init`")
    except NotADirectoryError:
        raise StateError(f"{state_path} is not a directory, so no prepl state directory: "
                         "give the state directory (`prepl init` creates one)")
    except IsADirectoryError:
        raise StateError(f"{path} is a directory, not prepl metadata: the state directory "
                         "is damaged")
    try:
        doc = json.loads(raw)
        fmt = doc["format"]
        body = doc["body"]
        digest = doc["checksum"]
    except (ValueError, KeyError, TypeError):
        raise StateError(f"{path} is corrupt (not a prepl metadata document); "
                         "restore it from a backup or re-create the state directory")
    if type(fmt) is not int or fmt < 1:
        raise StateError(f"{path} is corrupt (format {fmt!r} is no prepl metadata "
                         "format); restore it from a backup or re-create the state "
                         "directory")
    if fmt > FORMAT:
        raise StateError(f"{path} has format {fmt!r}, newer than this prepl understands "
                         f"({FORMAT}): upgrade prepl")
    if digest != checksum(body):
        raise StateError(f"{path} is corrupt (checksum mismatch); nothing was changed. "
                         "Restore it from a backup or re-create the state directory")
    try:
        rec = Body.from_json(body)
        bad = None if rec.role in ROLES else "role"
        bad = bad or (None if rec.size > 0 else "size")
    except RecordError as e:
        bad = e.where
    if bad:
        raise StateError(f"{path} is corrupt (missing or invalid: {bad}) although "
                         "its checksum matches; nothing was changed. Restore it from a "
                         "backup or re-create the state directory")
    return rec


def write(state_path, body):
    """Atomically replaces the metadata with body (a Body); durable on
    return.  Raises
    MetadataWriteError (nothing changed) or MetadataFailStop (the new file
    is in place, its durability unknown)."""
    path = os.path.join(state_path, NAME)
    tmp = path + ".tmp"
    raw = body.to_json()
    try:
        Body.from_json(raw)      # what is written must read back (no field of a wrong type)
    except RecordError as e:
        raise PreplError(f"refusing to write the metadata {path}: {e} (a bug; nothing "
                         "was changed)") from None
    # {"body", "checksum", "format"} as json.dumps(sort_keys=True) would
    # write it, the body encoded once (a snappoint writes the metadata twice
    # and its thread holds the GIL, which every writer needs, while it encodes)
    canon = canonical(raw)
    data = b'{"body":%s,"checksum":"%s","format":%d}\n' % (canon, _checksum(canon).encode(),
                                                           FORMAT)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            faults.io("meta.write")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            faults.io("meta.fsync")
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.io("meta.rename")
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MetadataWriteError(path, e) from e
    try:
        faults.io("meta.dirsync")
        fsync_dir(state_path)
    except OSError as e:
        raise MetadataFailStop(f"the metadata {path} was replaced but its directory could not "
                               f"be synced ({e.strerror or e}): whether the change survives a "
                               "power loss is unknown; stopping (the next start trusts the "
                               "file)") from e


def _fail_stop_raise(err):
    raise err


class Metadata:
    """The last durable body of a state directory, held by its server.

    Read it through .body and never change that object: every change goes
    through change().  fail_stop(err) is called on a failure after the
    rename (see the module's text); by default it raises err."""

    def __init__(self, state_path, body):
        self.path = state_path
        self._body = body
        self.fail_stop = _fail_stop_raise
        self.writes = 0

    @property
    def body(self):
        return self._body

    @contextmanager
    def change(self):
        """Yields a deep copy of the body to edit; on a normal exit writes it
        durably and only then makes it the body.  An exception inside the
        block, or a failed write, leaves everything as it was."""
        new = self.draft()
        yield new
        self.commit(new)

    def draft(self):
        """A deep copy of the body, to edit and then commit().  (By pickle:
        a third of copy.deepcopy's time, and a snappoint's control thread
        holds the GIL, which every writer needs, while it copies.)"""
        return pickle.loads(pickle.dumps(self._body, pickle.HIGHEST_PROTOCOL))

    def commit(self, new):
        """Writes the edited copy new durably, then makes it the body."""
        try:
            write(self.path, new)
        except MetadataFailStop as e:
            log.critical("%s", e)
            self.fail_stop(e)
            raise
        self._body = new
        self.writes += 1
