"""mc_* and rd_call through the generated client against real memcached and redis-server processes (the
"default" pools of the suite's faed: two of each, see conftest.py), over TBufferedTransport and
TFramedTransport. Every case and every error path; the session survives each application error. The stores
are also read and written directly, so that what fae did is checked at the store, not only through fae."""

import bisect
import hashlib
import json
import socket
import time
import zlib

import pytest
from thrift.Thrift import TApplicationException


# ---- placement, computed independently of the server (TOOLCHAIN-backends.md) ---------------------------

def standard_index(key, n):
    h = (zlib.crc32(key.encode()) >> 16) & 0x7FFF
    return (h or 1) % n


def ketama_ring(servers):
    points = []
    for s, name in enumerate(servers):
        host, port = name.rsplit(":", 1)
        label = host if port == "11211" else name
        for i in range(40):
            d = hashlib.md5(("%s-%d" % (label, i)).encode()).digest()
            for k in range(4):
                points.append((int.from_bytes(d[4 * k:4 * k + 4], "little"), s))
    points.sort()
    return points


def ketama_index(ring, key):
    h = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
    i = bisect.bisect_left(ring, (h, -1))
    return ring[i % len(ring)][1]


def raw(addr, request, end=b"\r\n"):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request)
        got = b""
        while not got.endswith(end):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def mc_server(stores, key):
    return stores.memcache[standard_index(key, len(stores.memcache))]


def rd_server(stores, key):
    return stores.redis[ketama_index(ketama_ring(stores.redis), key)]


def app_error(f, *args):
    with pytest.raises(TApplicationException) as ei:
        f(*args)
    assert ei.value.type == TApplicationException.INTERNAL_ERROR, (ei.value.type, ei.value.message)
    return ei.value.message


def data(rpc, value, flags=0):
    return rpc.ttypes.TMemcacheData(data=value, flags=flags)


# ---- memcache -------------------------------------------------------------------------------------------

def test_mc_set_get_keeps_bytes_flags_and_expiration(client, rpc, stores, uniq):
    key = uniq + ":a"
    value = bytes(range(256)) * 3 + b"\r\nEND\r\n"
    assert client.mc_set(rpc.ctx(), "default", key, data(rpc, value, 0x7FFF0001), 120) is True
    got = client.mc_get(rpc.ctx(), "default", key)
    assert (got.data, got.flags) == (value, 0x7FFF0001)
    # At the store: on the server the PHP standard strategy names, with its flags and TTL.
    meta = raw(mc_server(stores, key), b"mg " + key.encode() + b" t f s\r\n")
    assert meta.startswith(b"HD "), meta
    fields = dict((f[:1], f[1:]) for f in meta.split()[1:])
    assert int(fields[b"f"]) == 0x7FFF0001 and int(fields[b"s"]) == len(value), meta
    assert 100 <= int(fields[b"t"]) <= 120, meta
    # Negative flags travel as the same 32 bits.
    assert client.mc_set(rpc.ctx(), "default", key, data(rpc, b"x", -2), 0)
    assert client.mc_get(rpc.ctx(), "default", key).flags == -2


def test_mc_get_of_a_key_written_straight_into_memcached(client, rpc, stores, uniq):
    key = uniq + ":direct"
    r = raw(mc_server(stores, key), b"set %s 42 0 5\r\nhello\r\n" % key.encode())
    assert r == b"STORED\r\n"
    got = client.mc_get(rpc.ctx(), "default", key)
    assert (got.data, got.flags) == (b"hello", 42)


def test_mc_get_miss_is_tcachemissed(client, rpc, uniq):
    with pytest.raises(rpc.TCacheMissed):
        client.mc_get(rpc.ctx(), "default", uniq + ":missing")
    assert client.noop(3) == 3


def test_mc_add_only_when_absent(client, rpc, uniq):
    key = uniq + ":add"
    assert client.mc_add(rpc.ctx(), "default", key, data(rpc, b"first"), 0) is True
    assert client.mc_add(rpc.ctx(), "default", key, data(rpc, b"second"), 0) is False
    assert client.mc_get(rpc.ctx(), "default", key).data == b"first"


def test_mc_delete(client, rpc, uniq):
    key = uniq + ":del"
    assert client.mc_set(rpc.ctx(), "default", key, data(rpc, b"v"), 0)
    assert client.mc_delete(rpc.ctx(), "default", key) is True
    assert client.mc_delete(rpc.ctx(), "default", key) is False
    with pytest.raises(rpc.TCacheMissed):
        client.mc_get(rpc.ctx(), "default", key)


