"""The XDP path end to end: real XDP program on a real veth pair, AF_XDP sockets, smoltcp, and the
Python, PHP and Rust clients calling every servant from the client namespace."""
import json
import os
import re
import signal
import subprocess
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (ADMIN_PORT, CLI_IP, FAE, KERNEL_PORT, NET, REPO, SRV_IP, XDP_PORT, Faed, fresh_lab,
                      backends_env, run, xdp_attached)

XDP_ADDR = "%s:%d" % (SRV_IP, XDP_PORT)
HERE = Path(__file__).resolve().parent


def queue_drops(f, lab, moved, timeout=10):
    """The XDP queues' `drops` once `moved(drops)` holds (the counters are published every second), or
    the last reading after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        d = [q["drops"] for q in f.stats(lab.cli)["xdp"]["queues"]]
        if moved(d) or time.monotonic() >= deadline:
            return d
        time.sleep(0.3)


def test_python_suite_over_xdp(lab, stores, served):
    # The whole Python suite (every servant, the memcache and Redis back ends, error paths, buffered and
    # framed, the fae_client helper, the admin counters) from the client namespace against the XDP path.
    env = dict(os.environ, FAE_ADDR=XDP_ADDR, FAE_ADMIN_PORT=str(ADMIN_PORT), FAE_BACKENDS=backends_env(stores))
    p = lab.cli_run("/usr/bin/python3", "-m", "pytest", str(REPO / "tests" / "python"), "-q",
                    "-p", "no:cacheprovider", env=env, check=False, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert re.search(r"\d+ passed", p.stdout), p.stdout[-2000:]


def test_php_suite_over_xdp(lab, stores, served):
    with tempfile.TemporaryDirectory() as gen:
        run("thrift", "--gen", "php", "-out", gen, str(REPO / "idl" / "fae.thrift"))
        p = lab.cli_run("php", str(REPO / "tests" / "php" / "test_fae.php"), SRV_IP, str(XDP_PORT), gen,
                        check=False, timeout=300)
        assert p.returncode == 0 and "php: " in p.stdout and " 0 failed" in p.stdout, p.stdout[-6000:] + p.stderr
        env = dict(os.environ, FAE_BACKENDS=backends_env(stores))
        for script, tag in (("test_backends.php", "php-backends: "), ("test_mysql.php", "php-mysql: ")):
            p = lab.cli_run("php", str(REPO / "tests" / "php" / script), SRV_IP, str(XDP_PORT), gen,
                            check=False, timeout=300, env=env)
            assert p.returncode == 0 and tag in p.stdout and " 0 failed" in p.stdout, p.stdout[-6000:] + p.stderr


def test_stopped_redis_does_not_hold_the_xdp_loops(lab, stores, served):
    # A call to a stopped store leaves the XDP loop for the back-end thread: noop keeps being answered on
    # the XDP path while it waits, and the call ends with a deadline error naming the store.
    r = stores["redis"][0]
    key = None
    for i in range(200):  # a key that the ketama ring places on the first Redis
        k = "xdp-stop-%d" % i
        p = lab.cli_run(FAE, "call", XDP_ADDR, "rd_call", "SET", "default", k, "v")
        assert p.stdout.strip() == "OK"
        got = run("ip", "netns", "exec", lab.cli, "bash", "-c",
                  "printf 'EXISTS %s\\r\\n' | timeout 1 nc -q 1 %s %d" % (k, SRV_IP, r.port), check=False).stdout
        if got.startswith(":1"):
            key = k
            break
    assert key, "no key of 200 on the first Redis"
    r.signal(signal.SIGSTOP)
    try:
        waiter = subprocess.Popen(["ip", "netns", "exec", lab.cli, FAE, "call", XDP_ADDR, "rd_call", "GET",
                                   "default", key], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        p = lab.cli_run(FAE, "check", XDP_ADDR, "-c", "8", "-n", "200", "--json", check=False)
        assert json.loads(p.stdout)["failures"] == 0, p.stdout
        assert waiter.poll() is None, "the rd_call to the stopped store ended before the in-memory calls"
        out, err = waiter.communicate(timeout=20)
        assert waiter.returncode == 1 and "late" in err and r.addr in err, (out, err)
    finally:
        r.signal(signal.SIGCONT)


@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_rust_client_64_connections_1000_calls(lab, served, transport):
    p = lab.cli_run(FAE, "check", XDP_ADDR, "-c", "64", "-n", "1000", "--transport", transport, "--json",
                    check=False, timeout=300)
    report = json.loads(p.stdout)
    assert p.returncode == 0 and report["failures"] == 0, report
    assert report["calls"] >= 64 * 1000


def test_one_mib_values(lab, served):
    p = lab.cli_run(FAE, "check", XDP_ADDR, "-c", "4", "-n", "30", "--value-size", str(1 << 20), "--json",
                    check=False, timeout=300)
    report = json.loads(p.stdout)
    assert p.returncode == 0 and report["failures"] == 0, report


def test_kernel_keeps_icmp_and_other_ports(lab, served):
    # While XDP is attached: ICMP still answered by the kernel, and the kernel's TCP service on another
    # port (faed's own kernel path on 9001) still works; ARP keeps working or neither would.
    lab.cli_run("ping", "-c", "3", "-i", "0.2", "-W", "2", SRV_IP)
    p = lab.cli_run(FAE, "ping", "%s:%d" % (SRV_IP, KERNEL_PORT))
    assert p.stdout.startswith("ver:")
    assert xdp_attached(lab.srv, lab.srv_if)


TCP_TIMESTAMP_CLIENT = r"""
import os, socket, struct, sys, time
# TCP_INFO's tcpi_options (byte 5): TCPI_OPT_TIMESTAMPS = 1, set when both sides sent the option.
addr, port, n, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def time_wait(local_port, within=10):
    # Waits until the connection from local_port is in TIME-WAIT (state 06 in /proc/net/tcp).
    end = time.monotonic() + within
    while time.monotonic() < end:
        for line in open("/proc/net/tcp").readlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == local_port and f[3] == "06":
                return
        time.sleep(0.05)
    print("port %d never reached TIME-WAIT" % local_port)
    sys.exit(2)

