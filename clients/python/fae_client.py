"""fae_client: a thin Python helper over the Thrift-generated FunServant client.

The generated code is not shipped: produce it with

    thrift --gen py -out GENDIR idl/fae.thrift

and put GENDIR on ``sys.path`` before importing this module (it imports ``fun.rpc.FunServant``).

What the helper adds to the generated ``FunServant.Client``, and nothing more:

* a pool of servers given as ``"host:port"`` strings; a connection goes to one picked at random;
* a connect timeout and a read/write timeout (milliseconds);
* one retry when *connecting* fails: the next host of the pool is tried once (with a single host, that
  host once more).
  A call that fails after the connection is up is never retried (calls are not all idempotent); the
  connection is closed so that the next call reconnects, and the error is raised to the caller;
* a fresh ``Context`` for every request: ``rid`` from a per-process random base plus a counter (never 0),
  ``reason`` and ``uid`` given by the application;
* TBufferedTransport by default, TFramedTransport with ``framed=True``; TBinaryProtocol (strict).

Example::

    sys.path.insert(0, GENDIR)
    from fae_client import FaeClient
    with FaeClient(["10.0.0.1:9001", "10.0.0.2:9001"], reason="user.login", uid=42) as fae:
        fae.ping()
        fae.lc_set("k", b"v")

Server-side errors come through unchanged: ``fun.rpc.ttypes.TCacheMissed`` for a cache miss,
``thrift.Thrift.TApplicationException`` for an application error (the connection stays usable),
``thrift.transport.TTransport.TTransportException`` for a network failure.
"""

import os
import random
import threading

from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

from fun.rpc import FunServant
from fun.rpc.ttypes import Context

__all__ = ["FaeClient", "next_rid", "parse_hosts"]


class _RidGenerator(object):
    """Request ids: a random 31-bit base drawn once per process (again after a fork) in the high half,
    a counter in the low half. Never 0, always positive as an i64."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = None
        self._base = 0
        self._counter = 0

    def next(self):
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._base = random.SystemRandom().randint(1, (1 << 31) - 1) << 32
                self._counter = 0
            self._counter = (self._counter + 1) & 0xFFFFFFFF
            return self._base | self._counter


_rids = _RidGenerator()


def next_rid():
    """The next request id of this process (positive, never 0)."""
    return _rids.next()


def parse_hosts(hosts):
    """``"h1:p1,h2:p2"`` or ``["h1:p1", "h2:p2"]`` -> ``[("h1", p1), ("h2", p2)]``."""
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    out = []
    for h in hosts:
        host, sep, port = h.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("bad server address %r, want host:port" % (h,))
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("empty server list")
    return out


class FaeClient(object):
    """A connection to one fae server of a pool, with the FunServant methods and the Context filled in.

    Not thread-safe: use one FaeClient per thread.
    """

    def __init__(self, hosts, reason, uid=0, connect_timeout_ms=1000, timeout_ms=5000, framed=False):
        if not reason:
            raise ValueError("reason must not be empty")
        self.hosts = parse_hosts(hosts)
        self.reason = reason
        self.uid = uid
        self.connect_timeout_ms = connect_timeout_ms
        self.timeout_ms = timeout_ms
        self.framed = framed
        self.addr = None          # (host, port) of the open connection
        self._transport = None
        self._client = None

    # ---- connection -------------------------------------------------------------------------------

    def _connect(self, host, port):
        sock = TSocket.TSocket(host, port)
        sock.setTimeout(self.connect_timeout_ms)
        sock.open()
        sock.setTimeout(self.timeout_ms)
        if self.framed:
            transport = TTransport.TFramedTransport(sock)
        else:
            transport = TTransport.TBufferedTransport(sock)
        return transport

    def open(self):
        """Connect if not connected: a random host of the pool, then (once) the next one."""
        if self._client is not None:
            return
        start = random.randrange(len(self.hosts))
        last = None
        for i in range(2):  # one host, then the next one (the same one again in a pool of one)
            host, port = self.hosts[(start + i) % len(self.hosts)]
            try:
                transport = self._connect(host, port)
            except TTransport.TTransportException as e:
                last = e
                continue
            self._transport = transport
            self._client = FunServant.Client(TBinaryProtocol.TBinaryProtocol(transport))
            self.addr = (host, port)
            return
        raise last

    def close(self):
        if self._transport is not None:
            try:
                self._transport.close()
            finally:
                self._transport = None
                self._client = None
                self.addr = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- request plumbing --------------------------------------------------------------------------

    def context(self, reason=None):
        """A new Context for one request (a new rid each time)."""
        return Context(rid=next_rid(), reason=reason or self.reason, uid=self.uid)

    def _call(self, method, *args):
        self.open()
        try:
            return getattr(self._client, method)(*args)
        except (TTransport.TTransportException, EOFError, OSError):
            # The stream is in an unknown state: drop it, the next call reconnects.
            self.close()
            raise

    # ---- FunServant, one method per IDL method; ctx is filled in ------------------------------------

    def noop(self, x):
        return self._call("noop", x)

    def ping(self):
        return self._call("ping", self.context())

    def id_next(self):
        return self._call("id_next", self.context())

    def id_next_with_tag(self, tag):
        return self._call("id_next_with_tag", self.context(), tag)

    def id_decode(self, id_):
        """-> [ts_ms, tag, worker_id, seq]"""
        return self._call("id_decode", self.context(), id_)

    def lc_set(self, key, value):
        return self._call("lc_set", self.context(), key, value)

    def lc_get(self, key):
        """-> bytes; raises TCacheMissed when absent."""
        return self._call("lc_get", self.context(), key)

    def lc_del(self, key):
        return self._call("lc_del", self.context(), key)

    def lock(self, reason, key):
        return self._call("lock", self.context(), reason, key)

    def unlock(self, reason, key):
        return self._call("unlock", self.context(), reason, key)

    def mc_set(self, pool, key, value, expiration):
        return self._call("mc_set", self.context(), pool, key, value, expiration)

    def mc_get(self, pool, key):
        return self._call("mc_get", self.context(), pool, key)

    def mc_add(self, pool, key, value, expiration):
        return self._call("mc_add", self.context(), pool, key, value, expiration)

    def mc_delete(self, pool, key):
        return self._call("mc_delete", self.context(), pool, key)

    def mc_increment(self, pool, key, delta):
        return self._call("mc_increment", self.context(), pool, key, delta)

    def rd_call(self, cmd, pool, keys_and_args):
        return self._call("rd_call", self.context(), cmd, pool, keys_and_args)

    def my_query(self, pool, table, hint_id, sql, args, cache_key=""):
        return self._call("my_query", self.context(), pool, table, hint_id, sql, args, cache_key)

    def my_bulk_exec(self, pool, table, hint_id, sql, args, cache_key):
        return self._call("my_bulk_exec", self.context(), pool, table, hint_id, sql, args, cache_key)

    def my_query_shards(self, pool, table, sql, args):
        return self._call("my_query_shards", self.context(), pool, table, sql, args)

    def my_merge(self, pool, table, hint_id, where, key, column, json_value):
        return self._call("my_merge", self.context(), pool, table, hint_id, where, key, column, json_value)

    def my_evict(self, cache_key):
        return self._call("my_evict", self.context(), cache_key)

    def zk_create(self, path, data):
        return self._call("zk_create", self.context(), path, data)

    def zk_children(self, path):
        return self._call("zk_children", self.context(), path)

    def zk_del(self, path):
        return self._call("zk_del", self.context(), path)