def test_mc_increment_and_decrement_floor_at_zero(client, rpc, uniq):
    key = uniq + ":n"
    assert client.mc_set(rpc.ctx(), "default", key, data(rpc, b"10"), 0)
    assert client.mc_increment(rpc.ctx(), "default", key, 5) == 15
    assert client.mc_increment(rpc.ctx(), "default", key, -3) == 12
    assert client.mc_increment(rpc.ctx(), "default", key, -100) == 0
    assert client.mc_increment(rpc.ctx(), "default", key, 0) == 0
    assert client.mc_increment(rpc.ctx(), "default", key, 2**40) == 2**40


def test_mc_increment_errors_keep_the_session(client, rpc, uniq):
    msg = app_error(client.mc_increment, rpc.ctx(), "default", uniq + ":absent", 1)
    assert "not found" in msg, msg
    key = uniq + ":text"
    assert client.mc_set(rpc.ctx(), "default", key, data(rpc, b"abc"), 0)
    msg = app_error(client.mc_increment, rpc.ctx(), "default", key, 1)
    assert "CLIENT_ERROR" in msg and "non-numeric" in msg, msg
    assert client.noop(9) == 9


BAD_KEYS = [
    ("k" * 251, "251"),
    ("has space", "0x20"),
    ("new\nline", "0x0a"),
    ("tab\tkey", "0x09"),
    ("", "empty"),
]


@pytest.mark.parametrize("key,why", BAD_KEYS, ids=["251-bytes", "space", "newline", "tab", "empty"])
@pytest.mark.parametrize("method", ["mc_get", "mc_set", "mc_add", "mc_delete", "mc_increment"])
def test_bad_keys_are_refused_and_never_reach_memcached(client, rpc, stores, method, key, why):
    args = {"mc_get": [], "mc_delete": [], "mc_increment": [1],
            "mc_set": [data(rpc, b"v"), 0], "mc_add": [data(rpc, b"v"), 0]}[method]
    before = [raw(a, b"stats\r\n", b"END\r\n") for a in stores.memcache]
    msg = app_error(getattr(client, method), rpc.ctx(), "default", key, *args)
    assert "invalid key" in msg and why in msg, msg
    assert client.noop(5) == 5
    # memcached saw no command from this call: its command counters did not move (the stats probes
    # themselves are not commands it counts in cmd_*).
    after = [raw(a, b"stats\r\n", b"END\r\n") for a in stores.memcache]
    pick = lambda s: [l for l in s.split(b"\r\n") if l.startswith((b"STAT cmd_get ", b"STAT cmd_set ",
                                                                  b"STAT cmd_touch "))]
    assert [pick(s) for s in before] == [pick(s) for s in after]


def test_unknown_pool_lists_the_known_ones(client, rpc):
    msg = app_error(client.mc_get, rpc.ctx(), "nosuchpool", "k")
    assert 'unknown memcache pool "nosuchpool"' in msg and "default" in msg, msg
    msg = app_error(client.rd_call, rpc.ctx(), "GET", "nosuchpool", ["k"])
    assert 'unknown redis pool "nosuchpool"' in msg and "default" in msg, msg
    assert client.noop(1) == 1


def test_keys_spread_over_both_servers_by_php_placement(client, rpc, stores, uniq):
    keys = ["%s:spread:%d" % (uniq, i) for i in range(40)]
    for k in keys:
        assert client.mc_set(rpc.ctx(), "default", k, data(rpc, k.encode()), 0)
    for k in keys:
        here = mc_server(stores, k)
        other = [a for a in stores.memcache if a != here][0]
        assert raw(here, b"get %s\r\n" % k.encode(), b"END\r\n").startswith(b"VALUE"), (k, here)
        assert raw(other, b"get %s\r\n" % k.encode(), b"END\r\n") == b"END\r\n", (k, other)
    assert len({mc_server(stores, k) for k in keys}) == 2


# ---- redis ----------------------------------------------------------------------------------------------

def test_rd_call_strings_integers_and_arrays(client, rpc, stores, uniq):
    k = uniq + ":s"
    assert client.rd_call(rpc.ctx(), "SET", "default", [k, "hello"]) == "OK"
    assert client.rd_call(rpc.ctx(), "get", "default", [k]) == "hello"
    assert client.rd_call(rpc.ctx(), "APPEND", "default", [k, "!"]) == "6"
    n = uniq + ":n"
    assert client.rd_call(rpc.ctx(), "INCRBY", "default", [n, "-5"]) == "-5"
    l = uniq + ":l"
    assert client.rd_call(rpc.ctx(), "RPUSH", "default", [l, "a", "b", "c"]) == "3"
    assert json.loads(client.rd_call(rpc.ctx(), "LRANGE", "default", [l, "0", "-1"])) == ["a", "b", "c"]
    h = uniq + ":h"
    assert client.rd_call(rpc.ctx(), "HSET", "default", [h, "f1", "v1", "f2", "v2"]) == "2"
    got = json.loads(client.rd_call(rpc.ctx(), "HGETALL", "default", [h]))
    assert dict(zip(got[::2], got[1::2])) == {"f1": "v1", "f2": "v2"}
    assert json.loads(client.rd_call(rpc.ctx(), "LRANGE", "default", [uniq + ":none", "0", "-1"])) == []
    # At the store that ketama names.
    assert raw(rd_server(stores, k), b"GET %s\r\n" % k.encode(), b"hello!\r\n") == b"$6\r\nhello!\r\n"


