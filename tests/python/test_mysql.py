"""my_* through the generated client against a real MariaDB (the suite's faed and MariaDB, see conftest.py and
tests/mysql/: a global pool "global", a lookup pool "lookup" and the sharded pool "user" with four shards,
user1..user4), over TBufferedTransport and TFramedTransport. Every method and every error path; what fae did is
checked in the database itself with pymysql, and the session survives each application error."""

import json
import random
import threading

import pymysql  # Debian's python3-pymysql (scripts/setup installs it)
import pytest
from thrift.Thrift import TApplicationException


@pytest.fixture(scope="module")
def db(stores):
    host, port = stores.mysql.rsplit(":", 1)

    def connect(database):
        return pymysql.connect(host=host, port=int(port), user="app", password="pw", database=database,
                               autocommit=True)
    return connect


def sql(db, database, statement, args=()):
    with db(database) as c, c.cursor() as cur:
        cur.execute(statement, args)
        return cur.fetchall()


def entity(db, shard, lock=0, table="ShardLookup"):
    """A fresh entity id placed on `shard` by the lookup table."""
    eid = random.randint(10**9, 2**62)
    sql(db, "fae_lookup", "INSERT INTO %s (entityId, shardId, shardLock) VALUES (%%s, %%s, %%s)" % table,
        (eid, shard, lock))
    return eid


def app_error(f, *args):
    with pytest.raises(TApplicationException) as ei:
        f(*args)
    assert ei.value.type == TApplicationException.INTERNAL_ERROR, (ei.value.type, ei.value.message)
    return ei.value.message


# ---- my_query -------------------------------------------------------------------------------------------

def test_my_query_exec_then_read_on_a_global_pool(client, rpc, db, uniq):
    r = client.my_query(rpc.ctx(), "global", "kv", 0, "INSERT INTO kv (k, v, n) VALUES (?, ?, ?)",
                        [uniq, "hello", "7"], "")
    assert (r.rowsAffected, r.cols, r.rows) == (1, [], [])
    r = client.my_query(rpc.ctx(), "global", "kv", 0, "SELECT k, v, n, d FROM kv WHERE k = ?", [uniq], "")
    assert r.cols == ["k", "v", "n", "d"]
    assert r.rows == [[uniq, "hello", "7", "NULL"]], "SQL NULL reads as \"NULL\""
    assert sql(db, "fae_global", "SELECT v FROM kv WHERE k = %s", (uniq,)) == (("hello",),)


def test_my_query_last_insert_id(client, rpc, db, uniq):
    r = client.my_query(rpc.ctx(), "global", "seq", 0, "INSERT INTO seq (v) VALUES (?)", [uniq], "")
    assert r.rowsAffected == 1 and r.lastInsertId > 0
    assert sql(db, "fae_global", "SELECT v FROM seq WHERE id = %s", (r.lastInsertId,)) == ((uniq,),)


@pytest.mark.parametrize("statement", [
    "SELECT 1 AS one", "  select 1 as one", "/* a comment */ SELECT 1 AS one", "-- line\nSELECT 1 AS one",
    "# hash\nSELECT 1 AS one", "WITH x AS (SELECT 1 AS one) SELECT one FROM x", "(SELECT 1 AS one)",
])
def test_reads_are_recognised_after_whitespace_and_comments(client, rpc, statement):
    r = client.my_query(rpc.ctx(), "global", "kv", 0, statement, [], "")
    assert (r.cols, r.rows) == (["one"], [["1"]])


def test_show_describe_explain_return_rows(client, rpc):
    for statement in ["SHOW TABLES", "DESCRIBE kv", "desc kv", "EXPLAIN SELECT * FROM kv"]:
        r = client.my_query(rpc.ctx(), "global", "kv", 0, statement, [], "")
        assert r.cols and r.rows, statement


