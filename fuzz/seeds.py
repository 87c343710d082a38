#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz corpora (fuzz/corpus/*/seed-*): well-formed calls of every
shape fae serves, in both transports, and the malformed shapes the robustness tests use. The fuzzer grows
the corpus from these; `cargo test` replays all of it."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
STOP, BOOL, I16, I32, I64, STRING, STRUCT, LIST = 0, 2, 6, 8, 10, 11, 12, 15


def s(b):
    b = b if isinstance(b, bytes) else b.encode()
    return struct.pack(">i", len(b)) + b


def field(t, fid, payload):
    return struct.pack(">bh", t, fid) + payload


def ctx(rid=1, reason="seed"):
    return field(STRUCT, 1, field(I64, 1, struct.pack(">q", rid)) + field(STRING, 2, s(reason))
                 + field(I64, 3, struct.pack(">q", 0)) + bytes([STOP]))


def call(name, seq, args):
    return struct.pack(">I", 0x80010001) + s(name) + struct.pack(">i", seq) + args + bytes([STOP])


def framed(m):
    return struct.pack(">i", len(m)) + m


calls = {
    "noop": call("noop", 1, field(I32, 1, struct.pack(">i", 7))),
    "ping": call("ping", 2, ctx()),
    "id_next": call("id_next", 3, ctx()),
    "id_tag": call("id_next_with_tag", 4, ctx() + field(I16, 2, struct.pack(">h", 5))),
    "id_decode": call("id_decode", 5, ctx() + field(I64, 2, struct.pack(">q", 1 << 40))),
    "lc_set": call("lc_set", 6, ctx() + field(STRING, 2, s("k")) + field(STRING, 3, s(b"\x00\xffv"))),
    "lc_get": call("lc_get", 7, ctx() + field(STRING, 2, s("k"))),
    "lc_del": call("lc_del", 8, ctx() + field(STRING, 2, s("k"))),
    "lock": call("lock", 9, ctx() + field(STRING, 2, s("r")) + field(STRING, 3, s("k"))),
    "unlock": call("unlock", 10, ctx() + field(STRING, 2, s("r")) + field(STRING, 3, s("k"))),
    "zk_create": call("zk_create", 11, ctx() + field(STRING, 2, s("/a/b")) + field(STRING, 3, s("d"))),
    "zk_children": call("zk_children", 12, ctx() + field(STRING, 2, s("/a"))),
    "zk_del": call("zk_del", 13, ctx() + field(STRING, 2, s("/a"))),
    "rd_call": call("rd_call", 14, ctx() + field(STRING, 2, s("GET")) + field(STRING, 3, s("p"))
                    + field(LIST, 4, bytes([STRING]) + struct.pack(">i", 2) + s("k") + s("v"))),
    "bad_ctx": call("ping", 15, ctx(rid=0)),
    "unknown": call("no_such_method", 16, b""),
}
bad = {
    "bad_version": struct.pack(">I", 0x80020001) + s("noop") + struct.pack(">i", 1) + bytes([STOP]),
    "huge_frame": struct.pack(">I", 0x7FFFFFFF),
    "string_past_end": framed(struct.pack(">I", 0x80010001) + s("lc_get") + struct.pack(">i", 1)
                              + struct.pack(">bh", STRING, 2) + struct.pack(">i", 1000) + b"abc"),
    "deep": call("noop", 1, struct.pack(">bh", STRUCT, 1) * 200),
    "huge_list": call("rd_call", 1, struct.pack(">bh", LIST, 4) + bytes([I64]) + struct.pack(">i", 1 << 30)),
    "compact": bytes([0x82, 0x21, 0x01, 0x04]) + b"noop",
}
seeds = dict(calls)
seeds["pipelined"] = b"".join(calls.values())
seeds["pipelined_framed"] = b"".join(framed(m) for m in calls.values())
for k, v in calls.items():
    seeds["framed_" + k] = framed(v)
seeds.update(bad)


# TCompactProtocol: the same calls in the compact encoding (zigzag varints, field-id deltas, bools in field
# headers).
def varint(n):
    out = b""
    while n >= 0x80:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])


def zz(n, bits=64):
    return (n << 1) ^ (n >> (bits - 1))


def cs(b):
    b = b if isinstance(b, bytes) else b.encode()
    return varint(len(b)) + b


C_TRUE, C_BYTE, C_I16, C_I32, C_I64, C_BIN, C_LIST, C_STRUCT = 1, 3, 4, 5, 6, 8, 9, 12


def cfield(ct, delta, payload):
    return bytes([(delta << 4) | ct]) + payload


