"""The XDP lab: network namespaces and veth pairs made by scripts/lab (or, for the impaired path, here),
faed attached with XDP in the server namespace, clients in the client namespace. Root only.

Everything a test starts is stopped by PID, and every namespace, veth and XDP program is removed, even
when a test fails. Names carry this process's pid so that a lab left by someone else is never touched.
"""
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAED = os.environ.get("FAED_BIN", str(REPO / "target" / "debug" / "faed"))
FAE = os.environ.get("FAE_BIN", str(REPO / "target" / "debug" / "fae"))
LAB = str(REPO / "scripts" / "lab")
NET = "192.0.2"
SRV_IP, CLI_IP = NET + ".1", NET + ".2"
KERNEL_PORT, XDP_PORT, ADMIN_PORT = 9001, 9002, 9101
ADMIN_TOKEN = "lab-admin-token-0123456789"
# The stores behind the lab faed's pools, in the server namespace on its address (reached by faed, and by the
# tests from the client namespace over the kernel path: only the RPC port goes to AF_XDP).
MC_PORTS, PLACEMENT_PORTS, RD_PORTS, MYSQL_PORT = (11211, 11212), (11221, 11222, 11223), (6379, 6380), 3306
MARIADB = str(REPO / "tests" / "mysql" / "mariadb")