# A port below the ephemeral range: no other connection of the namespace (the kernel shares ephemeral
# ports between connections to different peers) holds it when the next connection binds it again.
local = ("0.0.0.0", 20000 + os.getpid() % 10000)
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(local)  # after the first connection: the port of the one before, now in TIME-WAIT
    s.settimeout(5)
    s.connect((addr, port))
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    if not info[5] & 1:
        print("no timestamps on connection %d" % i)
        sys.exit(1)
    local = s.getsockname()
    s.close()  # the client closes first: its port goes to TIME-WAIT
    if i + 1 < n:
        time_wait(local[1])
        time.sleep(pause)  # tcp_tw_reuse wants a second since the last timestamp seen
print("ok")
"""


def test_xdp_syn_ack_carries_timestamps_and_time_wait_ports_are_reused(lab, served):
    """The XDP path's SYN-ACK carries TCP timestamps (RFC 7323), as the kernel's does: a client with
    `tcp_tw_reuse` can then connect again from a port still in TIME-WAIT, which a PHP host opening a
    connection per request depends on."""
    lab.cli_run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    lab.cli_run("sysctl", "-qw", "net.ipv4.tcp_timestamps=1")
    # tcp_tw_reuse waits a second after the last timestamp seen on the old connection.
    p = lab.cli_run("/usr/bin/python3", "-c", TCP_TIMESTAMP_CLIENT, SRV_IP, str(XDP_PORT), "1", "0",
                    check=False)
    assert p.returncode == 0 and "ok" in p.stdout, (p.stdout, p.stderr)
    p = lab.cli_run("/usr/bin/python3", "-c", TCP_TIMESTAMP_CLIENT, SRV_IP, str(XDP_PORT), "3", "1.1",
                    check=False, timeout=90)
    assert p.returncode == 0 and "ok" in p.stdout, (p.stdout, p.stderr)


LOST_CONNECTION_CLIENT = r"""
import json, os, socket, sys, time
sys.path.insert(0, sys.argv[3])
from thrift_load import call, reply_to
addr, port = sys.argv[1], int(sys.argv[2])
TCP_REPAIR = 19  # linux/tcp.h: in repair mode, close() sends nothing to the peer