def cctx(rid=1, reason="seed", sticky=False):
    inner = (cfield(C_I64, 1, varint(zz(rid))) + cfield(C_BIN, 1, cs(reason)) + cfield(C_I64, 1, varint(0))
             + (cfield(C_TRUE, 1, b"") if sticky else b"") + b"\x00")
    return cfield(C_STRUCT, 1, inner)


def ccall(name, seq, args, mtype=1):
    return bytes([0x82, (mtype << 5) | 1]) + varint(seq) + cs(name) + args + b"\x00"


compact_calls = {
    "noop": ccall("noop", 1, cfield(C_I32, 1, varint(zz(-7)))),
    "ping": ccall("ping", 2, cctx()),
    "id_tag": ccall("id_next_with_tag", 300, cctx() + cfield(C_I16, 1, varint(zz(5)))),
    "lc_set": ccall("lc_set", 4, cctx() + cfield(C_BIN, 1, cs("k")) + cfield(C_BIN, 1, cs(b"\x00\xffv"))),
    "lc_get": ccall("lc_get", 5, cctx(sticky=True) + cfield(C_BIN, 1, cs("k"))),
    "rd_call": ccall("rd_call", 6, cctx() + cfield(C_BIN, 1, cs("GET")) + cfield(C_BIN, 1, cs("p"))
                     + cfield(C_LIST, 1, bytes([(2 << 4) | C_BIN]) + cs("k") + cs("v"))),
    "long_list": ccall("rd_call", 7, cctx() + cfield(C_LIST, 4, bytes([0xF0 | C_BIN]) + varint(20)
                                                      + b"".join(cs("k%d" % i) for i in range(20)))),
    "big_field_id": ccall("lc_get", 8, bytes([C_BIN]) + varint(zz(300, 32)) + cs("x") + cctx()),
    "map": ccall("noop", 9, cfield(11, 5, varint(2) + bytes([(C_BIN << 4) | C_I32]) + cs("a") + varint(2)
                                   + cs("b") + varint(4)) + cfield(11, 1, varint(0))),
    "unknown": ccall("no_such_method", 10, b""),
}
compact_bad = {
    "varint_11": bytes([0x82, 0x21]) + b"\xff" * 11,
    "negative_len": ccall("lc_get", 1, b"")[:-1] + bytes([0x18]) + b"\xff\xff\xff\xff\x0f",
    "huge_name": bytes([0x82, 0x21, 0x01]) + varint(0x7FFFFFFF) + b"ping",
    "deep": ccall("ping", 1, bytes([0x1C]) * 300),
    "huge_list": ccall("ping", 1, bytes([0x19, 0xF6]) + varint(1 << 30)),
    "bad_type": ccall("ping", 1, bytes([0x1E])),
    "bad_version": bytes([0x82, 0x22, 0x01, 0x04]) + b"noop\x00",
    # found by the fuzzer: lists nested to the depth limit ending at the last byte (the resumable walk
    # checked the depth after reading a container's header, the one-pass walk before)
    "depth_at_last_byte": bytes([0x82, 0x21, 0x2E, 0x18, 0x04]) + b"svs" + b"\xd9" * 84,
}
compact_seeds = dict(compact_calls)
compact_seeds["pipelined"] = b"".join(compact_calls.values())
compact_seeds.update(compact_bad)


def header(kind, seq, proto, msg, info=(), transforms=b""):
    """A THeader (0x0FFF: varints) or TTHeader (0x1000: u8 ids, u16 counts and lengths) frame."""
    if kind == "theader":
        h = varint(proto) + varint(len(transforms)) + b"".join(varint(t) for t in transforms)
        if info:
            h += varint(1) + varint(len(info)) + b"".join(cs(k) + cs(v) for k, v in info)
    else:
        h = bytes([proto, len(transforms)]) + bytes(transforms)
        if info:
            h += bytes([1]) + struct.pack(">H", len(info)) + b"".join(
                struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v for k, v in info)
    h += b"\x00" * ((4 - len(h) % 4) % 4)
    magic = 0x0FFF if kind == "theader" else 0x1000
    rest = struct.pack(">HHIH", magic, 0, seq, len(h) // 4) + h + msg
    return struct.pack(">I", len(rest)) + rest


header_seeds = {}
for kind in ("theader", "ttheader"):
    for proto, msgs in ((0, calls), (2, compact_calls)):
        for name, m in msgs.items():
            header_seeds["%s_%d_%s" % (kind, proto, name)] = header(kind, 7, proto, m, [(b"caller", b"seed")])
    header_seeds[kind + "_zlib"] = header(kind, 1, 0, calls["noop"], transforms=b"\x01")
    header_seeds[kind + "_json"] = header(kind, 1, 1, calls["noop"])
    header_seeds[kind + "_bad_size"] = header(kind, 1, 0, calls["noop"])[:12] + b"\x40\x00" + b"\x00" * 8
    header_seeds[kind + "_pipelined"] = b"".join(header(kind, i, 0, m) for i, m in enumerate(calls.values()))
header_seeds["ttheader_framed_payload"] = header("ttheader", 3, 0, framed(calls["ping"]))
# compact_decode: first byte = where the resumable walk is split; the target puts the 0x82 back itself.
seeds_by_target = {"compact_decode": {k: b"\x05" + v[1:] for k, v in compact_seeds.items()},
                   "header_decode": header_seeds}
for target, ss in seeds_by_target.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in ss.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"wrote {len(ss)} {target} seeds")
# The compact and header seeds feed the general decoder and the session too.
seeds.update({"compact_" + k: v for k, v in compact_seeds.items()})
seeds.update({"header_" + k: v for k, v in header_seeds.items() if k.endswith(("noop", "ping", "zlib", "lc_set"))})

