"""A raw NBD client (fixed newstyle, simple replies) that misbehaves on
purpose where libnbd will not: export names with NUL bytes, invalid UTF-8
or over the protocol's 4096 bytes, requests over 64 MiB or wrapping past
2^64, requests left in flight, and payloads cut short.  The protocol is
NBD's doc/proto.md; only what the tests need is here.

    with RawNbd(path_or_(host, port)) as c:
        c.go("")                     # ("ok", size, flags) or ("error", NAME)
        c.request(CMD_READ, 0, 4096)
        err, handle, data = c.reply(4096)
"""
import socket
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO = 1, 2, 3, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR = {(1 << 31) + n: name for n, name in enumerate(
    ("?", "UNSUP", "POLICY", "INVALID", "PLATFORM", "TLS_REQD", "UNKNOWN", "SHUTDOWN",
     "BLOCK_SIZE_REQD", "TOO_BIG"))}
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6


class RawNbd:
    def __init__(self, address, timeout=20):
        if isinstance(address, tuple):
            self.s = socket.create_connection(address, timeout=timeout)
        else:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(str(address))
        hello = self.recv(18)
        assert hello[:16] == NBDMAGIC + IHAVEOPT, hello
        self.s.sendall(struct.pack(">I", 3))          # FIXED_NEWSTYLE | NO_ZEROES

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def recv(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.s.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"the server closed the connection after {len(out)} of {n} "
                               "bytes")
            out += chunk
        return bytes(out)

    def option(self, opt, data=b""):
        self.s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

    def option_reply(self, opt):
        magic, o, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC and o == opt, (hex(magic), o, opt)
        return rep, self.recv(length)

    def go(self, name):
        """NBD_OPT_GO: ("ok", size, flags) or ("error", NAME of NBD_REP_ERR_*)."""
        if isinstance(name, str):
            name = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = flags = None
        while True:
            rep, data = self.option_reply(OPT_GO)
            if rep == REP_ACK:
                return ("ok", size, flags)
            if rep == REP_INFO:
                if struct.unpack(">H", data[:2])[0] == 0:      # NBD_INFO_EXPORT
                    size, flags = struct.unpack(">QH", data[2:12])
                continue
            return ("error", REP_ERR.get(rep, hex(rep)))

    def list(self):
        """NBD_OPT_LIST: (names, None) or (None, NAME of NBD_REP_ERR_*)."""
        self.option(OPT_LIST)
        names = []
        while True:
            rep, data = self.option_reply(OPT_LIST)
            if rep == REP_ACK:
                return names, None
            if rep != REP_SERVER:
                return None, REP_ERR.get(rep, hex(rep))
            n = struct.unpack(">I", data[:4])[0]
            names.append(data[4:4 + n].decode(errors="replace"))

    def request(self, cmd, offset, length, handle=1, flags=0, payload=b""):
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
                       + payload)

    def reply(self, read_len=0):
        """(errno, handle, data) of a simple reply; read_len: bytes of data
        that follow a successful read."""
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return err, handle, (self.recv(read_len) if read_len and not err else b"")

    def call(self, cmd, offset, length, payload=b"", read_len=0):
        """One request and its reply; returns (errno, data)."""
        self.request(cmd, offset, length, payload=payload)
        err, _, data = self.reply(read_len)
        return err, data

    def close(self):
        self.s.close()
