"""The dashboard in headless Chromium (drive.js, playwright-core on Debian's chromium) on a running 3-node
cluster of faed processes under `fae bench` load: the charts' values change between two samples, the cluster
view lists 3 members (with a link to each one's dashboard) and 1,024 vbucket cells; degrading a method from the
page is refused without the token, and with it makes the method's calls fail at once until it is restored from
the page; draining a member from its own dashboard moves its vbuckets away and it exits 0.

Screenshots are kept in target/test-artifacts/dashboard/. Every process is stopped by PID at the end.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAED = os.environ.get("FAED_BIN", str(REPO / "target" / "debug" / "faed"))
FAE = str(Path(FAED).with_name("fae"))
HERE = Path(__file__).resolve().parent
ARTIFACTS = REPO / "target" / "test-artifacts" / "dashboard"
TOKEN = "dashboard-test-token-0123456789"
HOST = "127.0.0.1"
METHOD = "lc_get"
T0 = 0.0


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def get_json(port, path):
    with urllib.request.urlopen("http://%s:%d%s" % (HOST, port, path), timeout=5) as r:
        return json.loads(r.read())


def wait_for(what, seconds, f):
    end = time.monotonic() + seconds
    last = None
    while time.monotonic() < end:
        try:
            v = f()
            if v:
                return v
        except OSError as e:
            last = e
        time.sleep(0.2)
    pytest.fail("%s: not within %s s (last error: %s)" % (what, seconds, last))


class Node(object):
    def __init__(self, root, name):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.port, self.admin, self.raft = free_ports(3)
        (self.dir / "faed.toml").write_text(
            '[server]\nlisten = "%s:%d"\n\n[admin]\nlisten = "%s:%d"\ntoken = "%s"\n\n'
            '[cluster]\nfailover_timeout_ms = 3000\n\n[log]\nlevel = "warn"\n'
            % (HOST, self.port, HOST, self.admin, TOKEN))
        self.proc = None

    def start(self, *extra):
        self.log = open(self.dir / "faed.log", "ab")
        self.proc = subprocess.Popen(
            [FAED, "-c", str(self.dir / "faed.toml"), "--cluster-listen", "%s:%d" % (HOST, self.raft),
             "--data-dir", str(self.dir / "data")] + list(extra),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self):
        return (self.dir / "faed.log").read_text(errors="replace")[-3000:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def cluster(tmp_path):
    if not os.access(FAED, os.X_OK):
        pytest.fail("faed not built: %s" % FAED)
    nodes = [Node(tmp_path, n) for n in "abc"]
    try:
        nodes[0].start("--bootstrap")
        wait_for("node a's admin port", 20, lambda: get_json(nodes[0].admin, "/api/cluster"))
        for n in nodes[1:]:
            n.start("--join", "%s:%d" % (HOST, nodes[0].raft))

        def settled():
            c = get_json(nodes[0].admin, "/api/cluster")
            return (len(c["members"]) == 3 and not c["pending"]
                    and all(m["vbuckets"] > 0 for m in c["members"]))
        wait_for("3 members, the vbuckets spread", 60, settled)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_dashboard_on_a_three_node_cluster_under_load(cluster):
    a, b, c = cluster
    global T0
    T0 = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    bench = subprocess.Popen([FAE, "bench", "%s:%d" % (HOST, a.port), "-c", "4", "-d", "4", "-t", "60",
                              "--warmup", "0", "--mix", "lc_set:1,%s:2,ping:1" % METHOD],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    drive = subprocess.Popen(
        ["node", str(HERE / "drive.js"), json.dumps({
            "url": "http://%s:%d/" % (HOST, a.admin), "drainUrl": "http://%s:%d/" % (HOST, c.admin),
            "token": TOKEN, "artifacts": str(ARTIFACTS), "method": METHOD})],
        cwd=str(HERE), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def step(name):
        line = drive.stdout.readline()
        if not line:
            drive.wait(10)
            pytest.fail("drive.js ended before %r: %s" % (name, drive.stderr.read()[-3000:]))
        got = json.loads(line)
        print("%.1f s: %s" % (time.monotonic() - T0, got["step"]))
        assert got["step"] == name, got
        return got

    def proceed():
        drive.stdin.write("go\n")
        drive.stdin.flush()

    try:
        loaded = step("loaded")
        first, second = loaded["first"], loaded["second"]
        assert second["points"] > first["points"], (first, second)
        assert second["t"] != first["t"] and second["calls"] != first["calls"], (first, second)
        assert max(second["calls"]) > 100, "the calls/s chart does not show the load: %s" % second
        assert first["canvases"] >= 4, first
        cl = loaded["cluster"]
        assert len(cl["members"]) == 3 and cl["cells"] == 1024, cl
        assert cl["colours"] == 3, "vbuckets coloured by 3 owners: %s" % cl
        assert sorted(cl["links"]) == sorted("http://%s:%d/" % (HOST, n.admin) for n in cluster), cl
        assert "leader" in cl["summary"] and "term" in cl["summary"], cl
        assert not loaded["foreign"], "the page fetched from elsewhere: %s" % loaded["foreign"]
        assert not loaded["consoleErrors"], loaded["consoleErrors"]
        proceed()

        degraded = step("degraded")
        assert "401" in degraded["refused"], degraded
        # The method fails at once on node a; others carry on.
        msg = raw_call_error(a.port, METHOD)
        assert msg is not None and "degraded" in msg, msg
        assert raw_call_error(a.port, "ping") is None
        filt = get_json(a.admin, "/api/filters")
        assert filt["degraded"] == [METHOD], filt
        proceed()

        restored = step("restored")
        assert raw_call_error(a.port, METHOD) is None
        assert get_json(a.admin, "/api/filters")["degraded"] == [], restored
        rejected = get_json(a.admin, "/api/stats")["rejected"]["degraded"]
        assert rejected > 1, "the bench's calls were refused while degraded: %s" % rejected
        proceed()

        draining = step("draining")
        assert draining["status"] == 202 and "draining" in draining["body"], draining
        t0 = time.monotonic()
        rc = c.proc.wait(timeout=90)
        print("drained node exited after %.1f s" % (time.monotonic() - t0))
        assert rc == 0, "the drained node exited %s:\n%s" % (rc, c.log_tail())

        def moved():
            v = get_json(a.admin, "/api/cluster")
            owners = {m["id"]: m["vbuckets"] for m in v["members"]}
            return len(owners) == 2 and sum(owners.values()) == 1024 and not v["pending"]
        wait_for("the drained node's vbuckets on the other two", 30, moved)
        proceed()
        done = step("done")
        # The only errors: the refused degrade without the token.
        unexpected = [e for e in done["consoleErrors"] if "401" not in e]
        assert not unexpected and len(done["consoleErrors"]) <= 2, done
        assert drive.wait(20) == 0
    finally:
        for p in (drive, bench):
            if p.poll() is None:
                p.kill()
                p.wait()
    shots = sorted(p.name for p in ARTIFACTS.glob("dashboard-*.png"))
    assert shots == ["dashboard-cluster.png", "dashboard-degraded.png", "dashboard-restored.png"], shots
    for s in shots:
        assert (ARTIFACTS / s).stat().st_size > 10000, s


def raw_call_error(port, method):
    """Calls `method` (ping or lc_get) with a hand-built TBinaryProtocol message over the buffered transport;
    returns the TApplicationException's message, or None for a normal reply."""
    import struct

    def string(b):
        return struct.pack(">i", len(b)) + b

    def field(ftype, fid, payload):
        return struct.pack(">bh", ftype, fid) + payload

    ctx = field(12, 1, field(10, 1, struct.pack(">q", 7)) + field(11, 2, string(b"dashboard"))
                + field(10, 3, struct.pack(">q", 1)) + b"\x00")
    args = ctx + (field(11, 2, string(b"k")) if method == "lc_get" else b"") + b"\x00"
    msg = struct.pack(">I", 0x80010001) + string(method.encode()) + struct.pack(">i", 1) + args
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(msg)
        data = b""
        s.settimeout(5)
        while len(data) < 8:
            data += s.recv(65536)
        mtype = struct.unpack(">I", data[:4])[0] & 0xff
        if mtype != 3:
            return None
        # Exception: name, seqid, then struct {1: message string, 2: type i32}.
        nlen = struct.unpack(">i", data[4:8])[0]
        need = 8 + nlen + 4 + 3 + 4
        while len(data) < need:
            data += s.recv(65536)
        at = 8 + nlen + 4
        assert data[at] == 11, data
        mlen = struct.unpack(">i", data[at + 3:at + 7])[0]
        while len(data) < at + 7 + mlen:
            data += s.recv(65536)
        return data[at + 7:at + 7 + mlen].decode()
