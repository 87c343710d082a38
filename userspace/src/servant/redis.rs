//! `rd_call(cmd, pool, keysAndArgs)`: Redis pools by name, keys placed on a ketama ring of the pool's
//! servers by their first key (API.md: `keysAndArgs[0]`; for commands whose first key is elsewhere, such as
//! EVAL or BITOP, that key). Commands on the deny list are refused, and so is a multi-key command whose keys
//! live on different servers (as twemproxy does): fae never splits or merges a command.
//!
//! Answers (API.md): a status or bulk string as it is, an integer in decimal, an array as a JSON array
//! (strings for strings and integers, `null` for nil elements, nested arrays as arrays); a nil answer is an
//! application error saying nil, as FAE answered (the IDL declares no exception for rd_call); a Redis error
//! is an application error carrying Redis's message.

use crate::backend::redis::{self, Value};
use crate::backend::{BackendError, Backends, Expect, Protocol, Response};
use crate::wire::{Args, Encoder};

use super::{CallEnv, CallError, Outcome};

/// Where a command's keys are among its arguments (after the command name).
enum Keys {
    /// One key, at this index.
    At(usize),
    /// Every argument is a key.
    All,
    /// Keys at 0, 2, 4, … (MSET).
    Pairs,
    /// The first two arguments.
    Two,
    /// Every argument from this index (BITOP op dest src…).
    From(usize),
    /// A count at `count`, then that many keys; `dest` also a key when set (ZUNIONSTORE dest n k…).
    Counted { count: usize, dest: bool },
}

fn keys_of(cmd: &str) -> Keys {
    match cmd {
        "DEL" | "UNLINK" | "EXISTS" | "TOUCH" | "MGET" | "SDIFF" | "SINTER" | "SUNION"
        | "SDIFFSTORE" | "SINTERSTORE" | "SUNIONSTORE" | "PFCOUNT" | "PFMERGE" => Keys::All,
        "MSET" | "MSETNX" => Keys::Pairs,
        "RENAME" | "RENAMENX" | "SMOVE" | "LMOVE" | "RPOPLPUSH" | "COPY" | "GEOSEARCHSTORE"
        | "ZRANGESTORE" => Keys::Two,
        "BITOP" => Keys::From(1),
        "OBJECT" | "MEMORY" => Keys::At(1),
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => Keys::Counted {
            count: 1,
            dest: false,
        },
        "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => Keys::Counted {
            count: 1,
            dest: true,
        },
        "ZUNION" | "ZINTER" | "ZDIFF" | "SINTERCARD" | "ZINTERCARD" | "LMPOP" | "ZMPOP" => {
            Keys::Counted {
                count: 0,
                dest: false,
            }
        }
        _ => Keys::At(0),
    }
}

/// The keys of `cmd` among `args`.
fn keys<'a>(cmd: &str, args: &[&'a [u8]]) -> Result<Vec<&'a [u8]>, String> {
    Ok(match keys_of(cmd) {
        Keys::At(i) => args.get(i).copied().into_iter().collect(),
        Keys::All => args.to_vec(),
        Keys::Pairs => args.iter().step_by(2).copied().collect(),
        Keys::Two => args.iter().take(2).copied().collect(),
        Keys::From(i) => args.iter().skip(i).copied().collect(),
        Keys::Counted { count, dest } => {
            let n = args
                .get(count)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| count + 1 + n <= args.len())
                .ok_or_else(|| {
                    format!(
                        "{cmd}: argument {} must be the number of keys that follow it",
                        count + 1
                    )
                })?;
            let mut k: Vec<&[u8]> = Vec::with_capacity(n + 1);
            if dest {
                k.extend(args.first().copied());
            }
            k.extend(args[count + 1..count + 1 + n].iter().copied());
            k
        }
    })
}

/// A command name: letters, digits and `_ . - |`, at most 64 bytes.
fn command_name(cmd: &[u8]) -> Result<String, CallError> {
    let ok = !cmd.is_empty()
        && cmd.len() <= 64
        && cmd
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'|'));
    if !ok {
        return Err(CallError::refused(format!(
            "{:?} is not a Redis command name",
            String::from_utf8_lossy(&cmd[..cmd.len().min(64)])
        )));
    }
    Ok(String::from_utf8_lossy(cmd).to_ascii_uppercase())
}

