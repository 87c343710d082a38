//! `my_*`: MySQL/MariaDB pools (global and sharded by FAE's lookup tables), with a result cache.
//!
//! The servant copies a call's arguments out of the message and hands it to the MySQL workers
//! (`backend::mysql`); the answer comes back to [`finish`] on the loop that owns the session. Two things are
//! answered on the loop itself, with the result cache in memory: a read whose `cacheKey` is cached, and
//! `my_evict`.

use std::sync::Arc;

use crate::backend::mysql::{is_read, MyAnswer, MyCall, MyResult, Mysql, Statement};
use crate::backend::{BackendError, Backends, Response};
use crate::wire::{ttype, ArgError, Args, Encoder, Limits, Reader, Value};

use super::{CallEnv, CallError, Method, Outcome};

fn text(b: &[u8], what: &str) -> Result<String, CallError> {
    String::from_utf8(b.to_vec()).map_err(|_| CallError::refused(format!("{what} is not UTF-8")))
}

fn strings(args: &Args<'_>, id: i16, name: &'static str) -> Result<Vec<String>, CallError> {
    args.string_list(id, name)?.map(|s| text(s, name)).collect()
}

/// The elements of a list argument of element type `elem`: each element's bytes, walked with `each`.
fn list_body<'a>(
    args: &Args<'a>,
    id: i16,
    name: &'static str,
    elem: u8,
) -> Result<(usize, Reader<'a>), CallError> {
    match args.get_value(id, name)? {
        Value::List(t, n, body) if t == elem || n == 0 => Ok((n, args.reader(body))),
        _ => Err(ArgError::Type {
            id,
            name,
            want: if elem == ttype::I64 {
                "list<i64>"
            } else {
                "list<list<string>>"
            },
            got: "another type",
        }
        .into()),
    }
}

fn i64s(args: &Args<'_>, id: i16, name: &'static str) -> Result<Vec<i64>, CallError> {
    let (n, mut r) = list_body(args, id, name, ttype::I64)?;
    (0..n)
        .map(|_| r.i64().map_err(|e| CallError::from(ArgError::Wire(e))))
        .collect()
}

fn string_lists(
    args: &Args<'_>,
    id: i16,
    name: &'static str,
) -> Result<Vec<Vec<String>>, CallError> {
    let (n, mut r) = list_body(args, id, name, ttype::LIST)?;
    let limits = Limits::default();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (t, m) = r
            .list_header(&limits)
            .map_err(|e| CallError::from(ArgError::Wire(e)))?;
        if t != ttype::STRING && m > 0 {
            return Err(CallError::from(ArgError::Type {
                id,
                name,
                want: "list<list<string>>",
                got: "a list of another type",
            }));
        }
        let mut row = Vec::with_capacity(m);
        for _ in 0..m {
            let b = r.bytes().map_err(|e| CallError::from(ArgError::Wire(e)))?;
            row.push(text(b, name)?);
        }
        out.push(row);
    }
    Ok(out)
}

fn mysql(b: &Backends) -> Result<&Arc<Mysql>, CallError> {
    b.mysql.as_ref().ok_or_else(|| {
        CallError::refused("no MySQL servers are configured on this node ([[mysql.servers]])")
    })
}

fn known_pool(m: &Mysql, pool: &str) -> Result<(), CallError> {
    if m.has_pool(pool) {
        Ok(())
    } else {
        Err(CallError::refused(format!(
            "unknown mysql pool {pool:?}; configured: {}",
            m.pools().join(", ")
        )))
    }
}

