/**
 * fae — the FunServant API.
 *
 * Wire-compatible with the original FAE ("Fun App Engine") clients: TBinaryProtocol (strict) over TCP with a
 * buffered or framed transport. This file is the contract; do not renumber fields or arguments.
 * MongoDB (mg_*) and Couchbase (cb_*) calls of the original are left out.
 * The SQL argument lists are named sqlArgs: thrift-compiler 0.17 refuses `args` as a name (a PHP keyword);
 * only ids travel on the wire, so clients generated from the original IDL interoperate.
 */
namespace php fun.rpc
namespace py fun.rpc
namespace java fun.rpc
namespace go fun.rpc
namespace rs fun.rpc

/** Sent with every call but noop and id_decode. rid != 0 and a non-empty reason are required. */
struct Context {
    1: required i64 rid,
    2: required string reason,
    3: required i64 uid,
    /** Set by a fae node that forwards a call to the owning peer: the receiver never forwards again. */
    4: optional bool sticky,
}

exception TCacheMissed {
    11: optional string message,
}

exception TMongoNotFound {
    11: optional string message,
}

struct TMemcacheData {
    1: required binary data,
    2: required i32 flags,
}

struct MysqlResult {
    1: required i64 rowsAffected,
    2: required i64 lastInsertId,
    3: required list<string> cols,
    4: required list<list<string>> rows,
}

struct MysqlMergeResult {
    1: required bool ok,
    2: required string newVal,
}

service FunServant {
    // misc
    i32 noop(1: i32 x),
    string ping(1: Context ctx),

    // idgen: snowflake ids, (now_ms - 1388834974657) << 22 | tag << 17 | worker_id << 12 | seq
    i64 id_next(1: Context ctx),
    i64 id_next_with_tag(1: Context ctx, 2: i16 tag),
    list<i64> id_decode(1: Context ctx, 2: i64 id),

    // lcache: node-local LRU, bounded by items and bytes
    bool lc_set(1: Context ctx, 2: string key, 3: binary value),
    binary lc_get(1: Context ctx, 2: string key) throws (1: TCacheMissed miss),
    void lc_del(1: Context ctx, 2: string key),

    // lock: cluster lock with expiry; true if acquired
    bool lock(1: Context ctx, 2: string reason, 3: string key),
    void unlock(1: Context ctx, 2: string reason, 3: string key),

    // memcache
    bool mc_set(1: Context ctx, 2: string pool, 3: string key, 4: TMemcacheData value, 5: i32 expiration),
    TMemcacheData mc_get(1: Context ctx, 2: string pool, 3: string key) throws (1: TCacheMissed miss),
    bool mc_add(1: Context ctx, 2: string pool, 3: string key, 4: TMemcacheData value, 5: i32 expiration),
    bool mc_delete(1: Context ctx, 2: string pool, 3: string key),
    i64 mc_increment(1: Context ctx, 2: string pool, 3: string key, 4: i64 delta),

    // redis: key = keysAndArgs[0]; integers as decimal, arrays as a JSON array of strings
    string rd_call(1: Context ctx, 2: string cmd, 3: string pool, 4: list<string> keysAndArgs),

    // mysql
    MysqlResult my_query(1: Context ctx, 2: string pool, 3: string table, 4: i64 hintId, 5: string sql,
                         6: list<string> sqlArgs, 7: string cacheKey),
    i64 my_bulk_exec(1: Context ctx, 2: list<string> pool, 3: list<string> table, 4: list<i64> hintId,
                     5: list<string> sql, 6: list<list<string>> sqlArgs, 7: list<string> cacheKey),
    MysqlResult my_query_shards(1: Context ctx, 2: string pool, 3: string table, 4: string sql,
                                5: list<string> sqlArgs),
    MysqlMergeResult my_merge(1: Context ctx, 2: string pool, 3: string table, 4: i64 hintId, 5: string where,
                              6: string key, 7: string column, 8: string jsonValue),
    void my_evict(1: Context ctx, 2: string cacheKey),

    // registry: a small replicated path tree (replaces ZooKeeper)
    bool zk_create(1: Context ctx, 2: string path, 3: string data),
    list<string> zk_children(1: Context ctx, 2: string path),
    bool zk_del(1: Context ctx, 2: string path),
}