def noop(s, seq, x):
    s.sendall(call(seq, x))
    reply_to(s, x)

local = ("0.0.0.0", 10000 + os.getpid() % 10000)  # below the ephemeral range (and the port above)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(local)
s.settimeout(5)
s.connect((addr, port))
noop(s, 1, 11)
time.sleep(0.2)  # every ACK delivered: the connection is quiet
s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
s.close()  # gone here, established at the server, which hears nothing
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(local)
s.settimeout(8)
t0 = time.monotonic()
try:
    s.connect((addr, port))
except OSError as e:
    sys.exit("connect again from port %d: %r after %.1f s" % (local[1], e, time.monotonic() - t0))
took = time.monotonic() - t0
noop(s, 2, 22)
print(json.dumps({"connect_s": round(took, 3)}))
"""


def test_a_client_that_lost_its_connection_connects_again_from_the_same_port(lab, served):
    """A client loses an established connection without the server hearing of it (its reset was lost;
    here TCP_REPAIR closes the socket silently) and connects again from the same port. smoltcp ignores a
    SYN on an established socket, so the SYN went unanswered until the server's idle timeout (300 s).
    faed answers it with a challenge ACK (RFC 5961), as Linux does; the client's kernel answers that
    with a reset, which closes the stale connection, and sends its SYN again: it connects."""
    def challenges():
        return sum(q["repeated_syn"]["challenge_acks"] for q in served.stats(lab.cli)["xdp"]["queues"])
    before = challenges()
    p = lab.cli_run("/usr/bin/python3", "-c", LOST_CONNECTION_CLIENT, SRV_IP, str(XDP_PORT), str(HERE),
                    check=False, timeout=30)
    assert p.returncode == 0, (p.stdout, p.stderr, served.stats(lab.cli)["xdp"]["queues"])
    print("connected again after", json.loads(p.stdout)["connect_s"], "s")
    deadline = time.monotonic() + 5  # the counters are published every second
    while challenges() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert challenges() > before, served.stats(lab.cli)["xdp"]["queues"]
    text = served.metrics(lab.cli)
    assert re.search(r'^fae_xdp_queue_challenge_acks_total\{queue="\d+"\} [1-9]', text, re.M), text[-3000:]


def test_xdp_faed_drops_its_capabilities(lab, served):
    """faed, started as root, attached XDP and then gave up every capability but CAP_NET_BIND_SERVICE
    (bit 10), in every thread; the XDP path and its counters keep working without them."""
    for task in os.listdir("/proc/%d/task" % served.proc.pid):
        status = open("/proc/%d/task/%s/status" % (served.proc.pid, task)).read()
        for field in ("CapInh", "CapAmb"):
            assert re.search(r"^%s:\s+0{16}$" % field, status, re.M), (task, status)
        for field in ("CapPrm", "CapEff"):
            assert re.search(r"^%s:\s+0{13}400$" % field, status, re.M), (task, status)
    p = lab.cli_run(FAE, "check", XDP_ADDR, "-c", "2", "-n", "20", "--json", check=False)
    assert json.loads(p.stdout)["failures"] == 0, p.stdout
    assert served.stats(lab.cli)["xdp"]["redirected"] > 0


def test_xdp_counters_move(lab, served):
    before = served.stats(lab.cli)["xdp"]
    lab.cli_run(FAE, "check", XDP_ADDR, "-c", "2", "-n", "50")
    lab.cli_run("ping", "-c", "2", "-i", "0.2", "-W", "2", SRV_IP)
    after = served.stats(lab.cli)["xdp"]
    assert after["redirected"] > before["redirected"], (before, after)
    # Per queue: the sockets' counters (published every second) and the loops' calls.
    def queues_moved():
        q = served.stats(lab.cli)["xdp"]["queues"]
        return q if q and sum(x["rx_packets"] for x in q) > 0 and sum(x["calls"] for x in q) > 0 else None
    deadline = time.monotonic() + 5
    while not queues_moved() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queues_moved(), served.stats(lab.cli)["xdp"]
    assert after["passed"] > before["passed"], (before, after)
    text = served.metrics(lab.cli)
    assert re.search(r"^fae_xdp_redirected_total [1-9]", text, re.M), text[-2000:]
    assert re.search(r'^fae_xdp_queue_rx_packets_total\{queue="\d+"\} [1-9]', text, re.M), text[-2000:]
    # The kernel's own drop counters of each AF_XDP socket (XDP_STATISTICS) are read and published: a
    # calm lab drops nothing.
    for name in ("rx_ring_full", "rx_fill_empty", "rx_kernel_dropped", "tx_device_dropped", "tx_resent"):
        assert re.search(r'^fae_xdp_queue_%s_total\{queue="\d+"\} 0$' % name, text, re.M), (name, text[-3000:])
    drops = queues_moved()[0]["drops"]
    assert drops == {"rx_ring_full": 0, "rx_fill_empty": 0, "rx_other": 0, "tx_device": 0, "tx_resent": 0}, drops


def assert_detached(lab, when):
    """The XDP program leaves with the process that attached it (its link closes): within 5 s."""
    deadline = time.monotonic() + 5
    while xdp_attached(lab.srv, lab.srv_if) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not xdp_attached(lab.srv, lab.srv_if), "XDP program left attached " + when


def test_sigkill_leaves_no_xdp_program(tools, tmp_path):
    with fresh_lab("fk") as lab:
        f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp")
        try:
            f.wait_ready(lab.cli)
            assert xdp_attached(lab.srv, lab.srv_if)
        finally:
            f.stop(signal.SIGKILL)
        assert_detached(lab, "after SIGKILL")
        # The next start attaches cleanly.
        f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp")
        try:
            f.wait_ready(lab.cli)
        finally:
            assert f.stop() == 0, f.log_tail()
        assert not xdp_attached(lab.srv, lab.srv_if)


def test_a_panic_on_an_xdp_loop_ends_faed(tools, tmp_path):
    # The test-only trigger makes an XDP loop panic on accepting a connection: faed must end with status 70
    # (so systemd restarts it), not keep running with a dead loop, and its XDP program goes with it.
    with fresh_lab("fx") as lab:
        f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp", wrapper=["env", "FAED_TEST_PANIC=xdp"])
        try:
            deadline = time.monotonic() + 30
            while f.proc.poll() is None and time.monotonic() < deadline:
                lab.cli_run(FAE, "ping", XDP_ADDR, "--timeout-ms", "500", check=False, timeout=10)
                time.sleep(0.2)
            assert f.proc.poll() == 70, (f.proc.returncode, f.log_tail())
            assert "FAED_TEST_PANIC" in f.log_tail(), f.log_tail()
        finally:
            f.stop(signal.SIGKILL)
        assert_detached(lab, "after the panic")


AT_THE_CAP_CLIENT = r"""
import socket, sys, time
sys.path.insert(0, sys.argv[3])
from thrift_load import call, reply_to as reply
addr, port = sys.argv[1], int(sys.argv[2])

