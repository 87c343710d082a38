//! Entry points shared by the cargo-fuzz targets in `fuzz/` and by the test that replays their corpus, so
//! that every corpus input is checked on every test run, not only while fuzzing.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::config::Config;
use crate::engine::metrics::LoopMetrics;
use crate::engine::session::{Env, Session};
use crate::servant::Servants;
use crate::wire::{self, Args, HeaderKind, Limits, MessageHeader, Progress, Reader, Transport};

const LIMITS: Limits = Limits {
    max_message: 1 << 20,
    max_depth: 64,
    max_container: 1 << 16,
};

/// Decodes `data` as a stream of messages (binary or compact, any transport), every argument of each
/// included. Must never panic.
pub fn wire(data: &[u8]) {
    stream(data, &LIMITS);
}

/// As [`wire`], with `data` after a compact message's first byte: the compact decoder's target.
pub fn compact(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    // The first byte still says where the resumable walk is split.
    let mut buf = Vec::with_capacity(data.len() + 1);
    buf.push(cut);
    buf.push(wire::compact::PROTOCOL_ID);
    buf.extend_from_slice(rest);
    stream(&buf, &LIMITS);
    // framed too
    let mut framed = (rest.len() as u32 + 1).to_be_bytes().to_vec();
    framed.push(wire::compact::PROTOCOL_ID);
    framed.extend_from_slice(rest);
    stream(&framed, &LIMITS);
}

/// Reads `data` as header frames of both kinds: the frame, its info headers, its payload. Must never panic;
/// what the frame parser accepts, the session's walk accepts the same way.
pub fn header(data: &[u8]) {
    for kind in [HeaderKind::THeader, HeaderKind::TTHeader] {
        if let Ok(Some(f)) = wire::header::parse(data, kind, &LIMITS) {
            assert!(f.consumed <= data.len());
            f.info
                .walk(&LIMITS, |_, _| {})
                .expect("the frame's info headers were checked when it was read");
            let _ = f.info.caller();
            let mut r = Reader::of(f.protocol, f.payload);
            if MessageHeader::read(&mut r).is_ok() {
                let _ = Args::read(&mut r, &LIMITS);
            }
        }
        let _ = wire::scan(data, Some(Transport::Header(kind)), &LIMITS);
    }
    stream(data, &LIMITS);
}

