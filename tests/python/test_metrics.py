"""/metrics read by prometheus_client's own parser: every family has HELP and TYPE, histograms have their
_bucket, _sum and _count, and every declared metric moves while a faed of this test's own serves calls that
touch each of them (local servants, a bad frame, an idle session, memcached stopped and a pool with no
server, Redis errors, the MySQL lookup and result caches, a degraded method).

This faed is the test's own (started and stopped here, with short timeouts and a token), in front of the
suite's stores and one memcached started here (stopped with SIGSTOP mid-test).
"""

import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pymysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import HOST, Conn, Store, free_ports, launch_faed, pools_toml, stop_faed

TOKEN = "metrics-test-token-0123456789"


def scrape_text(server):
    with urllib.request.urlopen(server.admin_url + "/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers.get("Content-Type", "").startswith("text/plain"), r.headers
        return r.read().decode("utf-8")


def families(text):
    """{family name: Metric} as prometheus_client parses the text (it raises on anything malformed)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def declared(text):
    """The metric families the text declares with # TYPE, and those with # HELP."""
    types, helps = {}, {}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if line.startswith("# TYPE "):
            types[parts[2]] = parts[3]
        elif line.startswith("# HELP "):
            helps[parts[2]] = parts[3] if len(parts) > 3 else ""
    return types, helps


def post(server, path, body):
    req = urllib.request.Request(server.admin_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200, r.status


@pytest.fixture
def own(tmp_path_factory, stores):
    """This test's faed: the suite's stores, a memcached of its own ("stopped" pool), a pool whose server does
    not exist ("dead"), short timeouts, an admin token."""
    mc = Store("memcached", free_ports(1)[0], tmp_path_factory.mktemp("memcached"))
    nobody = free_ports(1)[0]
    config = ('[server]\nidle_timeout_ms = 1500\ncall_timeout_ms = 400\n\n'
              '[admin]\ntoken = "%s"\n\n[metrics]\nslow_call_ms = 100\n\n%s\n\n'
              '[[memcache.pools]]\nname = "stopped"\nservers = ["%s"]\n[memcache.pools.backend]\nmax_conns = 1\n\n'
              '[[memcache.pools]]\nname = "dead"\nservers = ["%s:%d"]\n'
              '[memcache.pools.backend.breaker]\nconsecutive_failures = 2\n'
              % (TOKEN, pools_toml(stores), mc.addr, HOST, nobody))
    server = launch_faed(tmp_path_factory.mktemp("faed-metrics"), config)
    try:
        yield server, mc
    finally:
        mc.proc.send_signal(signal.SIGCONT)
        stop_faed(server)
        mc.stop()


def test_every_declared_metric_parses_and_moves(own, rpc, stores):
    server, mc = own
    seen = {}  # (family, sample name, labels) -> set of values
    texts = []

    def scrape():
        text = scrape_text(server)
        texts.append(text)
        for fam in families(text).values():
            for s in fam.samples:
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                seen.setdefault(key, set()).add(s.value)
        return text

    scrape()
    conns = []

    def connect(framed=False):
        c = Conn(rpc, server, framed)
        conns.append(c)
        return c.client

    c = connect()
    held = connect(framed=True)  # an open session while we scrape
    held.ping(rpc.ctx())
    scrape()
    # Local servants: calls, an error, the local cache, a lock, the registry.
    for i in range(5):
        c.ping(rpc.ctx())
        c.noop(i)
    c.lc_set(rpc.ctx(), "metrics:big", b"x" * (2 << 20))
    c.lc_set(rpc.ctx(), "metrics:k", b"v")
    c.lc_get(rpc.ctx(), "metrics:k")
    c.id_next(rpc.ctx())
    with pytest.raises(rpc.TApplicationException):
        c.ping(rpc.ctx(rid=0))
    assert c.lock(rpc.ctx(), "metrics", "metrics:lock")
    assert c.zk_create(rpc.ctx(), "/metrics-test", "d")
    scrape()
    c.unlock(rpc.ctx(), "metrics", "metrics:lock")
    assert c.zk_del(rpc.ctx(), "/metrics-test")
    # A bad frame: a protocol error, the session closed.
    with socket.create_connection((HOST, server.port), timeout=5) as s:
        s.sendall(b"\x80\x01\x00\x01\xff\xff\xff\xffjunk" * 4)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    # An idle session (idle_timeout_ms = 1500) is timed out.
    idle = socket.create_connection((HOST, server.port), timeout=5)
    # Memcache and Redis on the suite's stores; a Redis error answer.
    data = rpc.ttypes.TMemcacheData(data=b"v", flags=0)
    assert c.mc_set(rpc.ctx(), "default", "metrics:mc", data, 0)
    c.mc_get(rpc.ctx(), "default", "metrics:mc")
    c.rd_call(rpc.ctx(), "SET", "default", ["metrics:rd", "notanumber"])
    with pytest.raises(rpc.TApplicationException):
        c.rd_call(rpc.ctx(), "INCR", "default", ["metrics:rd"])
    scrape()
    # memcached stopped: calls wait on its one connection (busy, queued), pass their deadline, are slow.
    mc.proc.send_signal(signal.SIGSTOP)
    errors = []

    def stuck():
        try:
            cl = Conn(rpc, server, True)
            try:
                cl.client.mc_get(rpc.ctx(), "stopped", "metrics:stuck")
            finally:
                cl.close()
        except rpc.TApplicationException as e:
            errors.append(e.message)

    threads = [threading.Thread(target=stuck) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.15)
    scrape()
    for t in threads:
        t.join(10)
    assert len(errors) == 3, errors
    mc.proc.send_signal(signal.SIGCONT)
    # A pool with no server: connects fail, its breaker opens and refuses.
    for _ in range(6):
        with pytest.raises(rpc.TApplicationException):
            c.mc_get(rpc.ctx(), "dead", "metrics:dead")
    scrape()
    # MySQL: a lookup (miss, then hit) and the result cache (miss, hit, evict).
    host, port = stores.mysql.rsplit(":", 1)
    eid = int(time.time() * 1000) * 1000 + os.getpid() % 1000
    with pymysql.connect(host=host, port=int(port), user="app", password="pw", database="fae_lookup",
                         autocommit=True) as db, db.cursor() as cur:
        cur.execute("INSERT INTO ShardLookup (entityId, shardId, shardLock) VALUES (%s, 1, 0)", (eid,))
    for _ in range(2):
        c.my_query(rpc.ctx(), "user", "users", eid, "SELECT name FROM users WHERE uid = ?", [str(eid)], "")
    for _ in range(2):
        c.my_query(rpc.ctx(), "global", "kv", 0, "SELECT v FROM kv WHERE k = ?", ["metrics"], "metrics:ck")
    c.my_evict(rpc.ctx(), "metrics:ck")
    # A degraded method: refused, counted by reason.
    post(server, "/api/degrade", {"method": "id_next"})
    with pytest.raises(rpc.TApplicationException):
        c.id_next(rpc.ctx())
    post(server, "/api/restore", {})
    time.sleep(1.6)  # uptime and the sampler move on
    # The idle session is closed by the server (idle_timeout_ms = 1500), not by us: wait (bounded) for its
    # end of stream rather than close it at a guessed moment, which under load raced the server's sweep.
    idle.settimeout(10)
    assert idle.recv(1) == b"", "the idle session was not timed out"
    idle.close()
    held_conn = conns[1]
    held_conn.close()
    time.sleep(0.2)
    last = scrape()
    for conn in conns:
        conn.close()

    types, helps = declared(last)
    fams = families(last)
    assert types, "no families declared"
    for name, kind in types.items():
        assert kind in ("counter", "gauge", "histogram"), (name, kind)
        assert helps.get(name), "%s has no HELP text" % name
    for fam in fams.values():
        assert fam.type in ("counter", "gauge", "histogram"), (fam.name, fam.type)
        if fam.type != "histogram":
            continue
        series = {}
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(labels, {}).setdefault(s.name, []).append(s)
        for labels, parts in series.items():
            assert set(parts) == {fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"}, (fam.name, labels,
                                                                                                 set(parts))
            buckets = parts[fam.name + "_bucket"]
            values = [b.value for b in buckets]
            assert values == sorted(values), (fam.name, labels, values)
            inf = [b.value for b in buckets if b.labels["le"] == "+Inf"]
            assert inf == [parts[fam.name + "_count"][0].value], (fam.name, labels)
    # Every declared family moved: one of its series took two values over the run.
    still = []
    for fam in fams:
        values = [v for (f, _, _), v in seen.items() if f == fam]
        if not any(len(v) > 1 for v in values):
            still.append(fam)
    assert not still, "these metrics never moved: %s\nlast scrape:\n%s" % (still, last)
