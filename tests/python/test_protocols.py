"""Header transports beyond what the conn fixture's kinds cover.

The generated client over THeader (binary and compact) runs every method test through the `conn` fixture
(conftest.KINDS). Here: a TTHeader request built by hand from Kitex's published layout (CloudWeGo's
"TTHeader" transport protocol: fixed-width u8 protocol id and transform count, u16 info counts and lengths,
an INTKEYVALUE block with Kitex's keys), plain and in its TTHeaderFramed form; the reply read back by hand;
and THeader's zlib transform, which faed refuses with a clear PROTOCOL_ERROR rather than misreading.
"""

import socket
import struct

import pytest

from thrift.Thrift import TApplicationException, TMessageType
from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

TTHEADER_MAGIC = 0x1000


def _recv_exact(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError("faed closed the connection after %d of %d bytes" % (len(got), n))
        got += chunk
    return got


def _ttheader_request(payload, seq, framed_payload=False):
    """A TTHeader frame as Kitex writes it: binary payload (protocol id 0), no transforms, an INTKEYVALUE
    block (1 TransportType, 3 FromService, 6 ToService, 9 ToMethod, 12 RPCTimeout ms), a KEYVALUE block."""
    info = b""
    ints = [(3, b"php-web"), (6, b"fae"), (9, b"noop"), (12, b"1000")]
    info += struct.pack(">BH", 0x10, len(ints))
    for k, v in ints:
        info += struct.pack(">HH", k, len(v)) + v
    strs = [(b"isn", b"FunServant")]
    info += struct.pack(">BH", 0x01, len(strs))
    for k, v in strs:
        info += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    header = struct.pack(">BB", 0, 0) + info
    header += b"\x00" * ((4 - len(header) % 4) % 4)
    if framed_payload:
        payload = struct.pack(">I", len(payload)) + payload
    rest = struct.pack(">HHiH", TTHEADER_MAGIC, 0, seq, len(header) // 4) + header + payload
    return struct.pack(">I", len(rest)) + rest


def _noop_message(rpc, seqid, x):
    buf = TTransport.TMemoryBuffer()
    p = TBinaryProtocol.TBinaryProtocol(buf)
    p.writeMessageBegin("noop", TMessageType.CALL, seqid)
    rpc.FunServant.noop_args(x=x).write(p)
    p.writeMessageEnd()
    return buf.getvalue()


@pytest.mark.parametrize("framed_payload", [False, True], ids=["TTHeader", "TTHeaderFramed"])
def test_ttheader_request_built_from_kitex_layout(rpc, faed, framed_payload):
    with socket.create_connection((faed.host, faed.port), timeout=10) as s:
        for i, seq in enumerate([7, 8, 0x7fffffff]):
            s.sendall(_ttheader_request(_noop_message(rpc, 100 + i, 31 * i), seq, framed_payload))
            (length,) = struct.unpack(">I", _recv_exact(s, 4))
            frame = _recv_exact(s, length)
            magic, _flags, rseq, words = struct.unpack(">HHiH", frame[:10])
            assert magic == TTHEADER_MAGIC
            assert rseq == seq, "the frame's sequence id is echoed"
            header = frame[10:10 + 4 * words]
            assert header[0] == 0, "binary payload, as the request's"
            assert header[1] == 0, "no transforms"
            payload = frame[10 + 4 * words:]
            if framed_payload:
                (inner,) = struct.unpack(">I", payload[:4])
                assert inner == len(payload) - 4
                payload = payload[4:]
            p = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(payload))
            name, mtype, seqid = p.readMessageBegin()
            assert (name, mtype, seqid) == ("noop", TMessageType.REPLY, 100 + i)
            r = rpc.FunServant.noop_result()
            r.read(p)
            assert r.success == 31 * i


def test_theader_zlib_transform_is_refused_clearly(rpc, faed):
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport import TSocket
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransformID
    sock = TSocket.TSocket(faed.host, faed.port)
    sock.setTimeout(10000)
    sock.open()
    try:
        p = THeaderProtocol(sock, [THeaderClientType.HEADERS])
        p.trans.add_transform(THeaderTransformID.ZLIB)
        client = rpc.FunServant.Client(p)
        with pytest.raises(TApplicationException) as e:
            client.noop(1)
        assert e.value.type == TApplicationException.PROTOCOL_ERROR
        assert "zlib" in e.value.message
    finally:
        sock.close()
    # other sessions carry on
    with socket.create_connection((faed.host, faed.port), timeout=10) as s:
        s.sendall(_noop_message(rpc, 1, 5))
        p = TBinaryProtocol.TBinaryProtocol(TTransport.TFileObjectTransport(s.makefile("rb")))
        assert p.readMessageBegin() == ("noop", TMessageType.REPLY, 1)
