"""Shared fixtures: Thrift code generation, the data stores, one faed for the whole session, client factories.

Run from the repository root:  /usr/bin/python3 -m pytest tests/python -q
Environment: FAED_BIN (default <repo>/target/debug/faed), THRIFT (default `thrift`).
FAE_ADDR=host:port with FAE_ADMIN_PORT=port: run the suite against a faed that is already running there
(the XDP lab test runs the whole suite this way from the client namespace) instead of starting one; then
FAE_BACKENDS='{"memcache": ["h:p", "h:p"], "redis": ["h:p", "h:p"], "mysql": "h:p"}' names the stores behind
its pools, which the back-end tests also reach directly.

Without FAE_ADDR the suite starts two memcached and two redis-server processes and a MariaDB (tests/mysql/mariadb:
the schema of tests/mysql/schema.sql) on free loopback ports, stopped by PID at the end, and a faed whose
"default" memcache and redis pools and MySQL pools (`tests/mysql/mariadb config`) hold them.
"""

import importlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IDL = REPO / "idl" / "fae.thrift"
MARIADB = REPO / "tests" / "mysql" / "mariadb"
FAED_BIN = os.environ.get("FAED_BIN", str(REPO / "target" / "debug" / "faed"))
THRIFT = os.environ.get("THRIFT", "thrift")
HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for faed to accept on its RPC port
STOP_TIMEOUT = 10.0   # seconds for faed to exit after SIGTERM


