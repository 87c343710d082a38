"""Every in-scope FunServant method through the generated client, over TBufferedTransport and again over
TFramedTransport (the `client` fixture is parametrized), TBinaryProtocol."""

import os
import re
import threading
import time

import pytest

EPOCH_MS = 1388834974657
PING_RE = re.compile(r"^ver:[^,\s]+, build:[^,\s]+, myid:[^,\s]+, uptime:\d+$")


def compose_id(ts_ms, tag, worker, seq):
    return (ts_ms - EPOCH_MS) << 22 | tag << 17 | worker << 12 | seq


def check_decoded(id_, parts, tag, t0_ms, t1_ms):
    assert isinstance(parts, list) and len(parts) == 4, parts
    ts_ms, got_tag, worker, seq = parts
    assert got_tag == tag, (id_, parts)
    # ts is absolute unix ms, taken between our send and our receive (1 s slack for clock granularity).
    assert t0_ms - 1000 <= ts_ms <= t1_ms + 1000, (id_, parts, t0_ms, t1_ms)
    assert 0 <= worker < 32 and 0 <= seq < 4096, parts
    assert compose_id(ts_ms, got_tag, worker, seq) == id_, (id_, parts)


def now_ms():
    return int(time.time() * 1000)


# ---- misc -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x", [0, 1, 42, -1, 2**31 - 1, -2**31])
def test_noop(client, x):
    assert client.noop(x) == x


def test_ping(client, rpc):
    s = client.ping(rpc.ctx())
    assert PING_RE.match(s), s
    # and again on the same connection
    assert PING_RE.match(client.ping(rpc.ctx()))


# ---- idgen ------------------------------------------------------------------------------------------

def test_id_next_positive_and_increasing(client, rpc):
    ids = [client.id_next(rpc.ctx()) for _ in range(200)]
    assert ids[0] > 0
    for a, b in zip(ids, ids[1:]):
        assert b > a, (a, b)


def test_id_next_decodes_with_tag_0(client, rpc):
    t0 = now_ms()
    id_ = client.id_next(rpc.ctx())
    t1 = now_ms()
    check_decoded(id_, client.id_decode(rpc.ctx(), id_), 0, t0, t1)


@pytest.mark.parametrize("tag", [0, 1, 7, 16, 31])
def test_id_next_with_tag_round_trips(client, rpc, tag):
    t0 = now_ms()
    id_ = client.id_next_with_tag(rpc.ctx(), tag)
    t1 = now_ms()
    assert id_ > 0
    check_decoded(id_, client.id_decode(rpc.ctx(), id_), tag, t0, t1)
    # tag in the bits too, independently of the server's decoder
    assert (id_ >> 17) & 0x1F == tag


def test_id_next_with_tag_increasing(client, rpc):
    ids = [client.id_next_with_tag(rpc.ctx(), 5) for _ in range(100)]
    for a, b in zip(ids, ids[1:]):
        assert b > a, (a, b)


@pytest.mark.parametrize("tag", [32, 33, -1, 1000, 32767, -32768])
def test_id_next_with_tag_out_of_range(client, rpc, tag):
    with pytest.raises(rpc.TApplicationException):
        client.id_next_with_tag(rpc.ctx(), tag)
    assert PING_RE.match(client.ping(rpc.ctx()))  # session still usable


@pytest.mark.parametrize("parts", [
    (EPOCH_MS, 0, 0, 0),
    (EPOCH_MS + 1, 1, 2, 3),
    (1700000000123, 5, 3, 7),
    (1700000000123, 31, 31, 4095),
])
def test_id_decode_known_values(client, rpc, parts):
    id_ = compose_id(*parts)
    assert client.id_decode(rpc.ctx(), id_) == list(parts)


def test_id_decode_does_not_validate_ctx(client, rpc):
    id_ = compose_id(1700000000123, 9, 1, 42)
    assert client.id_decode(rpc.ctx(rid=0, reason=""), id_) == [1700000000123, 9, 1, 42]