def test_rd_call_nil_and_redis_errors_are_application_errors(client, rpc, uniq):
    msg = app_error(client.rd_call, rpc.ctx(), "GET", "default", [uniq + ":absent"])
    assert "nil" in msg, msg
    l = uniq + ":list"
    client.rd_call(rpc.ctx(), "LPUSH", "default", [l, "x"])
    msg = app_error(client.rd_call, rpc.ctx(), "GET", "default", [l])
    assert "WRONGTYPE" in msg, msg
    msg = app_error(client.rd_call, rpc.ctx(), "GET", "default", [l, "extra"])
    assert "wrong number of arguments" in msg, msg
    msg = app_error(client.rd_call, rpc.ctx(), "NOSUCHCOMMAND", "default", [l])
    assert "unknown command" in msg, msg
    assert client.noop(2) == 2


@pytest.mark.parametrize("cmd,args", [
    ("FLUSHALL", []), ("flushdb", []), ("CONFIG", ["SET", "maxmemory", "1"]), ("SHUTDOWN", []),
    ("DEBUG", ["SLEEP", "5"]), ("MONITOR", []), ("SUBSCRIBE", ["ch"]), ("KEYS", ["*"]), ("SCRIPT", ["FLUSH"]),
    ("CLIENT", ["KILL", "TYPE", "normal"]), ("SELECT", ["1"]), ("MULTI", []), ("BLPOP", ["k", "0"]),
    ("XREAD", ["BLOCK", "0", "STREAMS", "s", "$"]),
])
def test_denied_commands_are_refused_and_never_run(client, rpc, stores, uniq, cmd, args):
    k = uniq + ":keep"
    assert client.rd_call(rpc.ctx(), "SET", "default", [k, "kept"]) == "OK"
    msg = app_error(client.rd_call, rpc.ctx(), cmd, "default", args or [k])
    assert cmd.upper() in msg and "refused" in msg, msg
    assert client.rd_call(rpc.ctx(), "GET", "default", [k]) == "kept"
    assert raw(rd_server(stores, k), b"PING\r\n") == b"+PONG\r\n"


def test_bad_command_names_are_refused(client, rpc):
    for cmd in ["", "GET\r\nFLUSHALL", "a b", "x" * 65]:
        msg = app_error(client.rd_call, rpc.ctx(), cmd, "default", ["k"])
        assert "not a Redis command name" in msg, msg
    assert client.noop(4) == 4


def keys_by_server(stores, prefix, n=60):
    ring = ketama_ring(stores.redis)
    by = {}
    for i in range(n):
        k = "%s:%d" % (prefix, i)
        by.setdefault(ketama_index(ring, k), []).append(k)
    assert len(by) == 2, "60 keys all on one server"
    return by


def test_multi_key_commands_on_one_server_work_across_servers_are_refused(client, rpc, stores, uniq):
    by = keys_by_server(stores, uniq)
    same = by[0][:2]
    assert client.rd_call(rpc.ctx(), "MSET", "default", [same[0], "1", same[1], "2"]) == "OK"
    assert json.loads(client.rd_call(rpc.ctx(), "MGET", "default", same)) == ["1", "2"]
    assert client.rd_call(rpc.ctx(), "DEL", "default", same) == "2"
    cross = [by[0][0], by[1][0]]
    for cmd, args in [("MGET", cross), ("DEL", cross), ("MSET", [cross[0], "1", cross[1], "2"]),
                      ("RENAME", cross), ("EVAL", ["return 1", "2"] + cross)]:
        msg = app_error(client.rd_call, rpc.ctx(), cmd, "default", args)
        assert "different servers" in msg, (cmd, msg)
    # Nothing was written by the refused MSET.
    assert json.loads(client.rd_call(rpc.ctx(), "MGET", "default", [cross[0]])) == [None]
    # EVAL routes by its keys, not by the script.
    assert client.rd_call(rpc.ctx(), "EVAL", "default",
                          ["return redis.call('SET', KEYS[1], ARGV[1])", "1", by[1][1], "z"]) == "OK"
    assert raw(stores.redis[1], b"GET %s\r\n" % by[1][1].encode(), b"z\r\n") == b"$1\r\nz\r\n"
    msg = app_error(client.rd_call, rpc.ctx(), "EVAL", "default", ["return 1", "5", "a"])
    assert "number of keys" in msg, msg
    assert client.noop(6) == 6