for target, prefix in (("wire_decode", b""), ("session", b"\x07")):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(prefix + data)
print(f"wrote {len(seeds)} seeds per target")

# wire_decode, first byte 0xff (the message whole, not split): a call whose argument nests 64 structs, one
# past the fuzz limit of 64 levels counting the argument struct. The argument reader once counted one level
# fewer than the message walks and accepted it.
# (compact, so that the message is shorter than the 255 bytes a whole-message first byte can say)
deep64 = ccall("noop", 1, bytes([0x1C]) * 64 + bytes([0]) * 64)
with open(os.path.join(HERE, "corpus", "wire_decode", "seed-deep_64_whole"), "wb") as f:
    f.write(b"\xff" + deep64)

# Store replies for backend_replies: first byte = what the parser expects (0 get, 1 store, 2 delete, 3 incr,
# 4 version, 5 Redis), second = where the bytes are split between two reads.
replies = {
    "mc_value": (0, b"VALUE k 42 5\r\nhello\r\nEND\r\nEND\r\n"),
    "mc_value_crlf_in_data": (0, b"VALUE k 0 7\r\n\r\nEND\r\n\r\nEND\r\n"),
    "mc_value_bad_trailer": (0, b"VALUE k 0 1\r\nxYEND\r\n"),
    "mc_value_huge": (0, b"VALUE k 0 999999999\r\n"),
    "mc_miss": (0, b"END\r\n"),
    "mc_stored": (1, b"STORED\r\nNOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\n"),
    "mc_errors": (1, b"ERROR\r\nCLIENT_ERROR bad data chunk\r\nSERVER_ERROR object too large for cache\r\n"),
    "mc_deleted": (2, b"DELETED\r\nNOT_FOUND\r\n"),
    "mc_number": (3, b"0\r\n18446744073709551615\r\n18446744073709551616\r\n"),
    "mc_version": (4, b"VERSION 1.6.18\r\n"),
    "mc_long_line": (1, b"X" * 5000),
    "rd_status": (5, b"+OK\r\n-ERR wrong number of arguments\r\n:-42\r\n"),
    "rd_bulk": (5, b"$5\r\nhello\r\n$0\r\n\r\n$-1\r\n"),
    "rd_array": (5, b"*3\r\n$1\r\na\r\n*-1\r\n*2\r\n:1\r\n*1\r\n+x\r\n"),
    "rd_deep": (5, b"*1\r\n" * 20 + b":1\r\n"),
    "rd_bad_len": (5, b"$-7\r\n$abc\r\n"),
    "rd_bulk_no_crlf": (5, b"$3\r\nabcXY"),
    "rd_huge_array": (5, b"*99999999\r\n"),
    "rd_unknown_type": (5, b"%2\r\n"),
}
d = os.path.join(HERE, "corpus", "backend_replies")
os.makedirs(d, exist_ok=True)
for name, (kind, data) in replies.items():
    for cut in (0, 3, 11):
        with open(os.path.join(d, "seed-%s-%d" % (name, cut)), "wb") as f:
            f.write(bytes([kind, cut]) + data)
print(f"wrote {len(replies) * 3} backend_replies seeds")