# ---- lcache -----------------------------------------------------------------------------------------

def test_lc_set_get_del(client, rpc, uniq):
    key = uniq + "-k"
    assert client.lc_set(rpc.ctx(), key, b"hello") is True
    assert client.lc_get(rpc.ctx(), key) == b"hello"
    assert client.lc_set(rpc.ctx(), key, b"world") is True  # overwrite
    assert client.lc_get(rpc.ctx(), key) == b"world"
    assert client.lc_del(rpc.ctx(), key) is None
    with pytest.raises(rpc.TCacheMissed):
        client.lc_get(rpc.ctx(), key)
    client.lc_del(rpc.ctx(), key)  # deleting a missing key is fine


def test_lc_get_missing(client, rpc, uniq):
    with pytest.raises(rpc.TCacheMissed):
        client.lc_get(rpc.ctx(), uniq + "-never-set")
    assert PING_RE.match(client.ping(rpc.ctx()))  # session still usable


def test_lc_binary_all_bytes(client, rpc, uniq):
    key = uniq + "-bin"
    value = bytes(range(256)) * 3
    assert client.lc_set(rpc.ctx(), key, value) is True
    assert client.lc_get(rpc.ctx(), key) == value


def test_lc_empty_value(client, rpc, uniq):
    key = uniq + "-empty"
    assert client.lc_set(rpc.ctx(), key, b"") is True
    assert client.lc_get(rpc.ctx(), key) == b""


def test_lc_one_mib(client, rpc, uniq):
    key = uniq + "-1mib"
    value = os.urandom(1 << 20)
    assert client.lc_set(rpc.ctx(), key, value) is True
    got = client.lc_get(rpc.ctx(), key)
    assert len(got) == len(value) and got == value
    client.lc_del(rpc.ctx(), key)


def test_lc_unicode_key(client, rpc, uniq):
    key = uniq + "-ключ-鍵"
    assert client.lc_set(rpc.ctx(), key, b"v") is True
    assert client.lc_get(rpc.ctx(), key) == b"v"


def test_lc_visible_across_connections(connect, rpc, uniq):
    a, b = connect(), connect(framed=True)
    key = uniq + "-shared"
    assert a.client.lc_set(rpc.ctx(), key, b"x1") is True
    assert b.client.lc_get(rpc.ctx(), key) == b"x1"
    b.client.lc_del(rpc.ctx(), key)
    with pytest.raises(rpc.TCacheMissed):
        a.client.lc_get(rpc.ctx(), key)


# ---- lock -------------------------------------------------------------------------------------------

def test_lock_unlock(client, rpc, uniq):
    key = uniq + "-lock"
    assert client.lock(rpc.ctx(), "pytest", key) is True
    assert client.lock(rpc.ctx(), "pytest", key) is False  # held, not expired
    assert client.unlock(rpc.ctx(), "pytest", key) is None
    assert client.lock(rpc.ctx(), "pytest", key) is True
    client.unlock(rpc.ctx(), "pytest", key)


def test_lock_held_across_connections(connect, rpc, uniq):
    a, b = connect(), connect()
    key = uniq + "-lock2"
    assert a.client.lock(rpc.ctx(), "a", key) is True
    assert b.client.lock(rpc.ctx(), "b", key) is False
    a.client.unlock(rpc.ctx(), "a", key)
    assert b.client.lock(rpc.ctx(), "b", key) is True
    b.client.unlock(rpc.ctx(), "b", key)


def test_lock_keys_independent(client, rpc, uniq):
    k1, k2 = uniq + "-l1", uniq + "-l2"
    assert client.lock(rpc.ctx(), "pytest", k1) is True
    assert client.lock(rpc.ctx(), "pytest", k2) is True
    client.unlock(rpc.ctx(), "pytest", k1)
    client.unlock(rpc.ctx(), "pytest", k2)


# ---- registry ---------------------------------------------------------------------------------------

