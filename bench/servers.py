"""The four ways the benchmark serves one backing image, behind one interface.

- ``Raw``: no server; fio opens the file itself (io_uring, O_DIRECT), or
  through the page cache (``RawCached``) for reference.
- ``Nbdkit``: ``nbdkit file``, a plain NBD server: no tracking, no snapshot.
- ``Qemu``: ``qemu-storage-daemon``. The origin is a ``file`` node
  (``aio=io_uring``: faster than the default ``aio=threads`` here; page
  cache as the others) exported writable over NBD with a
  ``block-dirty-bitmap`` on it (tracking only). A
  snapshot of N devices is one QMP ``transaction`` of ``blockdev-backup``
  ``sync=none`` actions: each inserts a ``copy-before-write`` filter node
  above the origin node (so the NBD export's writes now pass through it)
  that copies into a fresh qcow2 target; a ``snapshot-access`` node over each
  filter is exported read-only as the snapshot image.
- ``Ours``: ``blksnapd`` with its NBD server; snapshots through the control
  socket (JSON lines), images exported as ``snapshot/<name>``. With
  ``fuse_dir``, also its FUSE + loop frontend (``--fuse-dir``), for the
  local phase.

Every server runs from the benchmark's work directory and is stopped by the
process id it was started with.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse


def remove_stale(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def wait_for(path, what, proc=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {path} did not appear within {timeout} s")
        time.sleep(0.02)


def stop_process(proc, timeout=15.0):
    """Stops a process we started, by its pid (SIGTERM, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def nbd_uri(socket_path, export):
    return f"nbd+unix:///{urllib.parse.quote(export, safe='/')}?socket={socket_path}"


class Server:
    key = ""
    label = ""
    nbd = True
    snapshots = False

    def start(self, images):
        """Serves the image files `images`; returns nothing."""

    def stop(self):
        pass

    def pid(self):
        return None

    def origin_uri(self, i=0):
        raise NotImplementedError

    def image_uri(self, i=0):
        raise NotImplementedError

    def origin_target(self, i=0):
        """fio arguments that reach device i (the origin)."""
        return ["--ioengine=nbd", f"--uri={self.origin_uri(i)}"]

    def image_target(self, i=0):
        """fio arguments that reach the snapshot image of device i."""
        return ["--ioengine=nbd", f"--uri={self.image_uri(i)}"]

    def take(self, indices):
        """Takes one snapshot of the given devices; returns timings (s)."""
        raise NotImplementedError

    def drop(self):
        """Destroys the snapshot, if any."""


class Raw(Server):
    key = "raw"
    label = "raw file (io_uring, O_DIRECT)"
    nbd = False
    direct = True

    def start(self, images):
        self.images = images

    def origin_target(self, i=0):
        return ["--ioengine=io_uring", f"--direct={int(self.direct)}", f"--filename={self.images[i]}"]

    image_target = origin_target


class RawCached(Raw):
    key = "rawpc"
    label = "raw file (io_uring, page cache)"
    direct = False


class Nbdkit(Server):
    key = "nbdkit"
    label = "nbdkit file"

    def __init__(self, work):
        self.work = work
        self.proc = None

    def start(self, images):
        self.sock = os.path.join(self.work, "nbdkit.sock")
        if len(images) != 1:
            raise ValueError("nbdkit serves one image here")
        remove_stale(self.sock)
        self.log = open(os.path.join(self.work, "nbdkit.log"), "a")
        # -f: foreground, so the pid is nbdkit's own.
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", self.sock, "file", f"file={images[0]}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.sock, "nbdkit", self.proc)

    def stop(self):
        stop_process(self.proc)
        self.proc = None

    def pid(self):
        return self.proc.pid

    def origin_target(self, i=0):
        return ["--ioengine=nbd", f"--uri={nbd_uri(self.sock, '')}"]

    image_target = origin_target