# Admin HTTP requests for admin_http: first byte = body limit / 64.
reqs = {
    "get_metrics": b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9091\r\n\r\n",
    "get_history": b"GET /api/history?since=12&x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    "post_limits": b"POST /api/limits HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Length: 34\r\n\r\n{\"client_calls_per_sec\": 100, \"\": 1}",
    "post_degrade": b"POST /api/degrade HTTP/1.1\r\nContent-Length: 40\r\nOrigin: http://a\r\nHost: a\r\n\r\n{\"methods\": [\"mc_get\", 1], \"servant\": 3}",
    "post_bad_json": b"POST /api/limits HTTP/1.1\r\nContent-Length: 5\r\n\r\n{[}]x",
    "limits_unknown": b"POST /api/limits HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"nope\": 1.5}",
    "limits_wrong_type": b"POST /api/limits HTTP/1.1\r\nContent-Length: 43\r\n\r\n{\"method_inflight\": {\"a\": -1}, \"adaptive\": 1}",
    "chunked": b"POST /api/drain HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "huge_length": b"POST /api/reload HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "negative_length": b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "short_body": b"POST /api/limits HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
    "no_version": b"GET /\r\n\r\n",
    "bad_method": b"G\x00T / HTTP/1.1\r\n\r\n",
    "many_headers": b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 70 + b"\r\n",
    "long_head": b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "utf8_header": b"GET / HTTP/1.1\r\nHost: \xc3\xa9\xff\r\n\r\n",
    "pipelined": b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
}
d = os.path.join(HERE, "corpus", "admin_http")
os.makedirs(d, exist_ok=True)
for name, data in reqs.items():
    for limit in (0, 1, 255):
        with open(os.path.join(d, "seed-%s-%d" % (name, limit)), "wb") as f:
            f.write(bytes([limit]) + data)
print(f"wrote {len(reqs) * 3} admin_http seeds")


# The XDP path's admission: IPv4 packets as the device hands them over (Ethernet header off).
def ipv4_tcp(src, dst, sport, dport, flags, ihl=5, payload=b"", proto=6):
    opts = b"\x00" * (ihl * 4 - 20) if ihl >= 5 else b""
    tcp = struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x40 | (ihl & 0x0f), 0, 20 + len(opts) + len(tcp), 0, 0, 64, proto, 0,
                     bytes(src), bytes(dst)) + opts
    return ip + tcp


cli, srv = (192, 0, 2, 2), (192, 0, 2, 1)
packets = {
    "syn": ipv4_tcp(cli, srv, 40000, 9002, 0x02),
    "syn_ack": ipv4_tcp(cli, srv, 40000, 9002, 0x12),
    "ack": ipv4_tcp(cli, srv, 40000, 9002, 0x10),
    "data": ipv4_tcp(cli, srv, 40000, 9002, 0x18, payload=b"\x80\x01\x00\x01"),
    "fin": ipv4_tcp(cli, srv, 40000, 9002, 0x11),
    "rst": ipv4_tcp(cli, srv, 40000, 9002, 0x04),
    "syn_rst": ipv4_tcp(cli, srv, 40000, 9002, 0x06),
    "other_port": ipv4_tcp(cli, srv, 40000, 22, 0x02),
    "udp": ipv4_tcp(cli, srv, 40000, 9002, 0x02, proto=17),
    "ihl_options": ipv4_tcp(cli, srv, 40000, 9002, 0x02, ihl=15),
    "ihl_too_small": ipv4_tcp(cli, srv, 40000, 9002, 0x02, ihl=2),
    "ihl_past_end": ipv4_tcp(cli, srv, 40000, 9002, 0x02, ihl=15)[:40],
    "truncated_tcp": ipv4_tcp(cli, srv, 40000, 9002, 0x02)[:30],
    "header_only": ipv4_tcp(cli, srv, 40000, 9002, 0x02)[:20],
    "empty": b"",
    # The stack's reading of a segment's numbers: an IPv4 total length past the packet's end, a TCP data
    # offset past it.
    "total_len_past_end": ipv4_tcp(cli, srv, 40000, 9002, 0x18, payload=b"abcd")[:2] + b"\xff\xff"
    + ipv4_tcp(cli, srv, 40000, 9002, 0x18, payload=b"abcd")[4:],
    "data_offset_past_end": ipv4_tcp(cli, srv, 40000, 9002, 0x10)[:32] + b"\xf0"
    + ipv4_tcp(cli, srv, 40000, 9002, 0x10)[33:],
}
d = os.path.join(HERE, "corpus", "xdp_admission")
os.makedirs(d, exist_ok=True)
for name, data in packets.items():
    with open(os.path.join(d, "seed-%s" % name), "wb") as f:
        f.write(data)
print(f"wrote {len(packets)} xdp_admission seeds")