def test_zk_create_children_del(client, rpc, uniq):
    root = "/" + uniq
    c = rpc.ctx
    assert client.zk_create(c(), root + "/a/b", "data-b") is True   # parents implicit
    assert client.zk_create(c(), root + "/a/b", "again") is False   # exists
    assert client.zk_create(c(), root + "/a", "x") is False         # implicit parent exists
    assert client.zk_children(c(), root) == ["a"]
    assert client.zk_create(c(), root + "/a/c", "") is True
    assert client.zk_create(c(), root + "/a/a0", "d") is True
    assert client.zk_children(c(), root + "/a") == ["a0", "b", "c"]  # sorted
    assert client.zk_children(c(), root + "/a/b") == []
    assert client.zk_children(c(), root + "/missing") == []
    assert client.zk_del(c(), root + "/a/b") is True
    assert client.zk_del(c(), root + "/a/b") is False
    assert client.zk_children(c(), root + "/a") == ["a0", "c"]
    assert client.zk_del(c(), root) is True                          # subtree
    assert client.zk_children(c(), root) == []
    assert client.zk_children(c(), root + "/a") == []
    assert client.zk_del(c(), root + "/a/c") is False
    assert client.zk_del(c(), root) is False


def test_zk_children_sorted(client, rpc, uniq):
    root = "/" + uniq
    names = ["zeta", "alpha", "m10", "m2", "Beta", "_u"]
    for n in names:
        assert client.zk_create(rpc.ctx(), root + "/" + n, n) is True
    assert client.zk_children(rpc.ctx(), root) == sorted(names)
    assert client.zk_del(rpc.ctx(), root) is True


@pytest.mark.parametrize("bad", ["", "a", "a/b", "/a//b", "/a/", "//"])
@pytest.mark.parametrize("method", ["zk_create", "zk_children", "zk_del"])
def test_zk_invalid_path(client, rpc, uniq, method, bad):
    # Prefix a unique root where the path is absolute, so that a wrongly accepted path hurts nobody.
    path = bad
    if bad.startswith("/") and bad != "//":
        path = "/" + uniq + bad
    args = [rpc.ctx(), path] + (["data"] if method == "zk_create" else [])
    with pytest.raises(rpc.TApplicationException):
        getattr(client, method)(*args)
    assert PING_RE.match(client.ping(rpc.ctx()))  # session still usable


# ---- concurrency (several connections at once) ------------------------------------------------------

def _run_threads(n, target):
    errors, threads = [], []

    def wrap(i):
        try:
            target(i)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    for i in range(n):
        t = threading.Thread(target=wrap, args=(i,))
        threads.append(t)
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_id_next_unique_across_connections(connect, rpc):
    n, per = 4, 500
    conns = [connect(framed=(i % 2 == 1)) for i in range(n)]
    got = [None] * n

    def work(i):
        got[i] = [conns[i].client.id_next(rpc.ctx()) for _ in range(per)]

    _run_threads(n, work)
    all_ids = [x for ids in got for x in ids]
    assert len(set(all_ids)) == n * per, "duplicate ids across connections"
    for ids in got:
        assert all(b > a for a, b in zip(ids, ids[1:]))


def test_lock_one_winner(connect, rpc, uniq):
    n = 8
    key = uniq + "-contended"
    conns = [connect() for _ in range(n)]
    results = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait(10)
        results[i] = conns[i].client.lock(rpc.ctx(), "race", key)

    _run_threads(n, work)
    assert results.count(True) == 1, results
    conns[0].client.unlock(rpc.ctx(), "race", key)
    assert conns[1].client.lock(rpc.ctx(), "race", key) is True
    conns[1].client.unlock(rpc.ctx(), "race", key)


def test_zk_create_one_winner(connect, rpc, uniq):
    n = 8
    path = "/" + uniq + "/node"
    conns = [connect() for _ in range(n)]
    results = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait(10)
        results[i] = conns[i].client.zk_create(rpc.ctx(), path, "d%d" % i)

    _run_threads(n, work)
    assert results.count(True) == 1, results
    assert conns[0].client.zk_del(rpc.ctx(), "/" + uniq) is True
