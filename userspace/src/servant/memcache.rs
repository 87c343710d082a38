//! `mc_*`: memcached pools by name. The servant validates the call, places the key on a server of the pool
//! (the PHP clients' placement, `memcache.hash`), asks that server's breaker and hands the request to the
//! back end; the answer comes back to [`finish`], on the loop that owns the session.

use crate::backend::memcache::{self, Answer, Expect as McExpect};
use crate::backend::{BackendError, Backends, Expect, Protocol, Response};
use crate::wire::{ttype, Args, Encoder, Limits, Reader};

use super::{CallEnv, CallError, Method, Outcome};

/// The TMemcacheData argument: `1: binary data, 2: i32 flags`, both required; `r` reads its fields (in the
/// call's protocol).
fn memcache_data(mut r: Reader<'_>) -> Result<(&[u8], i32), CallError> {
    let (mut data, mut flags) = (None, None);
    let bad = |e: crate::wire::WireError| CallError::refused(format!("malformed value: {e}"));
    while let Some((id, t)) = r.field().map_err(bad)? {
        match (id, t) {
            (1, ttype::STRING) => data = Some(r.bytes().map_err(bad)?),
            (2, ttype::I32) => flags = Some(r.i32().map_err(bad)?),
            _ => {
                r.skip_value(t, &Limits::default()).map_err(bad)?;
            }
        }
    }
    match (data, flags) {
        (Some(d), Some(f)) => Ok((d, f)),
        _ => Err(CallError::new(
            crate::wire::AppErrorKind::ProtocolError,
            "argument 4 (value): TMemcacheData needs data (1) and flags (2)",
        )),
    }
}

/// Validates and sends an `mc_*` call; its answer comes back through [`finish`].
pub fn call(
    b: &Backends,
    method: Method,
    args: &Args<'_>,
    env: &CallEnv,
) -> Result<Outcome, CallError> {
    let pool_name = args.bytes(2, "pool")?;
    let key = args.bytes(3, "key")?;
    memcache::check_key(key).map_err(|why| CallError::refused(format!("invalid key: {why}")))?;
    let pool = b
        .pool(Protocol::Memcache, pool_name)
        .map_err(CallError::refused)?;
    let mut request = Vec::with_capacity(key.len() + 32);
    let expect = match method {
        Method::McGet => {
            memcache::get(&mut request, key);
            McExpect::Value
        }
        Method::McSet | Method::McAdd => {
            let (data, flags) = memcache_data(args.reader(args.structure(4, "value")?))?;
            let exptime = args.i32(5, "expiration")?;
            request.reserve(data.len());
            let verb = if method == Method::McSet {
                "set"
            } else {
                "add"
            };
            // TMemcacheData.flags is an i32 on the wire; memcached keeps 32 unsigned bits: same bits.
            memcache::store(&mut request, verb, key, flags as u32, exptime, data);
            McExpect::Stored
        }
        Method::McDelete => {
            memcache::delete(&mut request, key);
            McExpect::Deleted
        }
        Method::McIncrement => {
            memcache::incr(&mut request, key, args.i64(4, "delta")?);
            McExpect::Number
        }
        _ => unreachable!("memcache::call is given mc_* methods only"),
    };
    let server = pool.pick(key, &b.servers, env.now);
    super::submit(b, server, request, Expect::Memcache(expect), env)
}

/// Writes the result of an `mc_*` call whose answer came back.
pub fn finish(
    method: Method,
    result: Result<Response, BackendError>,
    out: &mut Encoder<'_>,
) -> Result<(), CallError> {
    let answer = match result {
        Ok(Response::Memcache(a)) => a,
        Ok(other) => return Err(CallError::refused(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(CallError::refused(e.to_string())),
    };
    match (method, answer) {
        (_, Answer::Error(msg)) => {
            return Err(CallError::refused(format!("memcached refused: {msg}")));
        }
        (Method::McGet, Answer::Value { data, flags }) => {
            out.field_begin(ttype::STRUCT, 0);
            out.field_bytes(1, &data);
            out.field_i32(2, flags as i32);
            out.stop();
        }
        (Method::McGet, Answer::Miss) => {
            // TCacheMissed, the declared exception (field 1 of the result).
            out.field_begin(ttype::STRUCT, 1);
            out.field_bytes(11, b"key not found");
            out.stop();
        }
        (Method::McSet | Method::McAdd, a) => out.field_bool(0, a == Answer::Stored),
        (Method::McDelete, a) => out.field_bool(0, a == Answer::Deleted),
        (Method::McIncrement, Answer::Number(n)) => {
            let n = i64::try_from(n).map_err(|_| {
                CallError::refused(format!("memcached's counter {n} does not fit an i64"))
            })?;
            out.field_i64(0, n);
        }
        (Method::McIncrement, Answer::NotFound) => {
            return Err(CallError::refused(
                "key not found: mc_increment does not create a counter (mc_add it first)",
            ));
        }
        (m, a) => {
            return Err(CallError::refused(format!(
                "{}: unexpected answer from memcached: {a:?}",
                m.name()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcache_data_needs_both_fields() {
        let mut body = Vec::new();
        let mut e = Encoder::new(&mut body);
        e.field_bytes(1, b"v");
        e.field_i32(2, -1);
        e.field_i64(9, 5); // unknown fields are skipped
        e.stop();
        assert_eq!(memcache_data(Reader::new(&body)).unwrap(), (&b"v"[..], -1));
        let mut body = Vec::new();
        let mut e = Encoder::new(&mut body);
        e.field_bytes(1, b"v");
        e.stop();
        assert!(memcache_data(Reader::new(&body))
            .unwrap_err()
            .message
            .contains("flags"));
    }
}