def run(*argv, check=True, timeout=120, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError("%s -> %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(argv), p.returncode, p.stdout[-4000:], p.stderr[-4000:]))
    return p


def xdp_attached(ns, iface):
    out = run("ip", "netns", "exec", ns, "ip", "-d", "link", "show", iface, check=False).stdout
    return "prog/xdp" in out


class Lab(object):
    def __init__(self, prefix):
        self.prefix = prefix
        self.srv, self.cli = prefix + "-srv", prefix + "-cli"
        self.srv_if, self.cli_if = prefix + "-s0", prefix + "-c0"
        self.env = dict(os.environ, LAB_PREFIX=prefix, LAB_NET=NET)

    def up(self):
        run(LAB, "up", env=self.env)

    def down(self):
        run(LAB, "down", env=self.env, check=False)

    def cli_run(self, *argv, **kw):
        return run("ip", "netns", "exec", self.cli, *argv, **kw)


class NsStore(object):
    """memcached or redis-server in a namespace, on the server address; stopped by PID."""

    def __init__(self, ns, kind, port, tmp):
        self.ns, self.kind, self.port = ns, kind, port
        if kind == "memcached":
            argv = ["memcached", "-l", SRV_IP, "-p", str(port), "-U", "0", "-u", "root", "-m", "64", "-t", "1"]
        else:
            # Protected mode refuses non-loopback clients without a password: this is the lab's private network.
            argv = ["redis-server", "--port", str(port), "--bind", SRV_IP, "--protected-mode", "no", "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no", "--logfile", "", "--dir", str(tmp)]
        # `ip netns exec` execs the store: the Popen pid is the store's.
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        probe = "version" if kind == "memcached" else "PING"
        while True:
            p = run("ip", "netns", "exec", ns, "bash", "-c",
                    "printf '%s\\r\\n' | timeout 1 nc -q 1 %s %d" % (probe, SRV_IP, port), check=False)
            if p.stdout.startswith(("VERSION", "+PONG")):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("%s on %s:%d in %s did not start" % (kind, SRV_IP, port, ns))
            time.sleep(0.05)

    @property
    def addr(self):
        return "%s:%d" % (SRV_IP, self.port)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def pools_toml(stores):
    q = lambda ss: ", ".join('"%s"' % s.addr for s in ss if hasattr(s, "addr"))
    text = ('[[memcache.pools]]\nname = "default"\nservers = [%s]\n\n[[redis.pools]]\nname = "default"\n'
            'servers = [%s]\n' % (q(stores["memcache"]), q(stores["redis"])))
    for pool, hash_ in (("php_standard", "standard"), ("php_consistent", "consistent"), ("php_ketama", "ketama")):
        text += '\n[[memcache.pools]]\nname = "%s"\nhash = "%s"\nservers = [%s]\n' % (
            pool, hash_, q(stores["placement"]))
    text += "\n" + run(MARIADB, "config", "-", str(MYSQL_PORT), SRV_IP).stdout
    return text


def backends_env(stores):
    """FAE_BACKENDS for the Python and PHP suites (see tests/python/conftest.py)."""
    env = {k: [s.addr for s in v] for k, v in stores.items() if k != "mysql"}
    env["mysql"] = "%s:%d" % (SRV_IP, MYSQL_PORT)
    return json.dumps(env)


class Faed(object):
    """faed in the server namespace; stopped by PID."""

    def __init__(self, ns, iface, tmp, extra_args=(), wrapper=(), mode="both", extra_toml=""):
        self.ns, self.iface = ns, iface
        cfg = tmp / ("faed-%s.toml" % ns)
        # The admin port is on the lab address, not loopback: faed wants a token for it.
        cfg.write_text('[admin]\ntoken = "%s"\n\n[listener]\nmode = "%s"\ninterface = "%s"\nxdp_port = %d\n\n%s'
                       % (ADMIN_TOKEN, mode, iface, XDP_PORT, extra_toml))
        self.log = tmp / ("faed-%s.log" % ns)
        argv = ["ip", "netns", "exec", ns] + list(wrapper) + [
            FAED, "-c", str(cfg), "--listen", "%s:%d" % (SRV_IP, KERNEL_PORT),
            "--admin", "%s:%d" % (SRV_IP, ADMIN_PORT), "--log-level", "warn"] + list(extra_args)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self):
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, cli_ns, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("faed exited with %s\n%s" % (self.proc.returncode, self.log_tail()))
            p = run("ip", "netns", "exec", cli_ns, FAE, "ping", "%s:%d" % (SRV_IP, XDP_PORT),
                    "--timeout-ms", "1000", check=False, timeout=10)
            if p.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("faed's XDP path did not answer within %ds\n%s" % (timeout, self.log_tail()))

    def stats(self, cli_ns):
        p = run("ip", "netns", "exec", cli_ns, "curl", "-sf", "http://%s:%d/api/stats" % (SRV_IP, ADMIN_PORT))
        return json.loads(p.stdout)

    def metrics(self, cli_ns):
        return run("ip", "netns", "exec", cli_ns, "curl", "-sf",
                   "http://%s:%d/metrics" % (SRV_IP, ADMIN_PORT)).stdout

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Signals faed (the process itself, not the `ip netns exec` wrapper, which execs it) and reaps it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError("faed ignored signal %d for %ds\n%s" % (sig, timeout, self.log_tail()))
        return self.proc.returncode


@pytest.fixture(scope="session")
def tools():
    for path in (FAED, FAE):
        if not os.access(path, os.X_OK):
            pytest.fail("%s is not built (cargo build --bins)" % path)
    if os.geteuid() != 0:
        pytest.fail("the XDP lab needs root (network namespaces, XDP)")


@contextlib.contextmanager
def fresh_lab(tag):
    """A lab of its own (prefix TAG and this process's pid), taken down afterwards whatever happens."""
    lab = Lab("%s%d" % (tag, os.getpid() % 100000))
    lab.down()
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab(tools):
    with fresh_lab("fl") as lab:
        yield lab


@pytest.fixture(scope="module")
def stores(lab, tmp_path_factory):
    """Two memcached and two redis-server for the "default" pools, and three memcached for the PHP placement
    pools, in the server namespace."""
    started = {"memcache": [], "redis": [], "placement": []}
    mysql_dir = tmp_path_factory.mktemp("mariadb")
    try:
        run("ip", "netns", "exec", lab.srv, MARIADB, "start", str(mysql_dir), str(MYSQL_PORT), SRV_IP, timeout=60)
        started["mysql"] = []
        for port in MC_PORTS:
            started["memcache"].append(NsStore(lab.srv, "memcached", port, None))
        for port in PLACEMENT_PORTS:
            started["placement"].append(NsStore(lab.srv, "memcached", port, None))
        for port in RD_PORTS:
            started["redis"].append(NsStore(lab.srv, "redis", port, tmp_path_factory.mktemp("redis")))
        yield started
    finally:
        for ss in started.values():
            for st in ss:
                st.stop()
        run(MARIADB, "stop", str(mysql_dir), check=False)


@pytest.fixture(scope="module")
def served(lab, stores, tmp_path_factory):
    """faed with the kernel path on 9001 and the XDP path on 9002 of the lab's server address, its back-end
    pools on the lab's stores."""
    extra = '[server]\ncall_timeout_ms = 2000\n\n' + pools_toml(stores)
    f = Faed(lab.srv, lab.srv_if, tmp_path_factory.mktemp("faed"), extra_toml=extra)
    try:
        f.wait_ready(lab.cli)
        yield f
    finally:
        rc = f.stop()
        assert rc == 0, "faed exited %s after SIGTERM\n%s" % (rc, f.log_tail())
        assert not xdp_attached(lab.srv, lab.srv_if), "XDP program left attached after SIGTERM"
