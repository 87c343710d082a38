//! Entry points shared by the cargo-fuzz targets in `fuzz/` and by the test that replays their corpus, so
//! that every corpus input is checked on every test run, not only while fuzzing.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::config::Config;
use crate::engine::metrics::LoopMetrics;
use crate::engine::session::{Env, Session};
use crate::servant::Servants;
use crate::wire::{self, Args, Limits, MessageHeader, Progress, Reader, Transport};

/// Decodes `data` as a stream of messages, every argument of each included. Must never panic.
pub fn wire(data: &[u8]) {
    let limits = Limits {
        max_message: 1 << 20,
        max_depth: 64,
        max_container: 1 << 16,
    };
    // The resumable walk finds the same end as the one-pass walk, however the message is split.
    if let Some((&cut, data)) = data.split_first() {
        let one_pass = wire::scan(data, Some(Transport::Buffered), &limits);
        let mut p = Progress::default();
        let split = usize::from(cut).min(data.len());
        let resumed = p
            .walk(&data[..split], &limits)
            .and_then(|found| found.map_or_else(|| p.walk(data, &limits), |len| Ok(Some(len))));
        match (one_pass, resumed) {
            (Ok(Some(f)), Ok(Some(len))) => assert_eq!(f.consumed, len),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            (a, b) => panic!("one-pass walk {a:?}, resumed walk {b:?}"),
        }
    }
    for known in [None, Some(Transport::Buffered), Some(Transport::Framed)] {
        let mut rest = data;
        let mut transport = known;
        while let Ok(Some(frame)) = wire::scan(rest, transport, &limits) {
            transport = Some(frame.transport);
            rest = &rest[frame.consumed..];
            let mut r = Reader::new(frame.message);
            let header = MessageHeader::read(&mut r).expect("scan accepted the header");
            let args = Args::read(&mut r, &limits).expect("scan walked the arguments");
            let _ = header.name;
            let _ = args.context();
            for id in 1..=wire::MAX_ARG_ID as i16 {
                if let Ok(list) = args.string_list(id, "x") {
                    list.for_each(drop);
                }
            }
        }
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut cfg = Config::default();
        cfg.lcache.max_bytes = 16 << 20;
        cfg.server.max_message_bytes = 1 << 20;
        let servants = Servants::new(&cfg).expect("no back-end pools to start");
        let mut env = Env::new(&cfg, Arc::new(servants));
        env.max_pending_reply = 1 << 20;
        env
    })
}

/// Feeds `data` to one session in pieces (the first byte sets the piece size) against real servants, as a
/// client's bytes would arrive. Must never panic, and every reply must be a whole message.
pub fn session(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let metrics = LoopMetrics::default();
    let mut s = Session::new();
    for piece in data.chunks(step) {
        s.on_bytes(piece, env(), &metrics, Instant::now());
        if s.closing() {
            break;
        }
    }
    // Replies go out as whole messages of the transport the client spoke.
    let mut out = &s.out[..];
    while !out.is_empty() {
        let frame = wire::scan(out, None, &Limits::default())
            .ok()
            .flatten()
            .expect("a reply that is not a whole message");
        out = &out[frame.consumed..];
    }
}