def test_sharded_pool_goes_to_the_lookup_tables_shard(client, rpc, db):
    for shard in (1, 2, 3, 4):
        eid = entity(db, shard)
        name = "n%d" % eid
        r = client.my_query(rpc.ctx(), "user", "users", eid, "INSERT INTO users (uid, name) VALUES (?, ?)",
                            [str(eid), name], "")
        assert r.rowsAffected == 1
        for s in (1, 2, 3, 4):
            got = sql(db, "fae_user%d" % s, "SELECT name FROM users WHERE uid = %s", (eid,))
            assert got == (((name,),) if s == shard else ()), (shard, s, got)
        r = client.my_query(rpc.ctx(), "user", "users", eid, "SELECT name FROM users WHERE uid = ?", [str(eid)], "")
        assert r.rows == [[name]]


def test_lookup_errors(client, rpc, db):
    locked = entity(db, 1, lock=1)
    msg = app_error(client.my_query, rpc.ctx(), "user", "users", locked, "SELECT 1", [], "")
    assert "being locked" in msg, msg
    msg = app_error(client.my_query, rpc.ctx(), "user", "users", 424242424242, "SELECT 1", [], "")
    assert "no row in lookup table ShardLookup" in msg, msg
    nowhere = entity(db, 9)
    msg = app_error(client.my_query, rpc.ctx(), "user", "users", nowhere, "SELECT 1", [], "")
    assert "shard 9" in msg and "user9" in msg, msg
    msg = app_error(client.my_query, rpc.ctx(), "nosuch", "t", 1, "SELECT 1", [], "")
    assert 'unknown mysql pool "nosuch"' in msg and "global" in msg and "user" in msg, msg
    assert client.noop(3) == 3


def test_unlocking_an_entity_takes_effect_and_lookup_cache_drops_on_a_lookup_exec(client, rpc, db):
    eid = entity(db, 1, lock=1)
    app_error(client.my_query, rpc.ctx(), "user", "users", eid, "SELECT 1", [], "")
    sql(db, "fae_lookup", "UPDATE ShardLookup SET shardLock = 0 WHERE entityId = %s", (eid,))
    # A refused (locked) lookup is not cached: the unlock is seen at once.
    assert client.my_query(rpc.ctx(), "user", "users", eid, "SELECT DATABASE() AS db", [], "").rows == \
        [["fae_user1"]]
    # The shard is now cached: a change made behind fae's back is not seen...
    sql(db, "fae_lookup", "UPDATE ShardLookup SET shardId = 2 WHERE entityId = %s", (eid,))
    assert client.my_query(rpc.ctx(), "user", "users", eid, "SELECT DATABASE() AS db", [], "").rows == \
        [["fae_user1"]]
    # ...until an exec goes to the lookup pool through fae, which drops the cached shards.
    r = client.my_query(rpc.ctx(), "lookup", "ShardLookup", 0,
                        "UPDATE ShardLookup SET shardId = ? WHERE entityId = ?", ["3", str(eid)], "")
    assert r.rowsAffected == 1
    assert client.my_query(rpc.ctx(), "user", "users", eid, "SELECT DATABASE() AS db", [], "").rows == \
        [["fae_user3"]]


