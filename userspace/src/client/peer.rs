//! A bench-only FunServant server built on the Apache `thrift` crate's own server-side parts: the
//! generated `FunServantSyncProcessor`, `TBinaryInputProtocol`/`TBinaryOutputProtocol` and the crate's
//! buffered or framed transports. It serves noop, ping, lc_get and lc_set so that `fae bench` can put fae
//! side by side with it in one run.
//!
//! Made fair on purpose, or the ratio would mean nothing: one thread per connection (the crate's
//! `TServer` uses a fixed pool, and a pool smaller than the connection count would starve connections),
//! `TCP_NODELAY` (the crate's `TServer` leaves Nagle on, which stalls every reply about 40 ms behind a
//! delayed ACK), each reply written with one `write` (the buffered write transport flushes once per reply),
//! and concrete protocol types instead of the `TServer`'s boxed trait objects.
//!
//! Run: `cargo run --release --example thrift_peer -- 127.0.0.1:9002 [buffered|framed]`; the same handler
//! also runs in-process in `benches/dispatch.rs`.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Instant;

use super::fun_rpc::{
    Context, FunServantSyncHandler, FunServantSyncProcessor, MysqlMergeResult, MysqlResult,
    TCacheMissed, TMemcacheData,
};
use thrift::protocol::{TBinaryInputProtocol, TBinaryOutputProtocol};
use thrift::server::TProcessor;
use thrift::transport::{
    TBufferedReadTransport, TBufferedWriteTransport, TFramedReadTransport, TFramedWriteTransport,
    TReadTransport, TWriteTransport,
};
use thrift::{ApplicationError, ApplicationErrorKind};

const SHARDS: usize = 16;

pub struct Peer {
    started: Instant,
    cache: Vec<Mutex<HashMap<String, Vec<u8>>>>,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            started: Instant::now(),
            cache: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Peer {
    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Vec<u8>>> {
        let h = key
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.cache[h % SHARDS]
    }
}

fn check(ctx: &Context) -> thrift::Result<()> {
    if ctx.rid == 0 || ctx.reason.is_empty() {
        return Err(thrift::Error::Application(ApplicationError::new(
            ApplicationErrorKind::Unknown,
            "invalid context",
        )));
    }
    Ok(())
}

fn unserved<T>() -> thrift::Result<T> {
    Err(thrift::Error::Application(ApplicationError::new(
        ApplicationErrorKind::UnknownMethod,
        "the bench peer serves noop, ping, lc_get and lc_set only",
    )))
}

impl FunServantSyncHandler for Peer {
    fn handle_noop(&self, x: i32) -> thrift::Result<i32> {
        Ok(x)
    }
    fn handle_ping(&self, ctx: Context) -> thrift::Result<String> {
        check(&ctx)?;
        Ok(format!(
            "ver:peer, build:thrift-0.17, myid:0, uptime:{}",
            self.started.elapsed().as_secs()
        ))
    }
    fn handle_lc_set(&self, ctx: Context, key: String, value: Vec<u8>) -> thrift::Result<bool> {
        check(&ctx)?;
        self.shard(&key)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value);
        Ok(true)
    }
    fn handle_lc_get(&self, ctx: Context, key: String) -> thrift::Result<Vec<u8>> {
        check(&ctx)?;
        match self
            .shard(&key)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            Some(v) => Ok(v.clone()),
            None => Err(thrift::Error::User(Box::new(TCacheMissed::new(key)))),
        }
    }
    fn handle_id_next(&self, _: Context) -> thrift::Result<i64> {
        unserved()
    }
    fn handle_id_next_with_tag(&self, _: Context, _: i16) -> thrift::Result<i64> {
        unserved()
    }
    fn handle_id_decode(&self, _: Context, _: i64) -> thrift::Result<Vec<i64>> {
        unserved()
    }
    fn handle_lc_del(&self, _: Context, _: String) -> thrift::Result<()> {
        unserved()
    }
    fn handle_lock(&self, _: Context, _: String, _: String) -> thrift::Result<bool> {
        unserved()
    }
    fn handle_unlock(&self, _: Context, _: String, _: String) -> thrift::Result<()> {
        unserved()
    }
    fn handle_mc_set(
        &self,
        _: Context,
        _: String,
        _: String,
        _: TMemcacheData,
        _: i32,
    ) -> thrift::Result<bool> {
        unserved()
    }
    fn handle_mc_get(&self, _: Context, _: String, _: String) -> thrift::Result<TMemcacheData> {
        unserved()
    }
    fn handle_mc_add(
        &self,
        _: Context,
        _: String,
        _: String,
        _: TMemcacheData,
        _: i32,
    ) -> thrift::Result<bool> {
        unserved()
    }
    fn handle_mc_delete(&self, _: Context, _: String, _: String) -> thrift::Result<bool> {
        unserved()
    }
    fn handle_mc_increment(&self, _: Context, _: String, _: String, _: i64) -> thrift::Result<i64> {
        unserved()
    }
    fn handle_rd_call(
        &self,
        _: Context,
        _: String,
        _: String,
        _: Vec<String>,
    ) -> thrift::Result<String> {
        unserved()
    }
    fn handle_my_query(
        &self,
        _: Context,
        _: String,
        _: String,
        _: i64,
        _: String,
        _: Vec<String>,
        _: String,
    ) -> thrift::Result<MysqlResult> {
        unserved()
    }
    fn handle_my_bulk_exec(
        &self,
        _: Context,
        _: Vec<String>,
        _: Vec<String>,
        _: Vec<i64>,
        _: Vec<String>,
        _: Vec<Vec<String>>,
        _: Vec<String>,
    ) -> thrift::Result<i64> {
        unserved()
    }
    fn handle_my_query_shards(
        &self,
        _: Context,
        _: String,
        _: String,
        _: String,
        _: Vec<String>,
    ) -> thrift::Result<MysqlResult> {
        unserved()
    }
    fn handle_my_merge(
        &self,
        _: Context,
        _: String,
        _: String,
        _: i64,
        _: String,
        _: String,
        _: String,
        _: String,
    ) -> thrift::Result<MysqlMergeResult> {
        unserved()
    }
    fn handle_my_evict(&self, _: Context, _: String) -> thrift::Result<()> {
        unserved()
    }
    fn handle_zk_create(&self, _: Context, _: String, _: String) -> thrift::Result<bool> {
        unserved()
    }
    fn handle_zk_children(&self, _: Context, _: String) -> thrift::Result<Vec<String>> {
        unserved()
    }
    fn handle_zk_del(&self, _: Context, _: String) -> thrift::Result<bool> {
        unserved()
    }
}

/// Serves one connection the way the crate's `TServer` does, until the client goes away.
pub fn serve(
    stream: TcpStream,
    framed: bool,
    processor: &FunServantSyncProcessor<Peer>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let rd = stream.try_clone()?;
    let (r, w): (
        Box<dyn TReadTransport + Send>,
        Box<dyn TWriteTransport + Send>,
    ) = if framed {
        (
            Box::new(TFramedReadTransport::new(rd)),
            Box::new(TFramedWriteTransport::new(stream)),
        )
    } else {
        (
            Box::new(TBufferedReadTransport::new(rd)),
            Box::new(TBufferedWriteTransport::new(stream)),
        )
    };
    let mut i = TBinaryInputProtocol::new(r, true);
    let mut o = TBinaryOutputProtocol::new(w, true);
    // The loop of the crate's TServer: process until the client goes away.
    while processor.process(&mut i, &mut o).is_ok() {}
    Ok(())
}