def free_ports(n):
    """n distinct loopback ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- generated code ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rpc(tmp_path_factory):
    """Generate the Python code from idl/fae.thrift into a temp dir and import it (plus clients/python).

    Returns a namespace: FunServant, ttypes, Context, TCacheMissed, TApplicationException, fae_client,
    ctx(rid=..., reason=..., uid=...) -> a valid Context by default.
    """
    out = tmp_path_factory.mktemp("gen-py")
    try:
        r = subprocess.run([THRIFT, "--gen", "py", "-out", str(out), str(IDL)],
                           capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.fail("thrift compiler %r not found (set THRIFT)" % THRIFT)
    if r.returncode != 0:
        pytest.fail("thrift --gen py failed (%d):\n%s%s" % (r.returncode, r.stdout, r.stderr))
    sys.path.insert(0, str(out))
    sys.path.insert(0, str(REPO / "clients" / "python"))
    FunServant = importlib.import_module("fun.rpc.FunServant")
    ttypes = importlib.import_module("fun.rpc.ttypes")
    fae_client = importlib.import_module("fae_client")
    from thrift.Thrift import TApplicationException

    def ctx(rid=None, reason="pytest", uid=1):
        if rid is None:
            rid = random.randint(1, (1 << 62))
        return ttypes.Context(rid=rid, reason=reason, uid=uid)

    return types.SimpleNamespace(
        FunServant=FunServant, ttypes=ttypes, Context=ttypes.Context, TCacheMissed=ttypes.TCacheMissed,
        TApplicationException=TApplicationException, fae_client=fae_client, ctx=ctx, gen_dir=out)


# ---- the data stores --------------------------------------------------------------------------------

class Store(object):
    """memcached or redis-server as a process of its own on a loopback port, stopped by PID."""

    def __init__(self, kind, port, tmp):
        self.kind, self.port, self.tmp = kind, port, tmp
        self.proc = None
        self.start()

    @property
    def addr(self):
        return "%s:%d" % (HOST, self.port)

    def start(self):
        if self.kind == "memcached":
            argv = ["memcached", "-l", HOST, "-p", str(self.port), "-U", "0", "-u", "root", "-m", "64", "-t", "1"]
            probe, want = b"version\r\n", b"VERSION"
        else:
            argv = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--logfile", "", "--dir", str(self.tmp)]
            probe, want = b"PING\r\n", b"+PONG"
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            pytest.fail("%s not found: scripts/setup installs it" % argv[0])
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                pytest.fail("%s on port %d exited at start with %s" % (self.kind, self.port, self.proc.returncode))
            try:
                if self.ask(probe).startswith(want):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("%s on port %d not ready within 10 s" % (self.kind, self.port))
            time.sleep(0.02)

    def ask(self, request, end=b"\r\n"):
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            s.sendall(request)
            got = b""
            while not got.endswith(end):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    """The stores behind faed's "default" pools: .memcache and .redis, lists of "host:port"."""
    if os.environ.get("FAE_ADDR"):
        spec = os.environ.get("FAE_BACKENDS")
        if not spec:
            pytest.fail("FAE_ADDR is set without FAE_BACKENDS: say which stores the faed at FAE_ADDR uses")
        d = json.loads(spec)
        yield types.SimpleNamespace(memcache=d["memcache"], redis=d["redis"], mysql=d["mysql"], mysql_dir=None)
        return
    ports = free_ports(5)
    started = []
    mysql_dir = tmp_path_factory.mktemp("mariadb")
    try:
        for kind, port in zip(["memcached", "memcached", "redis", "redis"], ports):
            started.append(Store(kind, port, tmp_path_factory.mktemp(kind)))
        p = subprocess.run([str(MARIADB), "start", str(mysql_dir), str(ports[4])], capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            pytest.fail("MariaDB did not start: %s%s" % (p.stdout, p.stderr))
        yield types.SimpleNamespace(memcache=[s.addr for s in started[:2]], redis=[s.addr for s in started[2:]],
                                    mysql="%s:%d" % (HOST, ports[4]), mysql_dir=mysql_dir)
    finally:
        for s in started:
            s.stop()
        subprocess.run([str(MARIADB), "stop", str(mysql_dir)], timeout=30)


def pools_toml(stores):
    q = lambda addrs: ", ".join('"%s"' % a for a in addrs)
    host, port = stores.mysql.rsplit(":", 1)
    mysql = subprocess.run([str(MARIADB), "config", "-", port, host], capture_output=True, text=True,
                           check=True).stdout
    return ('[[memcache.pools]]\nname = "default"\nservers = [%s]\n\n'
            '[[redis.pools]]\nname = "default"\nservers = [%s]\n\n%s' % (q(stores.memcache), q(stores.redis), mysql))


# ---- the server -------------------------------------------------------------------------------------

class Faed(object):
    def __init__(self, proc, rpc_port, admin_port, log_path, unix_path=None):
        self.proc = proc
        self.host = HOST
        self.port = rpc_port
        self.admin_port = admin_port
        self.log_path = log_path
        self.unix_path = unix_path

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    @property
    def admin_url(self):
        return "http://%s:%d" % (self.host, self.admin_port)

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


class External(Faed):
    """A faed this suite did not start (FAE_ADDR): the lab's, reached over its XDP path."""

    def __init__(self, addr, admin_port):
        host, port = addr.rsplit(":", 1)
        Faed.__init__(self, None, int(port), admin_port, None)
        self.host = host

    def log_tail(self, n=4000):
        return "(faed runs outside this suite: see the lab test's log)"


def launch_faed(tmp, config_text, unix_socket=None):
    """Start faed in directory `tmp` with `config_text` as its faed.toml, on two free loopback ports (given on
    the command line), and on `unix_socket` too if given; wait until it accepts. Stop it with stop_faed."""
    if not (os.path.isfile(FAED_BIN) and os.access(FAED_BIN, os.X_OK)):
        pytest.fail("faed binary not found or not executable: %s (set FAED_BIN)" % FAED_BIN)
    rpc_port, admin_port = free_ports(2)
    log_path = tmp / "faed.log"
    config = tmp / "faed.toml"
    if unix_socket is not None:
        config_text = '[server]\nunix_socket = "%s"\nunix_socket_mode = 0o600\n\n%s' % (unix_socket, config_text)
    config.write_text(config_text)
    argv = [FAED_BIN, "-c", str(config), "--listen", "%s:%d" % (HOST, rpc_port),
            "--admin", "%s:%d" % (HOST, admin_port), "--log-level", "warn"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Faed(proc, rpc_port, admin_port, log_path, unix_path=unix_socket)

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        rc = proc.poll()
        if rc is not None:
            pytest.fail("faed exited with code %s before accepting on %s\n%s\nlog:\n%s"
                        % (rc, server.addr, " ".join(argv), server.log_tail()))
        try:
            socket.create_connection((HOST, rpc_port), timeout=0.5).close()
            break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("faed did not accept on %s within %.0fs\n%s\nlog:\n%s"
                        % (server.addr, START_TIMEOUT, " ".join(argv), server.log_tail()))
        time.sleep(0.05)
    return server


def stop_faed(server):
    """SIGTERM; fails the test unless faed was still running and exits 0 in time."""
    proc = server.proc
    if proc.poll() is not None:
        pytest.fail("faed died during the tests with code %s\nlog:\n%s" % (proc.returncode, server.log_tail()))
    os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("faed did not exit within %.0fs of SIGTERM (killed)\nlog:\n%s"
                    % (STOP_TIMEOUT, server.log_tail()))
    if rc != 0:
        pytest.fail("faed exited with code %s after SIGTERM, want 0\nlog:\n%s" % (rc, server.log_tail()))


@pytest.fixture(scope="session")
def faed(tmp_path_factory, stores):
    """Start faed on two free loopback ports with the stores as its "default" pools; stop it with SIGTERM at
    the end and require exit code 0."""
    if os.environ.get("FAE_ADDR"):
        yield External(os.environ["FAE_ADDR"], int(os.environ["FAE_ADMIN_PORT"]))
        return
    tmp = tmp_path_factory.mktemp("faed")
    server = launch_faed(tmp, pools_toml(stores), unix_socket=str(tmp / "faed.sock"))
    yield server
    stop_faed(server)
    # faed removes its socket file when it stops
    assert not os.path.exists(server.unix_path), "faed left its unix socket file behind"


# ---- raw generated clients --------------------------------------------------------------------------

# Every way a generated client may reach faed: (transport, protocol, socket). faed tells them apart from the
# first bytes of each connection. A faed this suite did not start (FAE_ADDR) is reached over TCP only.
KINDS = {
    "buffered": ("buffered", "binary", "tcp"),
    "framed": ("framed", "binary", "tcp"),
    "compact": ("buffered", "compact", "tcp"),
    "compact-framed": ("framed", "compact", "tcp"),
    "header-binary": ("header", "binary", "tcp"),
    "header-compact": ("header", "compact", "tcp"),
    "unix": ("buffered", "binary", "unix"),
    "unix-compact-framed": ("framed", "compact", "unix"),
}
if os.environ.get("FAE_ADDR"):
    KINDS = {k: v for k, v in KINDS.items() if v[2] == "tcp"}


class Conn(object):
    """One connection: the generated FunServant.Client plus its transport and protocol."""

    def __init__(self, rpc, faed, framed=False, kind=None):
        from thrift.protocol import TBinaryProtocol, TCompactProtocol
        from thrift.transport import TSocket, TTransport
        kind = kind or ("framed" if framed else "buffered")
        transport, protocol, sock = KINDS[kind]
        self.kind = kind
        # "buffered", "framed" or "header": with the last two a message must be flushed to be a frame.
        self.framing = transport
        if sock == "unix":
            self.sock = TSocket.TSocket(unix_socket=faed.unix_path)
        else:
            self.sock = TSocket.TSocket(faed.host, faed.port)
        self.sock.setTimeout(10000)
        if transport == "header":
            from thrift.protocol.THeaderProtocol import THeaderProtocol
            from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
            sub = THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderSubprotocolID.BINARY
            self.sock.open()
            # Only header replies are accepted: a framed or unframed reply would fail the call.
            self.protocol = THeaderProtocol(self.sock, [THeaderClientType.HEADERS], sub)
            self.protocol.set_header(b"caller", b"pytest")
            self.transport = self.protocol.trans
        else:
            self.transport = (TTransport.TFramedTransport(self.sock) if transport == "framed"
                              else TTransport.TBufferedTransport(self.sock))
            self.transport.open()
            if protocol == "compact":
                self.protocol = TCompactProtocol.TCompactProtocol(self.transport)
            else:
                self.protocol = TBinaryProtocol.TBinaryProtocol(self.transport)
        self.client = rpc.FunServant.Client(self.protocol)

    def close(self):
        self.transport.close()


@pytest.fixture
def connect(rpc, faed):
    """Factory: connect(framed=False, kind=None) -> Conn (kind: a key of KINDS); every Conn is closed at the
    end of the test."""
    conns = []

    def make(framed=False, kind=None):
        c = Conn(rpc, faed, framed, kind)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


@pytest.fixture(params=list(KINDS))
def transport_kind(request):
    return request.param


@pytest.fixture
def conn(connect, transport_kind):
    """A Conn in each of KINDS in turn: binary and compact, buffered, framed and THeader, TCP and unix socket."""
    return connect(kind=transport_kind)


@pytest.fixture
def client(conn):
    return conn.client


@pytest.fixture
def uniq(request):
    """A prefix unique to this test run and test (the server is shared by all tests)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
    return "pytest-%d-%08x-%s" % (os.getpid(), random.getrandbits(32), name)