class Qmp:
    """A minimal QMP client over a Unix socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())
        self.events = []
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        self.f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']['desc']}")
            return reply["return"]

    def wait_event(self, name, pred=lambda e: True, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and pred(e):
                    del self.events[: i + 1]
                    return e
            if time.monotonic() > deadline:
                raise RuntimeError(f"QMP: no {name} event within {timeout} s")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                line = self.f.readline()
            finally:
                self.sock.settimeout(None)
            if line:
                self.events.append(json.loads(line))

    def close(self):
        self.sock.close()


class Qemu(Server):
    key = "qemu"
    label = "qemu-storage-daemon"
    snapshots = True

    def __init__(self, work, cluster, aio="io_uring", iothread=False, direct=False):
        self.work = work
        self.cluster = cluster
        self.aio = aio
        self.iothread = iothread
        # cache=none for the origins (cache.direct=on; the copy-before-write
        # target keeps the page cache, as our difference storage does).
        self.direct = direct
        self.proc = None
        self.taken = []

    def start(self, images):
        self.images = []
        self.sock = os.path.join(self.work, "qsd-nbd.sock")
        self.qmp_sock = os.path.join(self.work, "qsd-qmp.sock")
        remove_stale(self.sock, self.qmp_sock)
        args = ["qemu-storage-daemon",
                "--chardev", f"socket,path={self.qmp_sock},server=on,wait=off,id=qmp0",
                "--monitor", "chardev=qmp0",
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}"]
        if self.iothread:
            args += ["--object", "iothread,id=io0"]
        self.log = open(os.path.join(self.work, "qsd.log"), "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.qmp_sock, "qemu-storage-daemon", self.proc)
        wait_for(self.sock, "qemu-storage-daemon", self.proc)
        self.qmp = Qmp(self.qmp_sock)
        for img in images:
            self.add(img)

    def add(self, img):
        """Serves one more image: a file node (cache=writeback, i.e. the
        page cache, like the other servers), exported writable, with a dirty
        bitmap at our tracking block size (tracking only)."""
        i = len(self.images)
        self.images.append(img)
        cache = {"cache": {"direct": True}} if self.direct else {}
        self.qmp.cmd("blockdev-add", driver="file", **{"node-name": f"disk{i}"}, filename=img,
                     aio=self.aio, **cache)
        extra = {"iothread": "io0"} if self.iothread else {}
        self.qmp.cmd("block-export-add", type="nbd", id=f"e{i}", **{"node-name": f"disk{i}"},
                     name=f"disk{i}", writable=True, **extra)
        self.qmp.cmd("block-dirty-bitmap-add", node=f"disk{i}", name="cbt", granularity=65536)

    def stop(self):
        if self.proc is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
        stop_process(self.proc)
        self.proc = None

    def pid(self):
        return self.proc.pid

    def origin_uri(self, i=0):
        return nbd_uri(self.sock, f"disk{i}")

    def image_uri(self, i=0):
        return nbd_uri(self.sock, f"snap{i}")

    def take(self, indices):
        for i in indices:
            path = os.path.join(self.work, f"qsd-target{i}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                            str(os.path.getsize(self.images[i]))], check=True)
            self.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": f"tgt{i}"},
                         file={"driver": "file", "filename": path, "aio": self.aio})
        actions = [{"type": "blockdev-backup",
                    "data": {"device": f"disk{i}", "target": f"tgt{i}", "sync": "none",
                             "job-id": f"fleece{i}", "filter-node-name": f"cbw{i}",
                             "x-perf": {"min-cluster-size": self.cluster}}}
                   for i in indices]
        t0 = time.monotonic()
        self.qmp.cmd("transaction", actions=actions)
        t1 = time.monotonic()
        for i in indices:
            self.qmp.cmd("blockdev-add", driver="snapshot-access", **{"node-name": f"snap{i}"},
                         file=f"cbw{i}")
            self.qmp.cmd("block-export-add", type="nbd", id=f"es{i}", **{"node-name": f"snap{i}"},
                         name=f"snap{i}", writable=False)
        t2 = time.monotonic()
        self.taken = list(indices)
        return {"take": t1 - t0, "ready": t2 - t0}

    def drop(self):
        for i in self.taken:
            self.qmp.cmd("block-export-del", id=f"es{i}")
            self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda e, i=i: e["data"]["id"] == f"es{i}")
            self.qmp.cmd("blockdev-del", **{"node-name": f"snap{i}"})
            self.qmp.cmd("block-job-cancel", device=f"fleece{i}")
            self.qmp.wait_event("JOB_STATUS_CHANGE",
                                lambda e, i=i: e["data"]["id"] == f"fleece{i}"
                                and e["data"]["status"] == "null")
            self.qmp.cmd("blockdev-del", **{"node-name": f"tgt{i}"})
            os.unlink(os.path.join(self.work, f"qsd-target{i}.qcow2"))
        self.taken = []


class Control:
    """blksnapd's control protocol: one JSON request per line. The daemon
    closes a connection idle for `control_idle_timeout_ms` (60 s by
    default), and other servers' jobs take longer than that: a connection
    idle for half of it is replaced before the next request."""

    IDLE = 30.0

    def __init__(self, path):
        self.path = path
        self.connect()

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)
        self.f = self.sock.makefile("rw")
        self.n = 0
        self.last = time.monotonic()

    def cmd(self, command, **args):
        if time.monotonic() - self.last > self.IDLE:
            self.close()
            self.connect()
        self.n += 1
        self.f.write(json.dumps({"id": self.n, "command": command, "args": args}) + "\n")
        self.f.flush()
        reply = json.loads(self.f.readline())
        self.last = time.monotonic()
        if not reply["ok"]:
            raise RuntimeError(f"blksnapd {command}: {reply['error']['message']}")
        return reply["result"]

    def close(self):
        self.sock.close()


class Ours(Server):
    key = "ours"
    label = "blksnapd"
    snapshots = True

    def __init__(self, work, bindir, config=None, fuse_dir=None):
        self.work = work
        self.bindir = bindir
        self.config = config
        self.fuse_dir = fuse_dir
        self.proc = None
        self.snapshot = None

    def start(self, images):
        self.images = images
        d = os.path.join(self.work, "blksnapd")
        os.makedirs(d, exist_ok=True)
        self.ctl_path = os.path.join(d, "control.sock")
        self.sock = os.path.join(d, "nbd.sock")
        self.storage = os.path.join(self.work, "diff")
        os.makedirs(self.storage, exist_ok=True)
        # A state dir of its own per start: a start must not re-attach the
        # images of an earlier phase (the daemon restores its records).
        state = tempfile.mkdtemp(prefix="state.", dir=d)
        args = [os.path.join(self.bindir, "blksnapd"), "--control", self.ctl_path,
                "--nbd-socket", self.sock, "--state-dir", state]
        if self.config:
            args += ["--config", self.config]
        if self.fuse_dir:
            args += ["--fuse-dir", self.fuse_dir]
        self.log = open(os.path.join(self.work, "blksnapd.log"), "a")
        env = dict(os.environ, BLKSNAP_LOG="warn")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_for(self.ctl_path, "blksnapd", self.proc)
        self.ctl = Control(self.ctl_path)
        self.images, self.names = [], []
        for img in images:
            self.add(img)

    def add(self, img, loop=False):
        """Attaches one more image; returns its loop device (with `loop`)."""
        self.images.append(img)
        extra = {"loop": True} if loop else {}
        r = self.ctl.cmd("attach", device=os.path.abspath(img), **extra)
        self.names.append(r["name"])
        return r.get("loop")

    def stop(self):
        if self.proc is not None:
            try:
                self.ctl.close()
            except Exception:
                pass
        stop_process(self.proc)
        self.proc = None

    def pid(self):
        return self.proc.pid

    def origin_uri(self, i=0):
        return nbd_uri(self.sock, self.names[i])

    def image_uri(self, i=0):
        return nbd_uri(self.sock, "snapshot/" + self.names[i])

    def take(self, indices):
        sid = self.ctl.cmd("snapshot_create", storage=self.storage,
                           devices=[self.names[i] for i in indices])["id"]
        t0 = time.monotonic()
        self.ctl.cmd("snapshot_take", id=sid)
        t1 = time.monotonic()
        self.snapshot = sid
        return {"take": t1 - t0, "ready": t1 - t0}

    def drop(self):
        if self.snapshot:
            self.ctl.cmd("snapshot_destroy", id=self.snapshot)
            self.snapshot = None
