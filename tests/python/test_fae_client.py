"""clients/python/fae_client.py against the server: every in-scope method, pool retry, Context filling."""

import os
import re
import time

import pytest
from thrift.Thrift import TApplicationException
from thrift.transport.TTransport import TTransportException

from conftest import free_ports

PING_RE = re.compile(r"^ver:[^,\s]+, build:[^,\s]+, myid:[^,\s]+, uptime:\d+$")


@pytest.fixture(params=[False, True], ids=["buffered", "framed"])
def fae(request, rpc, faed):
    c = rpc.fae_client.FaeClient([faed.addr], reason="pytest.fae_client", uid=7, framed=request.param)
    yield c
    c.close()


def test_all_methods(fae, rpc, uniq):
    assert fae.noop(11) == 11
    assert PING_RE.match(fae.ping())

    id1 = fae.id_next()
    id2 = fae.id_next()
    assert 0 < id1 < id2
    t = fae.id_next_with_tag(12)
    ts, tag, worker, seq = fae.id_decode(t)
    assert tag == 12 and abs(ts - time.time() * 1000) < 60000

    key = uniq + "-k"
    value = bytes(range(256))
    assert fae.lc_set(key, value) is True
    assert fae.lc_get(key) == value
    assert fae.lc_del(key) is None
    with pytest.raises(rpc.TCacheMissed):
        fae.lc_get(key)

    lk = uniq + "-lock"
    assert fae.lock("pytest", lk) is True
    assert fae.lock("pytest", lk) is False
    assert fae.unlock("pytest", lk) is None
    assert fae.lock("pytest", lk) is True
    fae.unlock("pytest", lk)

    root = "/" + uniq
    assert fae.zk_create(root + "/b", "1") is True
    assert fae.zk_create(root + "/a", "2") is True
    assert fae.zk_create(root + "/a", "2") is False
    assert fae.zk_children(root) == ["a", "b"]
    assert fae.zk_del(root) is True
    assert fae.zk_children(root) == []
    assert fae.zk_del(root) is False


def test_one_connection_reused(fae):
    fae.ping()
    transport = fae._transport
    for _ in range(5):
        fae.noop(1)
    assert fae._transport is transport


def test_application_error_keeps_connection(fae):
    fae.ping()
    transport = fae._transport
    with pytest.raises(TApplicationException):
        fae.id_next_with_tag(32)
    assert fae._transport is transport
    assert PING_RE.match(fae.ping())


def test_zk_invalid_path_via_helper(fae):
    with pytest.raises(TApplicationException):
        fae.zk_create("/a//b", "x")
    assert fae.noop(1) == 1


def test_context_per_request(rpc):
    fc = rpc.fae_client
    c = fc.FaeClient(["127.0.0.1:1"], reason="r", uid=5)
    rids = [c.context().rid for _ in range(1000)]
    assert all(0 < r < (1 << 63) for r in rids)
    assert len(set(rids)) == len(rids)
    ctx = c.context()
    assert ctx.reason == "r" and ctx.uid == 5
    assert c.context("other").reason == "other"
    with pytest.raises(ValueError):
        fc.FaeClient(["127.0.0.1:1"], reason="")


def test_parse_hosts(rpc):
    p = rpc.fae_client.parse_hosts
    assert p("a:1,b:2") == [("a", 1), ("b", 2)]
    assert p(["a:1", " b:2 "]) == [("a", 1), ("b", 2)]
    assert p(["[::1]:9"]) == [("::1", 9)]
    for bad in ["", "a", "a:", ":1", "a:x"]:
        with pytest.raises(ValueError):
            p(bad)


def test_retry_next_host_on_connect_failure(rpc, faed):
    dead = free_ports(1)[0]  # nothing listens there
    for _ in range(20):  # the first host is picked at random: both orders get exercised
        c = rpc.fae_client.FaeClient(["127.0.0.1:%d" % dead, faed.addr], reason="pytest.retry",
                                     connect_timeout_ms=500)
        try:
            assert PING_RE.match(c.ping())
            assert c.addr == (faed.host, faed.port)
        finally:
            c.close()


def test_all_hosts_down(rpc):
    d1, d2 = free_ports(2)
    c = rpc.fae_client.FaeClient(["127.0.0.1:%d" % d1, "127.0.0.1:%d" % d2], reason="pytest.down",
                                 connect_timeout_ms=500)
    with pytest.raises(TTransportException):
        c.ping()
    assert c._transport is None


def test_reconnect_after_close(fae):
    assert fae.noop(3) == 3
    fae.close()
    assert fae.noop(4) == 4


def test_context_manager(rpc, faed):
    with rpc.fae_client.FaeClient(faed.addr, reason="pytest.with") as c:
        assert c.addr is not None
        assert c.noop(9) == 9
    assert c.addr is None


def test_rid_changes_after_fork(rpc):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    fc = rpc.fae_client
    parent = fc.next_rid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, str(fc.next_rid()).encode())
        finally:
            os._exit(0)
    os.close(w)
    child = int(os.read(r, 64).decode())
    os.close(r)
    os.waitpid(pid, 0)
    assert child > 0
    assert (child >> 32) != (parent >> 32)  # a new random base in the child (1 in 2**31 to collide)
