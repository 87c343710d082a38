"""The driver of scripts/bench-failover (run by it, after the release build). See that script's header."""

import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAED = os.path.join(ROOT, "target/release/faed")
FAE = os.path.join(ROOT, "target/release/fae")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
FAILOVER_MS = int(os.environ.get("FAILOVER_MS", "0"))  # 0: faed's default
BEFORE_FAED = os.environ.get("BEFORE_FAED", "")
VBUCKETS = 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench-failover: nothing listens on 127.0.0.1:{port}")


# ---- a minimal Thrift binary-protocol client (buffered transport) ----------------------------------------

def tstring(fid, b):
    return struct.pack(">bhi", 11, fid, len(b)) + b


def call_bytes(name, seq, args):
    ctx = struct.pack(">bh", 12, 1) + struct.pack(">bhq", 10, 1, 1) + tstring(2, b"bench") \
        + struct.pack(">bhq", 10, 3, 0) + b"\x00"
    head = struct.pack(">Ii", 0x80010001, len(name)) + name + struct.pack(">i", seq)
    return head + ctx + args + b"\x00"


def read_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise OSError("closed")
        out += chunk
    return out


def skip(s, t):
    sizes = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}
    if t in sizes:
        read_exact(s, sizes[t])
    elif t == 11:
        (n,) = struct.unpack(">i", read_exact(s, 4))
        read_exact(s, n)
    elif t == 12:
        while True:
            (ft,) = struct.unpack(">b", read_exact(s, 1))
            if ft == 0:
                return
            read_exact(s, 2)
            skip(s, ft)
    elif t in (13,):
        kt, vt, n = struct.unpack(">bbi", read_exact(s, 6))
        for _ in range(n):
            skip(s, kt)
            skip(s, vt)
    elif t in (14, 15):
        et, n = struct.unpack(">bi", read_exact(s, 5))
        for _ in range(n):
            skip(s, et)
    else:
        raise OSError(f"type {t}")


def call_ok(s, msg):
    """Sends one call; True if the reply is a REPLY whose success field is true."""
    s.sendall(msg)
    (v,) = struct.unpack(">I", read_exact(s, 4))
    (n,) = struct.unpack(">i", read_exact(s, 4))
    read_exact(s, n + 4)
    mtype = v & 0xFF
    ok = False
    while True:
        (ft,) = struct.unpack(">b", read_exact(s, 1))
        if ft == 0:
            break
        (fid,) = struct.unpack(">h", read_exact(s, 2))
        if mtype == 2 and fid == 0 and ft == 2:
            ok = read_exact(s, 1) == b"\x01"
        else:
            skip(s, ft)
    return mtype == 2 and ok


def lc_set(seq, key, value):
    return call_bytes(b"lc_set", seq, tstring(2, key) + tstring(3, value))


# ---- the cluster ---------------------------------------------------------------------------------------