held = []
for i in range(2):  # every session slot (max_sessions = 2)
    s = socket.create_connection((addr, port), timeout=5)
    s.sendall(call(1, i))
    reply(s, i, 5)
    held.append(s)
waiting = socket.create_connection((addr, port), timeout=5)  # the handshake completes
waiting.sendall(call(2, 77))
try:
    reply(waiting, 77, 1.0)
    sys.exit("answered with no session slot free")
except socket.timeout:
    pass  # waits: neither answered nor reset
held.pop().close()  # a slot frees: the waiting connection gets it and its call is answered
t = time.monotonic()
reply(waiting, 77, 5)
print("served %.3f s after a slot freed" % (time.monotonic() - t))
waiting.sendall(call(3, 78))
reply(waiting, 78, 5)
for s in held + [waiting]:
    s.close()
print("ok")
"""


IDLE_CLIENT = r"""
import socket, sys, time
sys.path.insert(0, sys.argv[3])
from thrift_load import call, reply_to
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((addr, port), timeout=5)
s.sendall(call(1, 5))
reply_to(s, 5)
t = time.monotonic()
s.settimeout(15)
rest = s.recv(100)  # the server's FIN: end of stream, not a reset (ConnectionResetError)
assert rest == b"", rest
print("closed %.1f s after the last reply" % (time.monotonic() - t))
"""


def test_the_session_cap_and_the_idle_timeout_alike_on_both_paths(tools, tmp_path):
    """At `server.max_sessions` a new connection is neither refused nor reset: it waits, as in a kernel
    listener's accept queue, and is served once a session closes. The kernel path holds it in its
    listener's backlog, the XDP path in its own accept queue. A session idle past `server.idle_timeout_ms`
    is closed with a FIN on both paths (the driver's sweep decides, each transport closes)."""
    with fresh_lab("fc") as lab:
        f = Faed(lab.srv, lab.srv_if, tmp_path,
                 extra_toml="[server]\nmax_sessions = 2\nidle_timeout_ms = 3000\n")
        try:
            f.wait_ready(lab.cli)
            def no_sessions():  # those of the ready check and of the last run are gone
                deadline = time.monotonic() + 10
                while f.stats(lab.cli)["sessions"] > 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert f.stats(lab.cli)["sessions"] == 0, f.stats(lab.cli)
            for port in (KERNEL_PORT, XDP_PORT):
                no_sessions()
                p = lab.cli_run("/usr/bin/python3", "-c", AT_THE_CAP_CLIENT, SRV_IP, str(port), str(HERE),
                                check=False, timeout=30)
                assert p.returncode == 0 and "ok" in p.stdout, (port, p.stdout, p.stderr, f.log_tail())
                print(port, p.stdout.strip().splitlines()[0])
            queues = f.stats(lab.cli)["xdp"]["queues"]
            assert sum(q["accept_queue"]["refused"] for q in queues) == 0, queues  # it waited, not refused
            for port in (KERNEL_PORT, XDP_PORT):
                no_sessions()
                p = lab.cli_run("/usr/bin/python3", "-c", IDLE_CLIENT, SRV_IP, str(port), str(HERE),
                                check=False, timeout=30)
                assert p.returncode == 0, (port, p.stdout, p.stderr, f.log_tail())
                closed_after = float(p.stdout.split()[1])
                # Not before the timeout (the sweep, once a second, closes it within a second or so after).
                assert 2.9 <= closed_after <= 12, (port, p.stdout)
                print(port, p.stdout.strip())
        finally:
            assert f.stop() == 0, f.log_tail()


def test_an_address_that_moved_to_another_host_is_answered_there(tools, tmp_path):
    """A client's address moves to another host (a DHCP lease, a VM moved: here the client's MAC changes)
    while a connection from the old host is still open. The new host's connections must be answered at
    its own MAC: each connection's replies go to the MAC of its own handshake. (The MAC used to be pinned
    per address while any connection from it lasted: the new host's SYN-ACKs went to the old MAC.)"""
    with fresh_lab("fm") as lab:
        f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp")
        old = None
        try:
            f.wait_ready(lab.cli)
            old = subprocess.Popen(["ip", "netns", "exec", lab.cli, "/usr/bin/python3",
                                    str(HERE / "thrift_load.py"), "onecall", SRV_IP, str(XDP_PORT)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert old.stdout.readline().strip() == "connected"
            run("ip", "-n", lab.cli, "link", "set", "dev", lab.cli_if, "address", "02:00:00:00:0b:0b")
            for _ in range(3):
                p = lab.cli_run(FAE, "ping", XDP_ADDR, "--timeout-ms", "3000", check=False, timeout=15)
                assert p.returncode == 0, (p.stdout, p.stderr, f.stats(lab.cli)["xdp"]["queues"])
        finally:
            if old is not None:
                old.kill()
                old.wait()
            assert f.stop() == 0, f.log_tail()


def test_frames_the_kernel_drops_are_counted(tools, tmp_path):
    # The smallest UMEM (1,024 frames: 512 to receive into) and faed stopped (SIGSTOP) while 2,000 SYNs
    # arrive: the XDP program keeps steering them to the AF_XDP sockets, whose rings fill up, and the
    # kernel drops the rest. Its counters (XDP_STATISTICS) reach the admin API and the metrics once faed
    # runs again, and faed still answers.
    with fresh_lab("fd") as lab:
        f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp", extra_toml="xdp_frames = 1024\n")
        try:
            f.wait_ready(lab.cli)
            os.kill(f.proc.pid, signal.SIGSTOP)
            try:
                flood = lab.cli_run("/usr/bin/python3", str(HERE / "synflood.py"),
                                    SRV_IP, str(XDP_PORT), "2000", "0.5", timeout=60)
                assert int(flood.stdout) == 2000, flood.stdout
            finally:
                os.kill(f.proc.pid, signal.SIGCONT)
            def rx_dropped(d):
                return sum(x["rx_ring_full"] + x["rx_fill_empty"] for x in d)
            d = queue_drops(f, lab, lambda d: rx_dropped(d) > 0)
            dropped = rx_dropped(d)
            assert dropped > 0, d
            print("frames the kernel dropped while faed was stopped:", dropped)
            text = f.metrics(lab.cli)
            counted = sum(int(v) for v in re.findall(
                r'^fae_xdp_queue_rx_(?:ring_full|fill_empty)_total\{queue="\d+"\} (\d+)$', text, re.M))
            assert counted >= dropped, (dropped, text[-3000:])
            p = lab.cli_run(FAE, "ping", XDP_ADDR, "--timeout-ms", "5000", check=False, timeout=30)
            assert p.returncode == 0 and p.stdout.startswith("ver:"), (p.stdout, p.stderr)
        finally:
            f.stop(signal.SIGKILL)


def test_a_reply_the_device_drops_is_sent_again_once(tools, tmp_path):
    # A client's request waits in the RX ring while faed is stopped; the client's end of the veth goes
    # down, so the server's end has no carrier and drops every frame faed sends (sendto: EBUSY). faed
    # sends the dropped reply again once, not in a loop while the link is down (the loop would spin and
    # hold a TX frame); once the link is back, TCP's retransmission delivers the answer.
    with fresh_lab("fr") as lab:
        client = None
        try:
            f = Faed(lab.srv, lab.srv_if, tmp_path, mode="xdp")
            try:
                f.wait_ready(lab.cli)
                client = subprocess.Popen(
                    ["ip", "netns", "exec", lab.cli, "/usr/bin/python3",
                     str(HERE / "thrift_load.py"), "onecall", SRV_IP, str(XDP_PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert client.stdout.readline().strip() == "connected"
                os.kill(f.proc.pid, signal.SIGSTOP)
                try:
                    client.stdin.write("go\n")
                    client.stdin.flush()
                    time.sleep(0.5)  # the request reaches the RX ring; faed cannot answer yet
                    lab.cli_run("ip", "link", "set", lab.cli_if, "down")
                finally:
                    os.kill(f.proc.pid, signal.SIGCONT)
                time.sleep(2.5)  # faed answers into a link without carrier, and its TCP retransmits once
                lab.cli_run("ip", "link", "set", lab.cli_if, "up")
                out, _ = client.communicate(timeout=60)
                r = json.loads(out)
                assert r["calls"] == 1 and r["failures"] == 0, r
                d = queue_drops(f, lab, lambda d: sum(x["tx_device"] for x in d) > 0, timeout=5)
                tx_device, resent = sum(x["tx_device"] for x in d), sum(x["tx_resent"] for x in d)
                print("drops while the link was down:", d)
                assert tx_device >= 2 and resent >= 1, d
                # Once per frame: the reply and at most a few retransmissions in 2.5 s, not one a poll.
                assert resent <= tx_device and resent <= 8, d
            finally:
                f.stop(signal.SIGKILL)
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.wait()


CAPS = "+net_admin,+bpf,+net_raw,+ipc_lock,+perfmon"


def test_unprivileged_user_with_capabilities(tools, tmp_path):
    # faed as nobody with only the capabilities etc/faed.service grants, serving the XDP path.
    with fresh_lab("fu") as lab:
        # pytest's tmp_path is private to root; nobody must be able to read faed's config.
        shared = tempfile.mkdtemp(prefix="fae-lab-")
        os.chmod(shared, 0o755)
        tmp_path = Path(shared)
        try:
            wrapper = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=" + CAPS, "--ambient-caps=" + CAPS, "--bounding-set=-all," + CAPS]
            f = Faed(lab.srv, lab.srv_if, tmp_path, wrapper=wrapper, mode="xdp")
            try:
                f.wait_ready(lab.cli)
                status = open("/proc/%d/status" % f.proc.pid).read()
                assert re.search(r"^Uid:\s+65534", status, re.M), status
                # Once XDP is attached faed keeps none of the capabilities it was started with.
                for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                    assert re.search(r"^%s:\s+0{16}$" % field, status, re.M), status
                p = lab.cli_run(FAE, "check", XDP_ADDR, "-c", "4", "-n", "100", "--json", check=False)
                assert json.loads(p.stdout)["failures"] == 0, p.stdout
            finally:
                assert f.stop() == 0, f.log_tail()
            assert not xdp_attached(lab.srv, lab.srv_if)
        finally:
            shutil.rmtree(shared, ignore_errors=True)


def test_loss_and_reordering(tools, tmp_path):
    """1% loss and reordering on the path (a userspace relay: this kernel has no netem); every answer
    must still be correct."""
    p = "fi%d" % (os.getpid() % 100000)
    srv, mid, cli = p + "-srv", p + "-mid", p + "-cli"
    s0, ms, c0, mc = p + "-s0", p + "-ms", p + "-c0", p + "-mc"

    def cleanup():
        for ns in (srv, mid, cli):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            run("ip", "netns", "del", ns, check=False)

    cleanup()
    relay = None
    f = None
    try:
        for ns in (srv, mid, cli):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", s0, "netns", srv, "type", "veth", "peer", "name", ms, "netns", mid)
        run("ip", "link", "add", c0, "netns", cli, "type", "veth", "peer", "name", mc, "netns", mid)
        run("ip", "-n", srv, "addr", "add", SRV_IP + "/24", "dev", s0)
        run("ip", "-n", cli, "addr", "add", CLI_IP + "/24", "dev", c0)
        for ns, dev in ((srv, s0), (mid, ms), (mid, mc), (cli, c0)):
            run("ip", "-n", ns, "link", "set", dev, "up")
            # Whole frames with finished checksums: the relay copies frames, smoltcp checks checksums.
            run("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "gso", "off", "tso", "off",
                "gro", "off", check=False)
        stats = tmp_path / "relay.json"
        relay = subprocess.Popen(["ip", "netns", "exec", mid, "/usr/bin/python3",
                                  str(REPO / "tests" / "lab" / "impair.py"), ms, mc, "--loss", "0.01",
                                  "--reorder", "0.02", "--stats", str(stats)])
        f = Faed(srv, s0, tmp_path, mode="xdp")
        f.wait_ready(cli, timeout=30)
        p = run("ip", "netns", "exec", cli, FAE, "check", XDP_ADDR, "-c", "64", "-n", "200", "--json",
                check=False, timeout=600)
        report = json.loads(p.stdout)
        assert p.returncode == 0 and report["failures"] == 0, report
        assert f.stop() == 0, f.log_tail()
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=10)
        counts = json.loads(stats.read_text())
        # The path really was impaired.
        assert counts["dropped"] > 0 and counts["reordered"] > 0, counts
        print("relay:", counts, "check:", report)
    finally:
        if f is not None and f.proc.poll() is None:
            f.stop(signal.SIGKILL)
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.wait()
        cleanup()