INJECTIONS = ["1 OR 1=1", "'; DROP TABLE kv; --", "a'b\"c", "back\\slash", "\\'; DELETE FROM kv; #", "%s", "?"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_arguments_are_bound_never_spliced(client, rpc, db, uniq, value):
    key = "%s-%d" % (uniq, INJECTIONS.index(value))
    before = sql(db, "fae_global", "SELECT COUNT(*) FROM kv")[0][0]
    client.my_query(rpc.ctx(), "global", "kv", 0, "INSERT INTO kv (k, v) VALUES (?, ?)", [key, value], "")
    assert sql(db, "fae_global", "SELECT v FROM kv WHERE k = %s", (key,)) == ((value,),)
    # Matched literally: the value selects exactly its own row, nothing else.
    r = client.my_query(rpc.ctx(), "global", "kv", 0, "SELECT k FROM kv WHERE v = ?", [value], "")
    assert [key] in r.rows and all(row[0] != "" for row in r.rows)
    r = client.my_query(rpc.ctx(), "global", "kv", 0, "SELECT k FROM kv WHERE k = ?", [value], "")
    assert r.rows == []
    # The table is intact.
    assert sql(db, "fae_global", "SELECT COUNT(*) FROM kv")[0][0] == before + 1


def test_mysql_errors_are_application_errors_and_do_not_trip_the_breaker(client, rpc, faed, uniq):
    key = uniq + "-dup"
    client.my_query(rpc.ctx(), "global", "kv", 0, "INSERT INTO kv (k) VALUES (?)", [key], "")
    for statement, args, code in [
        ("INSERT INTO kv (k) VALUES (?)", [key], "1062"),
        ("SELECT nope FROM kv", [], "1054"),
        ("SELEKT 1", [], "1064"),
        ("SELECT * FROM no_such_table", [], "1146"),
    ] * 3:
        msg = app_error(client.my_query, rpc.ctx(), "global", "kv", 0, statement, args, "")
        assert "MySQL error %s" % code in msg, msg
        assert client.noop(1) == 1
    stats = json.loads(__import__("urllib.request").request.urlopen(faed.admin_url + "/api/stats").read())
    g = [b for b in stats["backends"] if b["protocol"] == "mysql" and b["server"].startswith("global ")][0]
    assert g["breaker"] == "closed" and g["app_errors"] >= 12, g


# ---- result cache ---------------------------------------------------------------------------------------

def test_cached_read_until_an_exec_or_my_evict_with_its_key(client, rpc, db, uniq):
    key, ck = uniq + "-c", "cache:" + uniq
    client.my_query(rpc.ctx(), "global", "kv", 0, "INSERT INTO kv (k, v) VALUES (?, ?)", [key, "one"], "")
    read = lambda: client.my_query(rpc.ctx(), "global", "kv", 0, "SELECT v FROM kv WHERE k = ?", [key], ck).rows
    assert read() == [["one"]]
    sql(db, "fae_global", "UPDATE kv SET v = 'behind' WHERE k = %s", (key,))
    assert read() == [["one"]], "a cached read is answered from the cache"
    client.my_query(rpc.ctx(), "global", "kv", 0, "UPDATE kv SET v = ? WHERE k = ?", ["two", key], ck)
    assert read() == [["two"]], "an exec with the cacheKey evicts it"
    sql(db, "fae_global", "UPDATE kv SET v = 'three' WHERE k = %s", (key,))
    assert read() == [["two"]]
    client.my_evict(rpc.ctx(), ck)
    assert read() == [["three"]], "my_evict evicts"


# ---- my_bulk_exec ---------------------------------------------------------------------------------------

def test_my_bulk_exec_runs_in_order_across_pools(client, rpc, db, uniq):
    eid = entity(db, 2)
    n = client.my_bulk_exec(
        rpc.ctx(), ["global", "global", "user"], ["kv", "kv", "users"], [0, 0, eid],
        ["INSERT INTO kv (k, v) VALUES (?, ?)", "UPDATE kv SET v = ? WHERE k = ?",
         "INSERT INTO users (uid, name) VALUES (?, ?)"],
        [[uniq, "a"], ["b", uniq], [str(eid), "bulk%d" % eid]], ["", "", ""])
    assert n == 3
    assert sql(db, "fae_global", "SELECT v FROM kv WHERE k = %s", (uniq,)) == (("b",),)
    assert sql(db, "fae_user2", "SELECT name FROM users WHERE uid = %s", (eid,)) == (("bulk%d" % eid,),)


def test_my_bulk_exec_stops_at_the_first_error_and_says_which(client, rpc, db, uniq):
    msg = app_error(client.my_bulk_exec, rpc.ctx(), ["global", "global", "global"], ["kv", "kv", "kv"], [0, 0, 0],
                    ["INSERT INTO kv (k) VALUES (?)", "UPDATE kv SET nope = 1", "INSERT INTO kv (k) VALUES (?)"],
                    [[uniq], [], [uniq + "-never"]], [])
    assert "statement 1 (pool global)" in msg and "1054" in msg and "1 rows" in msg, msg
    assert sql(db, "fae_global", "SELECT COUNT(*) FROM kv WHERE k = %s", (uniq,)) == ((1,),), "not rolled back"
    assert sql(db, "fae_global", "SELECT COUNT(*) FROM kv WHERE k = %s", (uniq + "-never",)) == ((0,),)
    msg = app_error(client.my_bulk_exec, rpc.ctx(), ["global", "global"], ["kv"], [0, 0], ["SELECT 1", "SELECT 2"],
                    [], [])
    assert "one entry per statement" in msg, msg
    assert client.noop(2) == 2


# ---- my_query_shards ------------------------------------------------------------------------------------

def test_my_query_shards_concatenates_in_shard_order(client, rpc):
    r = client.my_query_shards(rpc.ctx(), "user", "users", "SELECT DATABASE() AS db, ? AS x", ["y"])
    assert r.cols == ["db", "x"]
    assert r.rows == [["fae_user%d" % i, "y"] for i in (1, 2, 3, 4)]


def test_my_query_shards_fails_with_the_failing_shards_name(client, rpc):
    msg = app_error(client.my_query_shards, rpc.ctx(), "user", "partial", "SELECT x FROM partial", [])
    assert "user4" in msg and "1146" in msg, msg
    msg = app_error(client.my_query_shards, rpc.ctx(), "global", "kv", "SELECT 1", [])
    assert "not sharded" in msg, msg
    assert client.noop(4) == 4


# ---- my_merge -------------------------------------------------------------------------------------------

def test_my_merge_deep_merges_under_a_lock(client, rpc, db):
    did = random.randint(1, 2**62)
    sql(db, "fae_global", "INSERT INTO doc (id, body) VALUES (%s, %s)", (did, '{"a": 1, "o": {"x": 1}}'))
    r = client.my_merge(rpc.ctx(), "global", "doc", 0, "id", str(did), "body", '{"b": 2, "o": {"y": [1]}}')
    assert r.ok and json.loads(r.newVal) == {"a": 1, "b": 2, "o": {"x": 1, "y": [1]}}
    got = json.loads(sql(db, "fae_global", "SELECT body FROM doc WHERE id = %s", (did,))[0][0])
    assert got == json.loads(r.newVal)
    r = client.my_merge(rpc.ctx(), "global", "doc", 0, "id", "12345678987654321", "body", "{}")
    assert not r.ok, "no row: ok is false"


@pytest.mark.parametrize("where,column,table", [
    ("id = 1 OR 1", "body", "doc"), ("id`", "body", "doc"), ("id", "body; DROP TABLE doc", "doc"),
    ("id", "body", "doc WHERE 1"), ("", "body", "doc"),
])
def test_my_merge_refuses_anything_but_plain_names(client, rpc, where, column, table):
    msg = app_error(client.my_merge, rpc.ctx(), "global", table, 0, where, "1", column, "{}")
    assert "not a plain column or table name" in msg, msg


def test_my_merge_refuses_json_that_is_not(client, rpc):
    msg = app_error(client.my_merge, rpc.ctx(), "global", "doc", 0, "id", "1", "body", "{nope")
    assert "not JSON" in msg, msg


def test_concurrent_merges_of_one_row_lose_nothing(connect, rpc, db):
    did = random.randint(1, 2**62)
    sql(db, "fae_global", "INSERT INTO doc (id, body) VALUES (%s, %s)", (did, "{}"))
    errors = []

    def merger(t):
        c = connect(framed=False).client
        for i in range(200):
            try:
                r = c.my_merge(rpc.ctx(), "global", "doc", 0, "id", str(did), "body",
                               json.dumps({"c%d" % t: {"k%d" % i: i}}))
                assert r.ok
            except Exception as e:  # noqa: BLE001 - recorded, the checker below fails on any
                errors.append(repr(e))

    threads = [threading.Thread(target=merger, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [], errors[:5]
    body = json.loads(sql(db, "fae_global", "SELECT body FROM doc WHERE id = %s", (did,))[0][0])
    missing = [(t, i) for t in range(8) for i in range(200) if body.get("c%d" % t, {}).get("k%d" % i) != i]
    assert missing == [], "%d of 1600 merged keys lost, e.g. %s" % (len(missing), missing[:5])
