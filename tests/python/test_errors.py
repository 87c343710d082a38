"""Error paths: invalid Context, unknown method, and that the session survives each; pipelining.
Over TBufferedTransport and TFramedTransport (the `conn`/`client` fixtures are parametrized)."""

import re

import pytest
from thrift.Thrift import TApplicationException, TMessageType
from thrift.protocol import TBinaryProtocol

PING_RE = re.compile(r"^ver:[^,\s]+, build:[^,\s]+, myid:[^,\s]+, uptime:\d+$")

# Every in-scope method that takes a validated ctx, with the arguments after ctx.
CTX_METHODS = [
    ("ping", []),
    ("id_next", []),
    ("id_next_with_tag", [3]),
    ("lc_set", ["pytest-badctx-key", b"v"]),
    ("lc_get", ["pytest-badctx-key"]),
    ("lc_del", ["pytest-badctx-key"]),
    ("lock", ["pytest", "pytest-badctx-lock"]),
    ("unlock", ["pytest", "pytest-badctx-lock"]),
    ("zk_create", ["/pytest-badctx/x", "d"]),
    ("zk_children", ["/pytest-badctx"]),
    ("zk_del", ["/pytest-badctx/x"]),
    ("mc_get", ["default", "pytest-badctx-key"]),
    ("mc_delete", ["default", "pytest-badctx-key"]),
    ("mc_increment", ["default", "pytest-badctx-key", 1]),
    ("rd_call", ["GET", "default", ["pytest-badctx-key"]]),
]


@pytest.mark.parametrize("bad", ["rid0", "empty_reason", "both"])
@pytest.mark.parametrize("method,args", CTX_METHODS, ids=[m for m, _ in CTX_METHODS])
def test_invalid_context_rejected(client, rpc, method, args, bad):
    ctx = {"rid0": rpc.ctx(rid=0), "empty_reason": rpc.ctx(reason=""),
           "both": rpc.ctx(rid=0, reason="")}[bad]
    with pytest.raises(TApplicationException) as ei:
        getattr(client, method)(ctx, *args)
    assert not isinstance(ei.value, rpc.TCacheMissed)
    # the same session stays usable
    assert PING_RE.match(client.ping(rpc.ctx()))
    assert client.noop(7) == 7


def test_invalid_context_has_no_effect(client, rpc, uniq):
    key = uniq + "-k"
    with pytest.raises(TApplicationException):
        client.lc_set(rpc.ctx(rid=0), key, b"v")
    with pytest.raises(rpc.TCacheMissed):
        client.lc_get(rpc.ctx(), key)
    lk = uniq + "-lock"
    with pytest.raises(TApplicationException):
        client.lock(rpc.ctx(reason=""), "pytest", lk)
    assert client.lock(rpc.ctx(), "pytest", lk) is True
    client.unlock(rpc.ctx(), "pytest", lk)
    with pytest.raises(TApplicationException):
        client.zk_create(rpc.ctx(rid=0), "/" + uniq + "/x", "d")
    assert client.zk_children(rpc.ctx(), "/" + uniq) == []


def _send_unknown(protocol, transport, name, seqid):
    protocol.writeMessageBegin(name, TMessageType.CALL, seqid)
    protocol.writeStructBegin("no_such_method_args")
    protocol.writeFieldStop()
    protocol.writeStructEnd()
    protocol.writeMessageEnd()
    transport.flush()


def _read_app_exception(protocol):
    name, mtype, seqid = protocol.readMessageBegin()
    assert mtype == TMessageType.EXCEPTION, (name, mtype, seqid)
    x = TApplicationException()
    x.read(protocol)
    protocol.readMessageEnd()
    return name, seqid, x


def test_unknown_method(conn, rpc):
    _send_unknown(conn.protocol, conn.transport, "no_such_method", 4242)
    name, seqid, x = _read_app_exception(conn.protocol)
    assert name == "no_such_method"
    assert seqid == 4242
    assert x.type == TApplicationException.UNKNOWN_METHOD, (x.type, x.message)
    assert x.message, "a clear message is expected"
    # the same connection still serves calls
    assert PING_RE.match(conn.client.ping(rpc.ctx()))
    assert conn.client.noop(5) == 5


def test_unknown_method_with_arguments(conn, rpc):
    """An unknown call carrying fields (they must be skipped, not misread as the next message)."""
    p = conn.protocol
    p.writeMessageBegin("mg_find_one", TMessageType.CALL, 9)
    p.writeStructBegin("args")
    p.writeFieldBegin("ctx", 12, 1)
    rpc.ctx().write(p)
    p.writeFieldEnd()
    p.writeFieldBegin("x", 11, 2)
    p.writeString("some string")
    p.writeFieldEnd()
    p.writeFieldBegin("l", 15, 3)
    p.writeListBegin(10, 3)
    for i in (1, 2, 3):
        p.writeI64(i)
    p.writeListEnd()
    p.writeFieldEnd()
    p.writeFieldStop()
    p.writeStructEnd()
    p.writeMessageEnd()
    conn.transport.flush()
    name, seqid, x = _read_app_exception(p)
    assert (name, seqid, x.type) == ("mg_find_one", 9, TApplicationException.UNKNOWN_METHOD)
    assert conn.client.noop(6) == 6


def test_pipelined_calls_answered_in_order(conn, rpc):
    c = conn.client
    # send several calls before reading any answer
    c.send_noop(1)
    c.send_ping(rpc.ctx())
    c.send_noop(2)
    c.send_id_next_with_tag(rpc.ctx(), 32)  # an application error in the middle
    c.send_noop(3)
    assert c.recv_noop() == 1
    assert PING_RE.match(c.recv_ping())
    assert c.recv_noop() == 2
    with pytest.raises(TApplicationException):
        c.recv_id_next_with_tag()
    assert c.recv_noop() == 3


def test_pipelined_in_one_write(conn, rpc):
    """Many calls flushed as one write (one frame each when framed)."""
    p = conn.protocol
    n = 50
    for i in range(n):
        p.writeMessageBegin("noop", TMessageType.CALL, i + 1)
        rpc.FunServant.noop_args(x=i).write(p)
        p.writeMessageEnd()
        if conn.framing != "buffered":
            conn.transport.flush()  # a frame per message
    conn.transport.flush()
    for i in range(n):
        name, mtype, seqid = p.readMessageBegin()
        assert (name, mtype, seqid) == ("noop", TMessageType.REPLY, i + 1)
        r = rpc.FunServant.noop_result()
        r.read(p)
        p.readMessageEnd()
        assert r.success == i