class Node:
    def __init__(self, work, i):
        self.i = i
        self.name = "ABC"[i]
        self.rpc, self.admin, self.raft = free_port(), free_port(), free_port()
        self.dir = os.path.join(work, f"node{i}")
        self.config = os.path.join(work, f"node{i}.toml")
        with open(self.config, "w") as f:
            f.write("[cluster]\n" + (f"failover_timeout_ms = {FAILOVER_MS}\n" if FAILOVER_MS else ""))
        self.log = os.path.join(work, f"node{i}.log")
        self.proc = None

    def start(self, *extra, faed=FAED):
        argv = [faed, "-c", self.config, "--listen", f"127.0.0.1:{self.rpc}",
                "--admin", f"127.0.0.1:{self.admin}", "--cluster-listen", f"127.0.0.1:{self.raft}",
                "--data-dir", self.dir, "--log-level", "warn", *extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"))
        wait_port(self.rpc)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cluster(self):
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/api/cluster", timeout=5) as r:
            return json.load(r)


def settled(node, n):
    try:
        c = node.cluster()
    except OSError:
        return False
    counts = sorted(m["vbuckets"] for m in c["members"])
    even = sorted(VBUCKETS // n + (1 if k < VBUCKETS % n else 0) for k in range(n))
    voters = [m for m in c["members"] if m["state"] == "Voter"]
    return len(voters) == n and not c["pending"] and counts[-n:] == even


def wait(what, cond, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise SystemExit(f"bench-failover: {what} not within {timeout} s")


def key_owned_by(view, owner_id, round_):
    for i in range(100000):
        k = f"failover:{round_}:{i}".encode()
        if view["vbuckets"][zlib.crc32(k) % VBUCKETS] == owner_id:
            return k
    raise SystemExit("no key found")


def start_cluster(work, faed=FAED):
    nodes = [Node(work, i) for i in range(3)]
    nodes[0].start("--bootstrap", faed=faed)
    for n in nodes[1:]:
        n.start("--join", f"127.0.0.1:{nodes[0].raft}", faed=faed)
    wait("the map to settle", lambda: settled(nodes[0], 3))
    return nodes


def recovery(nodes):
    times = []
    for r in range(ROUNDS):
        victim = nodes[1 + r % 2]
        entry = nodes[0]
        view = entry.cluster()
        my = {m["rpc_addr"]: m["id"] for m in view["members"]}
        vid = my[f"127.0.0.1:{victim.rpc}"]
        key = key_owned_by(view, vid, r)
        s = socket.create_connection(("127.0.0.1", entry.rpc), timeout=5)
        assert call_ok(s, lc_set(1, key, b"before")), "lc_set before the kill"
        victim.kill9()
        t0 = time.monotonic()
        seq = 2
        while True:
            try:
                if call_ok(s, lc_set(seq, key, b"after")):
                    break
            except OSError:
                s = socket.create_connection(("127.0.0.1", entry.rpc), timeout=5)
            seq += 1
            if time.monotonic() - t0 > 60:
                raise SystemExit("bench-failover: no recovery within 60 s")
            time.sleep(0.01)
        took = time.monotonic() - t0
        times.append(took)
        print(f"round {r + 1}: node {victim.name} killed; lc_set of its key succeeded through node "
              f"{entry.name} after {took:.2f} s", flush=True)
        s.close()
        victim.start()
        wait("the map to settle again", lambda: settled(entry, 3))
    return times


def lock_rate(node, secs=10):
    out = subprocess.run([FAE, "bench", f"127.0.0.1:{node.rpc}", "-m", "lock", "-c", "64", "-d", "1",
                          "-t", str(secs), "--keys", "10000", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, kernel {os.uname().release}; "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    print(f"command: scripts/bench-failover {ROUNDS}" + (f" (FAILOVER_MS={FAILOVER_MS})" if FAILOVER_MS else "")
          + (" with BEFORE_FAED" if BEFORE_FAED else ""))
    with tempfile.TemporaryDirectory() as work:
        nodes = start_cluster(work)
        try:
            times = recovery(nodes)
            print(f"recovery after kill -9 of an owner: median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f}) over {len(times)} rounds")
        finally:
            for n in nodes:
                n.stop()
    # Lock calls/s on fresh clusters: after a restart or a failover the vbuckets concerned grant no lock
    # for lock.ttl_ms (the fence), which would be measured instead.
    rows = []
    for name, faed in [("before issue 10", BEFORE_FAED), ("this tree", FAED)]:
        if not faed:
            continue
        with tempfile.TemporaryDirectory() as work:
            nodes = start_cluster(work, faed=faed)
            try:
                rows.append((name, lock_rate(nodes[0])))
            finally:
                for n in nodes:
                    n.stop()
    print()
    print("| faed | lock calls/s | p50 us | p99 us | errors |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['calls_per_sec']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r.get('errors', 0)} |")
    if len(rows) == 2:
        print(f"\nratio (this tree / before): {rows[1][1]['calls_per_sec'] / rows[0][1]['calls_per_sec']:.2f}")


if __name__ == "__main__":
    main()