fn stream(data: &[u8], limits: &Limits) {
    let limits = *limits;
    // The resumable walk finds the same end as the one-pass walk, however the message is split.
    if let Some((&cut, data)) = data.split_first() {
        let one_pass = wire::scan(data, Some(Transport::Buffered), &limits);
        let mut p = Progress::default();
        let split = usize::from(cut).min(data.len());
        let resumed = p
            .walk(&data[..split], &limits)
            .and_then(|found| found.map_or_else(|| p.walk(data, &limits), |len| Ok(Some(len))));
        // And the walk that reads the arguments on the way (what sessions use) agrees with both, whole
        // and split at the same byte.
        let mut args = Args::new(&limits);
        let mut q = Progress::default();
        let called = wire::next_call(&data[..split], None, &limits, &mut args, &mut q)
            .map(|c| c.map(|c| c.consumed))
            .and_then(|found| match found {
                Some(n) => Ok(Some(n)),
                None => wire::next_call(data, None, &limits, &mut args, &mut q)
                    .map(|c| c.map(|c| c.consumed)),
            })
            .map_err(|m| m.error);
        let unframed = matches!(data.first(), Some(&0x80 | &wire::compact::PROTOCOL_ID));
        match (&one_pass, &resumed) {
            (Ok(Some(f)), Ok(Some(len))) => {
                assert_eq!(f.consumed, *len);
                if unframed {
                    assert_eq!(called, Ok(Some(*len)), "next_call, split at {split}");
                }
            }
            (Ok(None), Ok(None)) => {
                if unframed {
                    assert_eq!(called, Ok(None), "next_call, split at {split}");
                }
            }
            (Err(_), Err(_)) => {
                if unframed {
                    assert!(called.is_err(), "next_call {called:?}, split at {split}");
                }
            }
            (a, b) => panic!("one-pass walk {a:?}, resumed walk {b:?}"),
        }
    }
    for known in [
        None,
        Some(Transport::Buffered),
        Some(Transport::Framed),
        Some(Transport::Header(HeaderKind::THeader)),
        Some(Transport::Header(HeaderKind::TTHeader)),
    ] {
        let mut rest = data;
        let mut transport = known;
        while let Ok(Some(frame)) = wire::scan(rest, transport, &limits) {
            transport = Some(frame.dialect.transport);
            rest = &rest[frame.consumed..];
            let mut r = Reader::of(frame.dialect.protocol, frame.message);
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

/// A store's reply bytes as a back-end connection reads them: `data[0]` picks what the parser expects
/// (memcached's five answer kinds, or Redis), `data[1]` where the bytes are split between two reads; the rest
/// is the reply stream. Must never panic; the resumable Redis walk must find the same end as a one-pass walk,
/// and what it finds must decode.
pub fn backend_replies(data: &[u8]) {
    use crate::backend::{memcache, redis};
    let [kind, cut, stream @ ..] = data else {
        return;
    };
    let (max_value, max_count) = (1 << 16, 1 << 10);
    let split = usize::from(*cut).min(stream.len());
    if kind % 6 < 5 {
        let expect = [
            memcache::Expect::Value,
            memcache::Expect::Stored,
            memcache::Expect::Deleted,
            memcache::Expect::Number,
            memcache::Expect::Version,
        ][usize::from(kind % 6)];
        let mut rest = stream;
        while let Ok(Some((_, used))) = memcache::parse(rest, expect, max_value) {
            assert!(used > 0 && used <= rest.len());
            // A prefix of a whole answer is never taken for a whole answer.
            assert!(matches!(
                memcache::parse(&rest[..used - 1], expect, max_value),
                Ok(None) | Err(_)
            ));
            rest = &rest[used..];
        }
        return;
    }
    let mut rest = stream;
    loop {
        let one_pass = redis::Scan::default().walk(rest, max_value, max_count);
        let mut scan = redis::Scan::default();
        let resumed = scan
            .walk(&rest[..split.min(rest.len())], max_value, max_count)
            .and_then(|found| match found {
                Some(n) => Ok(Some(n)),
                None => scan.walk(rest, max_value, max_count),
            });
        match (one_pass, resumed) {
            (Ok(Some(a)), Ok(Some(b))) => {
                assert_eq!(a, b, "resumed walk ended elsewhere");
                assert!(a > 0 && a <= rest.len());
                redis::value(&rest[..a]).expect("a whole reply decodes");
                rest = &rest[a..];
            }
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => return,
            (a, b) => panic!("one-pass walk {a:?}, resumed walk {b:?}"),
        }
    }
}

/// Parses `data` as admin HTTP requests, as the admin port reads them: the first byte sets the body limit,
/// and every prefix is parsed too, as bytes trickle in. Must never panic; a prefix of a request is never
/// taken for a whole one of another length, and the routes' own parsing of the query and body is walked.
pub fn admin_http(data: &[u8]) {
    use crate::admin::http::{parse, Parsed};
    let Some((&limit, data)) = data.split_first() else {
        return;
    };
    let max_body = usize::from(limit) * 64;
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    let whole = parse(data, peer, max_body);
    if let Ok(Parsed::Complete(req, used)) = &whole {
        assert!(*used <= data.len());
        assert!(req.body.len() <= max_body);
        for cut in [1, used / 2, used.saturating_sub(1)] {
            match parse(&data[..cut.min(*used)], peer, max_body) {
                Ok(Parsed::Complete(_, n)) => assert!(n <= cut, "a prefix used more than it had"),
                Ok(Parsed::Partial) | Err(_) => {}
            }
        }
        crate::admin::api::fuzz_request(req);
    }
}