/// Validates, places and sends an `rd_call`; its answer comes back through [`finish`].
pub fn call(b: &Backends, args: &Args<'_>, env: &CallEnv) -> Result<Outcome, CallError> {
    let cmd_bytes = args.bytes(2, "cmd")?;
    let pool_name = args.bytes(3, "pool")?;
    let list: Vec<&[u8]> = args.string_list(4, "keysAndArgs")?.collect();
    let cmd = command_name(cmd_bytes)?;
    if b.redis_deny.contains(&cmd) {
        return Err(CallError::refused(format!(
            "{cmd} is refused (redis.deny): it could hurt the store, hold or change a shared connection, or \
             reach keys outside the routing"
        )));
    }
    if matches!(cmd.as_str(), "XREAD" | "XREADGROUP")
        && list.iter().any(|a| a.eq_ignore_ascii_case(b"BLOCK"))
    {
        return Err(CallError::refused(format!(
            "{cmd} with BLOCK is refused: it would hold a connection other calls share"
        )));
    }
    let pool = b
        .pool(Protocol::Redis, pool_name)
        .map_err(CallError::refused)?;
    let keys = keys(&cmd, &list).map_err(CallError::refused)?;
    let route = keys.first().or(list.first()).copied().unwrap_or(b"");
    let server = pool.pick(route, &b.servers, env.now);
    for k in keys.iter().skip(1) {
        let other = pool.pick(k, &b.servers, env.now);
        if other != server {
            return Err(CallError::refused(format!(
                "{cmd}: keys {:?} and {:?} live on different servers of pool {} ({} and {}); a multi-key \
                 command must keep its keys on one server",
                String::from_utf8_lossy(route),
                String::from_utf8_lossy(k),
                pool.name,
                b.servers[server].name,
                b.servers[other].name,
            )));
        }
    }
    let mut request = Vec::with_capacity(16 + list.iter().map(|a| a.len() + 16).sum::<usize>());
    redis::command(
        &mut request,
        std::iter::once(cmd.as_bytes())
            .chain(list.iter().copied())
            .collect::<Vec<_>>()
            .into_iter(),
    );
    super::submit(b, server, request, Expect::Redis, env)
}

/// Writes the result of an `rd_call` whose answer came back.
pub fn finish(
    result: Result<Response, BackendError>,
    out: &mut Encoder<'_>,
) -> Result<(), CallError> {
    let v = match result {
        Ok(Response::Redis(v)) => v,
        Ok(other) => return Err(CallError::refused(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(CallError::refused(e.to_string())),
    };
    match v {
        Value::Status(s) | Value::Bulk(s) => out.field_bytes(0, &s),
        Value::Int(n) => out.field_fmt(0, format_args!("{n}")),
        Value::Nil => {
            return Err(CallError::refused(
                "nil: Redis answered nil (no such key or value)",
            ))
        }
        Value::Error(e) => return Err(CallError::refused(format!("Redis error: {e}"))),
        Value::Array(items) => {
            let json = serde_json::Value::Array(items.into_iter().map(to_json).collect());
            out.field_bytes(0, json.to_string().as_bytes());
        }
    }
    Ok(())
}

fn to_json(v: Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Status(s) | Value::Bulk(s) => J::String(String::from_utf8_lossy(&s).into_owned()),
        Value::Int(n) => J::String(n.to_string()),
        Value::Nil => J::Null,
        Value::Error(e) => J::String(e),
        Value::Array(items) => J::Array(items.into_iter().map(to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k<'a>(cmd: &str, args: &[&'a str]) -> Result<Vec<&'a str>, String> {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        keys(cmd, &a).map(|v| {
            v.into_iter()
                .map(|b| std::str::from_utf8(b).unwrap())
                .collect()
        })
    }

    #[test]
    fn key_positions() {
        assert_eq!(k("GET", &["a"]).unwrap(), ["a"]);
        assert_eq!(k("SET", &["a", "v", "EX", "10"]).unwrap(), ["a"]);
        assert_eq!(k("MGET", &["a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(k("MSET", &["a", "1", "b", "2"]).unwrap(), ["a", "b"]);
        assert_eq!(k("RENAME", &["a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(
            k("BITOP", &["AND", "d", "s1", "s2"]).unwrap(),
            ["d", "s1", "s2"]
        );
        assert_eq!(
            k("EVAL", &["return 1", "2", "a", "b", "x"]).unwrap(),
            ["a", "b"]
        );
        assert_eq!(k("EVAL", &["return 1", "0"]).unwrap(), Vec::<&str>::new());
        assert_eq!(
            k("ZUNIONSTORE", &["d", "2", "a", "b", "WEIGHTS", "1", "2"]).unwrap(),
            ["d", "a", "b"]
        );
        assert_eq!(k("ZUNION", &["2", "a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(k("PING", &[]).unwrap(), Vec::<&str>::new());
        assert!(k("EVAL", &["return 1", "3", "a"]).is_err());
        assert!(k("EVAL", &["return 1", "x"]).is_err());
    }

    #[test]
    fn command_names() {
        assert_eq!(command_name(b"get").unwrap(), "GET");
        assert!(command_name(b"").is_err());
        assert!(command_name(b"GET\r\nFLUSHALL").is_err());
        assert!(command_name(b"a b").is_err());
    }

    #[test]
    fn answers() {
        let enc = |v: Value| {
            let mut o = Vec::new();
            let r = finish(Ok(Response::Redis(v)), &mut Encoder::new(&mut o));
            r.map(|()| o)
        };
        let arr = Value::Array(vec![
            Value::Bulk(b"a".to_vec()),
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![Value::Bulk(b"x".to_vec())]),
        ]);
        let o = enc(arr).unwrap();
        assert!(
            o.ends_with(br#"["a",null,"3",["x"]]"#),
            "{:?}",
            String::from_utf8_lossy(&o)
        );
        assert!(enc(Value::Nil).unwrap_err().message.contains("nil"));
        assert!(enc(Value::Error("WRONGTYPE x".into()))
            .unwrap_err()
            .message
            .contains("WRONGTYPE x"));
        assert!(enc(Value::Int(-7)).unwrap().ends_with(b"-7"));
    }
}
