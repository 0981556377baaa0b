"""Power-loss test disk: ext4 on a disk with a volatile write cache.

Stack (all real processes, needs root)::

    ext4 mounted at MNT
      -> /dev/loopN                     (losetup, buffered I/O)
      -> FUSEDIR/disk                   (nbdfuse --unix SOCK)
      -> nbdkit python cachedisk.py     (write cache, control socket CTL)
      -> IMG                            (backing image: only flushed data)

``PowerLossDisk.crash()`` cuts the power (the cache disk drops unflushed
blocks and fails every request from then on) and tears the stack down;
``start()`` afterwards brings the filesystem back from the backing image
(mount replays the ext4 journal).  Every process is started and stopped by
PID; ``stop()`` is idempotent and works after partial start failures.

    with PowerLossDisk("/tmp/x", 128 << 20) as d:
        ...write files under d.mountpoint...
        d.crash("flushed")
        d.start()
"""

import json
import os
import signal
import socket
import subprocess
import time

from replication import nbdkit_bin

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "cachedisk.py")
DEFAULT_MKFS_ARGS = ("-b", "4096",
                     "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard")


class DiskError(Exception):
    pass


def _run(args, check=True, timeout=60):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise DiskError("%s failed (rc=%d): %s%s" % (
            " ".join(args), p.returncode, p.stdout, p.stderr))
    return p