/// Validates an `my_*` call and hands it to the MySQL workers (or answers it here from the cache).
pub fn call(
    b: &Backends,
    method: Method,
    args: &Args<'_>,
    out: &mut Encoder<'_>,
    env: &CallEnv,
) -> Result<Outcome, CallError> {
    let m = mysql(b)?;
    let call = match method {
        Method::MyQuery => {
            // A cached read is answered here, before anything is copied out of the message.
            let cache_key = if args.has(7) {
                args.bytes(7, "cacheKey")?
            } else {
                b""
            };
            if !cache_key.is_empty() {
                let sql = std::str::from_utf8(args.bytes(5, "sql")?).unwrap_or("");
                let key = std::str::from_utf8(cache_key).unwrap_or("");
                if is_read(sql) {
                    if let Some(hit) = m.cached(key) {
                        encode_result(out, &hit);
                        return Ok(Outcome::Answered);
                    }
                }
            }
            let st = Statement {
                pool: text(args.bytes(2, "pool")?, "pool")?,
                table: text(args.bytes(3, "table")?, "table")?,
                hint_id: args.i64(4, "hintId")?,
                sql: text(args.bytes(5, "sql")?, "sql")?,
                args: if args.has(6) {
                    strings(args, 6, "sqlArgs")?
                } else {
                    Vec::new()
                },
                cache_key: if args.has(7) {
                    text(args.bytes(7, "cacheKey")?, "cacheKey")?
                } else {
                    String::new()
                },
            };
            known_pool(m, &st.pool)?;
            MyCall::Query(st)
        }
        Method::MyBulkExec => {
            let pools = strings(args, 2, "pool")?;
            let tables = strings(args, 3, "table")?;
            let hints = i64s(args, 4, "hintId")?;
            let sqls = strings(args, 5, "sql")?;
            let n = pools.len();
            let sql_args = if args.has(6) {
                string_lists(args, 6, "sqlArgs")?
            } else {
                Vec::new()
            };
            let keys = if args.has(7) {
                strings(args, 7, "cacheKey")?
            } else {
                Vec::new()
            };
            let same = |len: usize, optional: bool| len == n || (optional && len == 0);
            if !(same(tables.len(), false)
                && same(hints.len(), false)
                && same(sqls.len(), false)
                && same(sql_args.len(), true)
                && same(keys.len(), true))
            {
                return Err(CallError::refused(format!(
                    "my_bulk_exec: pool, table, hintId and sql need one entry per statement ({n}), and sqlArgs \
                     and cacheKey one each or none; got {}, {}, {}, {}, {}, {}",
                    n,
                    tables.len(),
                    hints.len(),
                    sqls.len(),
                    sql_args.len(),
                    keys.len()
                )));
            }
            let mut items = Vec::with_capacity(n);
            for i in 0..n {
                known_pool(m, &pools[i])?;
                items.push(Statement {
                    pool: pools[i].clone(),
                    table: tables[i].clone(),
                    hint_id: hints[i],
                    sql: sqls[i].clone(),
                    args: sql_args.get(i).cloned().unwrap_or_default(),
                    cache_key: keys.get(i).cloned().unwrap_or_default(),
                });
            }
            MyCall::BulkExec(items)
        }
        Method::MyQueryShards => {
            let st = Statement {
                pool: text(args.bytes(2, "pool")?, "pool")?,
                table: text(args.bytes(3, "table")?, "table")?,
                hint_id: 0,
                sql: text(args.bytes(4, "sql")?, "sql")?,
                args: if args.has(5) {
                    strings(args, 5, "sqlArgs")?
                } else {
                    Vec::new()
                },
                cache_key: String::new(),
            };
            known_pool(m, &st.pool)?;
            MyCall::QueryShards(st)
        }
        Method::MyMerge => {
            let at = Statement {
                pool: text(args.bytes(2, "pool")?, "pool")?,
                table: text(args.bytes(3, "table")?, "table")?,
                hint_id: args.i64(4, "hintId")?,
                sql: String::new(),
                args: Vec::new(),
                cache_key: String::new(),
            };
            known_pool(m, &at.pool)?;
            MyCall::Merge {
                at,
                where_col: text(args.bytes(5, "where")?, "where")?,
                key: text(args.bytes(6, "key")?, "key")?,
                column: text(args.bytes(7, "column")?, "column")?,
                json: text(args.bytes(8, "jsonValue")?, "jsonValue")?,
            }
        }
        Method::MyEvict => {
            let key = text(args.bytes(2, "cacheKey")?, "cacheKey")?;
            if m.evict_memory(&key) {
                return Ok(Outcome::Answered);
            }
            MyCall::Evict(key)
        }
        _ => unreachable!("mysql::call is given my_* methods only"),
    };
    m.submit(call, env.ticket, env.now, env.deadline);
    Ok(Outcome::Deferred)
}

/// `MysqlResult` as the result's field 0.
fn encode_result(out: &mut Encoder<'_>, r: &MyResult) {
    out.field_begin(ttype::STRUCT, 0);
    out.field_i64(1, r.rows_affected);
    out.field_i64(2, r.last_insert_id);
    out.field_begin(ttype::LIST, 3);
    out.list_begin(ttype::STRING, r.cols.len());
    for c in &r.cols {
        out.bytes(c.as_bytes());
    }
    out.field_begin(ttype::LIST, 4);
    out.list_begin(ttype::LIST, r.rows.len());
    for row in &r.rows {
        out.list_begin(ttype::STRING, row.len());
        for v in row {
            out.bytes(v.as_bytes());
        }
    }
    out.stop();
}

/// Writes the result of a `my_*` call whose answer came back.
pub fn finish(
    method: Method,
    result: Result<Response, BackendError>,
    out: &mut Encoder<'_>,
) -> Result<(), CallError> {
    let answer = match result {
        Ok(Response::Mysql(a)) => a,
        Ok(other) => return Err(CallError::refused(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(CallError::refused(e.to_string())),
    };
    match (method, answer) {
        (_, MyAnswer::Refused(why)) => return Err(CallError::refused(why)),
        (Method::MyQuery | Method::MyQueryShards, MyAnswer::Result(r)) => encode_result(out, &r),
        (Method::MyBulkExec, MyAnswer::Affected(n)) => out.field_i64(0, n),
        (Method::MyMerge, MyAnswer::Merged { ok, value }) => {
            out.field_begin(ttype::STRUCT, 0);
            out.field_bool(1, ok);
            out.field_bytes(2, value.as_bytes());
            out.stop();
        }
        (Method::MyEvict, MyAnswer::Evicted) => {}
        (m, a) => {
            return Err(CallError::refused(format!(
                "{}: unexpected answer {a:?}",
                m.name()
            )))
        }
    }
    Ok(())
}
