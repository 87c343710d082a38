"""Load for the XDP lab's scale tests, checking every answer: FunServant `noop(x)` over TBinaryProtocol
(strict, buffered), whose reply must carry the call's seqid and return x.

  thrift_load.py churn HOST PORT CLIENTS CALLS SECONDS   clients that connect, make CALLS calls and close,
                                                        in a loop, for SECONDS
  thrift_load.py many HOST PORT N                      N connections open at once, each making one call
                                                        while all are open
  thrift_load.py onecall HOST PORT                     one connection; prints "connected", makes one call
                                                        when a line comes on stdin, waits for its answer

Prints one JSON object: calls, conns, failures and the first few failures described. Runs with
/usr/bin/python3 (standard library only); every wait is bounded.
"""
import asyncio
import json
import resource
import struct
import sys
import time

TIMEOUT = 20.0


def call(seq, x):
    name = b"noop"
    return (struct.pack(">Ii", 0x80010001, len(name)) + name + struct.pack(">i", seq)
            + struct.pack(">bhi", 8, 1, x) + b"\x00")


def reply_to(sock, x, timeout=5):
    """A blocking socket's next reply to noop(x) (checked): REPLY "noop", seqid, field 0 = x, stop; exits
    if the connection closes first, raises socket.timeout if nothing comes within TIMEOUT seconds."""
    sock.settimeout(timeout)
    got = b""
    while len(got) < 24:
        chunk = sock.recv(24 - len(got))
        if not chunk:
            sys.exit("connection closed after %r" % got)
        got += chunk
    assert got[-5:-1] == x.to_bytes(4, "big"), got


async def answer(reader, seq, x):
    """Reads one reply and checks it: REPLY, same name and seqid, field 0 = x."""
    head = await reader.readexactly(8)
    version, n = struct.unpack(">Ii", head)
    if version != 0x80010002:
        raise ValueError("message type/version %#x, not a REPLY" % version)
    if not 0 <= n <= 64:
        raise ValueError("method name of %d bytes" % n)
    rest = await reader.readexactly(n + 4)
    if rest[:n] != b"noop" or struct.unpack(">i", rest[n:])[0] != seq:
        raise ValueError("reply %r seqid %d for seqid %d" % (rest[:n], struct.unpack(">i", rest[n:])[0], seq))
    body = await reader.readexactly(3 + 4 + 1)
    ftype, fid, value, stop = struct.unpack(">bhib", body)
    if (ftype, fid, stop) != (8, 0, 0) or value != x:
        raise ValueError("noop(%d) answered field %d type %d value %d" % (x, fid, ftype, value))


class Tally(object):
    def __init__(self):
        self.calls = self.conns = self.failures = 0
        self.first = []

    def fail(self, what):
        self.failures += 1
        if len(self.first) < 10:
            self.first.append(what)


async def churn(host, port, clients, calls, seconds):
    t = Tally()
    end = time.monotonic() + seconds

    async def client(i):
        n = 0
        while time.monotonic() < end:
            n += 1
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
                for k in range(calls):
                    x = (i * 1000003 + n * 7 + k) & 0x7fffffff
                    writer.write(call(k + 1, x))
                    await asyncio.wait_for(answer(reader, k + 1, x), TIMEOUT)
                    t.calls += 1
                t.conns += 1
            except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                t.fail("client %d connection %d: %r" % (i, n, e))
            finally:
                if writer is not None:
                    writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return t


async def many(host, port, n):
    t = Tally()
    opened = []

    async def open_one(i):
        try:
            opened.append((i,) + await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT))
        except (OSError, asyncio.TimeoutError) as e:
            t.fail("connect %d: %r" % (i, e))

    await asyncio.gather(*(open_one(i) for i in range(n)))
    t.conns = len(opened)

    async def one(i, reader, writer):
        try:
            writer.write(call(1, i))
            await asyncio.wait_for(answer(reader, 1, i), TIMEOUT)
            t.calls += 1
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            t.fail("connection %d: %r" % (i, e))

    # Every connection is open before any calls, and stays open until every call is answered.
    await asyncio.gather(*(one(i, r, w) for i, r, w in opened))
    for _, _, w in opened:
        w.close()
    return t


async def onecall(host, port):
    t = Tally()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    t.conns = 1
    print("connected", flush=True)
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), TIMEOUT)
    try:
        writer.write(call(1, 4242))
        await asyncio.wait_for(answer(reader, 1, 4242), TIMEOUT)
        t.calls = 1
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        t.fail("the call: %r" % (e,))
    writer.close()
    return t


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t0 = time.monotonic()
    if mode == "churn":
        t = asyncio.run(churn(host, port, int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])))
    elif mode == "many":
        t = asyncio.run(many(host, port, int(sys.argv[4])))
    elif mode == "onecall":
        t = asyncio.run(onecall(host, port))
    else:
        sys.exit("usage: thrift_load.py churn|many|onecall ...")
    print(json.dumps({"calls": t.calls, "conns": t.conns, "failures": t.failures, "first_failures": t.first,
                      "seconds": time.monotonic() - t0}))


if __name__ == "__main__":
    main()