def _is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _wait_for(cond, timeout, what, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise DiskError("%s: process exited with %s before ready%s" % (
                what, proc.returncode, _tail(log)))
        if time.monotonic() > deadline:
            raise DiskError("timeout waiting for %s%s" % (what, _tail(log)))
        time.sleep(0.05)


def _tail(log):
    if not log:
        return ""
    try:
        with open(log, errors="replace") as f:
            return "\n--- %s ---\n%s" % (log, f.read()[-2000:])
    except OSError:
        return ""


def _stop_proc(proc, timeout=10, sig=signal.SIGTERM):
    """Stop a Popen by PID: `sig`, wait, then SIGKILL.  Safe to repeat."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        proc.wait(timeout)


class CacheDisk:
    """nbdkit running cachedisk.py on a unix socket, plus its control client.

    Usable on its own for raw NBD tests (connect libnbd to ``self.sock``).
    """

    def __init__(self, image, sock, control, log, blocksize=None):
        self.image, self.sock, self.control, self.log = \
            image, sock, control, log
        self.blocksize = blocksize
        self.proc = None

    def start(self, timeout=30):
        if self.proc is not None and self.proc.poll() is None:
            return
        for p in (self.sock, self.control):
            if os.path.exists(p):
                os.unlink(p)
        args = [nbdkit_bin.binary(), "-f", "--exit-with-parent", "-U", self.sock,
                "python", PLUGIN, "file=" + self.image,
                "control=" + self.control]
        if self.blocksize:
            args.append("blocksize=%d" % self.blocksize)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf)
        _wait_for(self._control_ok, timeout, "nbdkit control socket",
                  self.proc, self.log)
        _wait_for(self._nbd_ok, timeout, "nbdkit NBD socket",
                  self.proc, self.log)

    def _nbd_ok(self):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(self.sock)
                return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False

    def _control_ok(self):
        try:
            return self.request({"op": "stats"}, timeout=5)["ok"]
        except (OSError, ValueError, KeyError):
            return False

    def request(self, req, timeout=60):
        """Send one JSON request on the control socket, return the reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def _checked(self, req):
        rep = self.request(req)
        if not rep.get("ok"):
            raise DiskError("control op %r failed: %s" % (req, rep))
        return rep

    def stats(self):
        return self._checked({"op": "stats"})

    def writeback(self, fraction, seed=0):
        return self._checked({"op": "writeback", "fraction": fraction,
                              "seed": seed})

    def crash(self, mode="flushed", seed=0, fraction=None, shutdown=True):
        """Cut the power; returns the reply ({"kept":K,"dropped":D,...}).
        shutdown=False: nbdkit stays up and fails every request with EIO."""
        req = {"op": "crash", "mode": mode, "seed": seed,
               "shutdown": shutdown}
        if fraction is not None:
            req["fraction"] = fraction
        return self._checked(req)

    def wait_exit(self, timeout=2):
        """After a crash nbdkit shuts itself down, but only once its NBD
        clients have disconnected (nbdkit 1.32 does not drop idle client
        connections on nbdkit.shutdown(), nor on SIGTERM with a serialized
        thread model).  The backing file was fsynced before the crash
        reply, so SIGKILL is safe."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_proc(self.proc, sig=signal.SIGKILL)

    def stop(self, timeout=3):
        """SIGTERM, then SIGKILL (see wait_exit).  nbdkit does not flush
        the plugin's cache on exit: unflushed data is lost either way."""
        _stop_proc(self.proc, timeout)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None


class NbdMount:
    """An NBD export as a filesystem: nbdfuse FUSEDIR/disk + a loop device
    (+ mkfs.ext4 if asked) + mount at MNT (ARCHITECTURE §7).  Everything is
    stopped by PID / device in reverse order; stop() is idempotent and works
    after partial start failures.  uri: an NBD URI (nbd+unix:///EXPORT?
    socket=SOCK); readonly mounts the export read-only at every layer."""

    def __init__(self, workdir, uri, readonly=False, mount_options=None,
                 mkfs_args=None):
        self.workdir = os.path.abspath(workdir)
        self.uri = uri
        self.readonly = readonly
        self.mount_options = mount_options
        self.mkfs_args = mkfs_args     # None: do not mkfs
        self.fusedir = os.path.join(self.workdir, "fuse")
        self.fusefile = os.path.join(self.fusedir, "disk")
        self.mountpoint = os.path.join(self.workdir, "mnt")
        self.fuse_proc = None
        self.loopdev = None
        self.mounted = False
        self.fsck_runs = []   # e2fsck outputs, if mount needed a repair

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        os.makedirs(self.fusedir, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        if self.fuse_proc is None or self.fuse_proc.poll() is not None:
            log = os.path.join(self.workdir, "nbdfuse.log")
            args = ["nbdfuse"] + (["-r"] if self.readonly else []) + \
                [self.fusefile, self.uri]
            with open(log, "ab") as logf:
                self.fuse_proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            _wait_for(lambda: _is_mounted(self.fusedir)
                      and os.path.exists(self.fusefile),
                      30, "nbdfuse", self.fuse_proc, log)
        if self.loopdev is None:
            self.loopdev = _run(["losetup", "-f", "--show"]
                                + (["-r"] if self.readonly else [])
                                + [self.fusefile]).stdout.strip()
        if self.mkfs_args is not None:
            _run(["mkfs.ext4", "-q", *self.mkfs_args, self.loopdev],
                 timeout=300)
            self.mkfs_args = None
        if not self.mounted:
            self._mount()

    def _mount(self):
        opts = [o for o in (self.mount_options,
                            "ro" if self.readonly else None) if o]
        args = ["mount", "-t", "ext4"] + (["-o", ",".join(opts)] if opts else [])
        args += [self.loopdev, self.mountpoint]
        p = _run(args, check=False)
        if p.returncode != 0 and not self.readonly:
            # Journal replay is normally enough; repair if mount refuses.
            fsck = _run(["e2fsck", "-fy", self.loopdev], check=False,
                        timeout=300)
            self.fsck_runs.append(fsck.stdout + fsck.stderr)
            if fsck.returncode >= 4:
                raise DiskError("e2fsck could not repair %s (rc=%d): %s" % (
                    self.loopdev, fsck.returncode, fsck.stdout))
            p = _run(args)
        elif p.returncode != 0:
            raise DiskError("mount %s failed: %s" % (self.uri, p.stderr))
        self.mounted = True

    def kill(self):
        """The export went away (power cut, server killed): kill nbdfuse
        hard so the kernel aborts the FUSE connection (every FUSE request
        fails instead of waiting), then detach everything lazily."""
        _stop_proc(self.fuse_proc, sig=signal.SIGKILL)
        self._teardown(lazy=True)

    def stop(self):
        """Clean unmount in reverse order.  Idempotent."""
        try:
            self._teardown(lazy=False)
        finally:
            _stop_proc(self.fuse_proc)

    def _teardown(self, lazy):
        errors = []
        if self.mounted or _is_mounted(self.mountpoint):
            if lazy or _run(["umount", self.mountpoint], check=False,
                            timeout=120).returncode != 0:
                if _is_mounted(self.mountpoint):
                    p = _run(["umount", "-l", self.mountpoint], check=False)
                    if p.returncode != 0:
                        errors.append(p.stderr)
            self.mounted = False
        if self.loopdev is not None:
            # A busy loop device (lazily unmounted fs) gets autoclear and
            # disappears when its last user goes away.
            p = _retry(["losetup", "-d", self.loopdev])
            if p.returncode != 0 and "No such device" not in p.stderr:
                errors.append(p.stderr)
            self.loopdev = None
        if _is_mounted(self.fusedir):
            # Clean: fusermount3 -u makes nbdfuse exit (it flushes on
            # release).  Otherwise, or if still busy: lazy unmount.
            if lazy or _retry(["fusermount3", "-u", self.fusedir]
                              ).returncode != 0:
                p = _run(["umount", "-l", self.fusedir], check=False)
                if p.returncode != 0 and _is_mounted(self.fusedir):
                    errors.append(p.stderr)
        if self.fuse_proc is not None:
            try:
                self.fuse_proc.wait(10)
            except subprocess.TimeoutExpired:
                _stop_proc(self.fuse_proc)
        if errors:
            raise DiskError("teardown problems: %s" % errors)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _retry(args, tries=20):
    for _ in range(tries):
        p = _run(args, check=False)
        if p.returncode == 0:
            return p
        time.sleep(0.1)
    return p


class PowerLossDisk:
    """ext4 on nbdfuse + loop on a CacheDisk.  See the module docstring."""

    def __init__(self, workdir, size=128 << 20, blocksize=None,
                 mount_options=None, mkfs_args=DEFAULT_MKFS_ARGS):
        self.workdir = os.path.abspath(workdir)
        self.size = size
        self.image = os.path.join(self.workdir, "disk.img")
        self.sock = os.path.join(self.workdir, "nbd.sock")
        self.control = os.path.join(self.workdir, "ctl.sock")
        self.disk = CacheDisk(self.image, self.sock, self.control,
                              os.path.join(self.workdir, "nbdkit.log"),
                              blocksize)
        self.fs = NbdMount(self.workdir, "nbd+unix:///?socket=" + self.sock,
                           mount_options=mount_options)
        self.mkfs_args = list(mkfs_args)
        self.last_crash = None
        self.last_stats = None   # cache disk stats taken by the last stop()

    # the mount's parts, for tests
    mountpoint = property(lambda self: self.fs.mountpoint)
    loopdev = property(lambda self: self.fs.loopdev)
    fusedir = property(lambda self: self.fs.fusedir)
    fuse_proc = property(lambda self: self.fs.fuse_proc)
    fsck_runs = property(lambda self: self.fs.fsck_runs)

    def start(self):
        try:
            os.makedirs(self.workdir, exist_ok=True)
            if not os.path.exists(self.image):
                with open(self.image, "wb") as f:
                    f.truncate(self.size)      # sparse
                self.fs.mkfs_args = self.mkfs_args
            self.disk.start()
            self.fs.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self):
        return self.disk.stats()

    def writeback(self, fraction, seed=0):
        return self.disk.writeback(fraction, seed)

    def crash(self, mode="flushed", seed=0, fraction=None):
        """Power cut, then tear the (now failing) stack down.

        Returns the crash reply ({"ok":true,"kept":K,"dropped":D}).
        Processes with files open on the mount will get EIO; close them
        before the next start() so the old loop device can go away.
        """
        try:
            self.last_crash = self.disk.crash(mode, seed, fraction)
        finally:
            try:
                self.fs.kill()
            finally:
                self.disk.wait_exit()
        return self.last_crash

    def stop(self):
        """Clean shutdown in reverse order.  Idempotent, never raises for
        parts that were not started."""
        try:
            self.fs.stop()
        finally:
            if self.disk.running:
                try:   # for checks like "a clean stop left nothing cached"
                    self.last_stats = self.disk.stats()
                except (OSError, ValueError, DiskError):
                    self.last_stats = None
            self.disk.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
