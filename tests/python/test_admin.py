"""The admin HTTP port: /metrics (Prometheus text) and /api/stats (JSON) count the calls we make.

Names relied on (keep them aligned with the server):
  fae_calls_total{method="<m>"}  fae_call_errors_total{method="<m>"}
  /api/stats -> {"methods": {"<m>": {"calls": N, "errors": N, ...}, ...}, "sessions": N, ...}
"""

import json
import re
import time
import urllib.error
import urllib.request

import pytest

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)(?:\s+\d+)?$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def http_get(url, deadline_s=5.0):
    """GET with retries until the admin port answers (it may start a little after the RPC port)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200, (url, r.status)
                return r.headers.get("Content-Type", ""), r.read().decode("utf-8")
        except (urllib.error.URLError, ConnectionError) as e:
            if isinstance(e, urllib.error.HTTPError) or time.monotonic() > end:
                raise
            time.sleep(0.1)


def parse_prometheus(text):
    """-> {(metric name, frozenset of labels): value}"""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, "unparseable metrics line: %r" % line
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        out[(name, frozenset(LABEL_RE.findall(labels)))] = float(value)
    return out


def method_value(samples, metric, method):
    """Sum over every series of `metric` whose method label is `method` (0 if absent)."""
    total = 0.0
    for (name, labels), v in samples.items():
        if name == metric and ("method", method) in labels:
            total += v
    return total


def scrape(faed):
    ctype, text = http_get(faed.admin_url + "/metrics")
    assert ctype.startswith("text/plain"), ctype
    return parse_prometheus(text)


def stats(faed):
    ctype, text = http_get(faed.admin_url + "/api/stats")
    assert "json" in ctype, ctype
    return json.loads(text)


def stat(st, method, field):
    return st.get("methods", {}).get(method, {}).get(field, 0)


def test_metrics_and_stats_count_calls(connect, rpc, faed, uniq):
    m0 = scrape(faed)
    s0 = stats(faed)

    c = connect().client
    for _ in range(3):
        c.ping(rpc.ctx())
    for i in range(4):
        c.noop(i)
    c.lc_set(rpc.ctx(), uniq, b"v")
    c.lc_get(rpc.ctx(), uniq)
    c.id_next(rpc.ctx())
    with pytest.raises(rpc.TApplicationException):
        c.ping(rpc.ctx(rid=0))
    with pytest.raises(rpc.TApplicationException):
        c.id_next_with_tag(rpc.ctx(), 32)

    m1 = scrape(faed)
    s1 = stats(faed)

    expect_calls = {"ping": 3, "noop": 4, "lc_set": 1, "lc_get": 1, "id_next": 1, "id_next_with_tag": 1}
    expect_errors = {"ping": 1, "id_next_with_tag": 1}

    for method, n in expect_calls.items():
        d = method_value(m1, "fae_calls_total", method) - method_value(m0, "fae_calls_total", method)
        assert d >= n, "fae_calls_total{method=%r} grew by %s, want >= %d" % (method, d, n)
        d = stat(s1, method, "calls") - stat(s0, method, "calls")
        assert d >= n, "/api/stats methods.%s.calls grew by %s, want >= %d" % (method, d, n)
    for method, n in expect_errors.items():
        d = (method_value(m1, "fae_call_errors_total", method)
             - method_value(m0, "fae_call_errors_total", method))
        assert d >= n, "fae_call_errors_total{method=%r} grew by %s, want >= %d" % (method, d, n)
        d = stat(s1, method, "errors") - stat(s0, method, "errors")
        assert d >= n, "/api/stats methods.%s.errors grew by %s, want >= %d" % (method, d, n)

    # counters never go down
    for key, v in m0.items():
        if key[0] in ("fae_calls_total", "fae_call_errors_total") and key in m1:
            assert m1[key] >= v, key

    # the stats document: sessions is a number, and our open session counts
    assert isinstance(s1.get("sessions"), (int, float)), s1.get("sessions")
    assert s1["sessions"] >= 1
    for method in expect_calls:
        entry = s1["methods"][method]
        assert isinstance(entry["calls"], int) and isinstance(entry["errors"], int), entry
        assert entry["errors"] <= entry["calls"], (method, entry)
