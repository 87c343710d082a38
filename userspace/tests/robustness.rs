//! Robustness: the real faed binary attacked over raw TCP on loopback. Every attack ends by proving that a
//! fresh connection is still served; attacks on the wire format also check that the attacked connection got a
//! `TApplicationException` PROTOCOL_ERROR and was then closed by the server.
//!
//! Run alone: `cargo test -p fae --test robustness`.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CLOSE_WITHIN: Duration = Duration::from_secs(3);
/// An attack that can be judged from the bytes already sent must be answered at once, not after a timeout.
const AT_ONCE: Duration = Duration::from_secs(2);

/// Sends `bytes` (tolerating an early close), then expects a PROTOCOL_ERROR on `transport` and the close;
/// returns the error message and how long the answer took.
fn protocol_error_then_close(faed: &Faed, transport: Transport, bytes: &[u8]) -> (Msg, Duration) {
    let mut c = faed.connect(transport);
    c.set_read_timeout(AT_ONCE);
    let t = Instant::now();
    c.send_lossy(bytes);
    let m = c.expect_app_error(PROTOCOL_ERROR);
    let took = t.elapsed();
    assert!(took < AT_ONCE, "PROTOCOL_ERROR took {took:?}");
    c.expect_closed(CLOSE_WITHIN);
    (m, took)
}

/// A `ping` call whose argument `arg_id` is a struct nested `depth` deep (struct in struct in ...), each level
/// closed properly.
fn nested_call(seqid: i32, arg_id: i16, depth: usize, with_ctx: bool) -> Vec<u8> {
    call("ping", seqid, |e| {
        if with_ctx {
            ctx_arg(e);
        }
        e.field_begin(ttype::STRUCT, arg_id);
        for _ in 1..depth {
            e.field_begin(ttype::STRUCT, 1);
        }
        for _ in 0..depth {
            e.stop();
        }
    })
}

// ---- 1. bad protocol version ------------------------------------------------------------------------------

#[test]
fn bad_protocol_version_gets_protocol_error_then_close() {
    let faed = Faed::start("");
    let mut msg = ping_call(11);
    msg[..4].copy_from_slice(&0x8002_0001u32.to_be_bytes());

    let (m, took) = protocol_error_then_close(&faed, Transport::Buffered, &msg);
    println!("buffered bad version: {:?} in {took:?}", m.app_error());
    let (m, took) = protocol_error_then_close(&faed, Transport::Framed, &framed(&msg));
    println!("framed bad version: {:?} in {took:?}", m.app_error());

    // The old, non-strict encoding (name length first) is not a strict message either.
    let mut old = 4i32.to_be_bytes().to_vec();
    old.extend_from_slice(b"ping");
    old.push(mtype::CALL);
    old.extend_from_slice(&1i32.to_be_bytes());
    old.push(ttype::STOP);
    protocol_error_then_close(&faed, Transport::Framed, &framed(&old));

    faed.assert_alive();
}

// ---- 2. absurd lengths ------------------------------------------------------------------------------------

#[test]
fn absurd_frame_length_is_refused_at_once() {
    let faed = Faed::start("");
    // A frame of 2^31-1 bytes: refused on its 4 header bytes, without waiting for 2 GiB.
    let (m, took) = protocol_error_then_close(&faed, Transport::Framed, &[0x7f, 0xff, 0xff, 0xff]);
    println!("frame 2^31-1: {:?} in {took:?}", m.app_error());
    // One byte past the 16 MiB default limit.
    let len = ((16u32 << 20) + 1).to_be_bytes();
    protocol_error_then_close(&faed, Transport::Framed, &len);
    // An empty frame.
    protocol_error_then_close(&faed, Transport::Framed, &[0, 0, 0, 0]);

    // Unframed: a method name claiming 2^31-1 bytes.
    let mut msg = (0x8001_0000u32 | u32::from(mtype::CALL))
        .to_be_bytes()
        .to_vec();
    msg.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    msg.extend_from_slice(b"ping");
    let (m, took) = protocol_error_then_close(&faed, Transport::Buffered, &msg);
    println!("unframed name of 2^31-1: {:?} in {took:?}", m.app_error());

    // A negative frame length after a good first frame (the first byte 0x80 would select unframed).
    let mut c = faed.connect(Transport::Framed);
    c.call(&ping_call(1)).success("ping", 1);
    c.set_read_timeout(AT_ONCE);
    c.send_raw(&[0xff, 0xff, 0xff, 0xf0]);
    c.expect_app_error(PROTOCOL_ERROR);
    c.expect_closed(CLOSE_WITHIN);

    faed.assert_alive();
}

// ---- 3. a value running past the end of its message --------------------------------------------------------

#[test]
fn string_past_end_of_message_gets_protocol_error_then_close() {
    let faed = Faed::start("");
    // lc_get(ctx, key) whose key claims 1000 bytes; the frame holds 6.
    let msg = call("lc_get", 31, |e| {
        ctx_arg(e);
        e.field_begin(ttype::STRING, 2);
        e.i32(1000);
        e.bool(true);
        e.bool(true);
        e.bool(true);
        e.bool(true);
        e.bool(true);
    });
    let (m, _) = protocol_error_then_close(&faed, Transport::Framed, &framed(&msg));
    assert_eq!(
        (m.name.as_str(), m.seqid),
        ("lc_get", 31),
        "the error answers the call"
    );

    // The same inside the Context struct (reason claims 100 bytes).
    let msg = call("ping", 32, |e| {
        e.field_begin(ttype::STRUCT, 1);
        e.field_i64(1, 1);
        e.field_begin(ttype::STRING, 2);
        e.i32(100);
        e.bool(true);
    });
    let (m, _) = protocol_error_then_close(&faed, Transport::Framed, &framed(&msg));
    assert_eq!((m.name.as_str(), m.seqid), ("ping", 32));

    // A negative string length, unframed: malformed at once.
    let msg = call("lc_get", 33, |e| {
        ctx_arg(e);
        e.field_begin(ttype::STRING, 2);
        e.i32(-1);
    });
    let (m, _) = protocol_error_then_close(&faed, Transport::Buffered, &msg);
    assert_eq!((m.name.as_str(), m.seqid), ("lc_get", 33));

    faed.assert_alive();
}

// ---- 4. nesting -------------------------------------------------------------------------------------------

#[test]
fn deep_nesting_gets_protocol_error_then_close() {
    let faed = Faed::start("");
    // Control: 32 levels in an unknown argument (under max_depth = 64) are skipped and the call served.
    let mut c = faed.connect(Transport::Buffered);
    c.call(&nested_call(40, 9, 32, true)).success("ping", 40);
    let mut c = faed.connect(Transport::Framed);
    c.call(&nested_call(41, 9, 32, true)).success("ping", 41);

    let deep = nested_call(42, 1, 10_000, false);
    let (m, took) = protocol_error_then_close(&faed, Transport::Framed, &framed(&deep));
    assert_eq!((m.name.as_str(), m.seqid), ("ping", 42));
    println!("framed 10,000 deep: {:?} in {took:?}", m.app_error());
    let (m, took) = protocol_error_then_close(&faed, Transport::Buffered, &deep);
    assert_eq!((m.name.as_str(), m.seqid), ("ping", 42));
    println!("buffered 10,000 deep: {:?} in {took:?}", m.app_error());

    // list<list<list<...>>> 10,000 deep, unframed and with no end: refused on depth, not waited for.
    let lists = call("ping", 43, |e| {
        e.field_begin(ttype::LIST, 1);
        for _ in 0..10_000 {
            e.list_begin(ttype::LIST, 1);
        }
    });
    let lists = &lists[..lists.len() - 1]; // without the closing STOP: the message never ends
    let (m, _) = protocol_error_then_close(&faed, Transport::Buffered, lists);
    assert_eq!((m.name.as_str(), m.seqid), ("ping", 43));

    faed.assert_alive();
}

// ---- 5. containers ----------------------------------------------------------------------------------------

#[test]
fn huge_container_without_data_is_refused_at_once() {
    let faed = Faed::start("");
    // list<i64> of 2^30 elements, no data.
    let list = call("ping", 51, |e| {
        ctx_arg(e);
        e.field_begin(ttype::LIST, 4);
        e.list_begin(ttype::I64, 1 << 30);
    });
    for t in [Transport::Buffered, Transport::Framed] {
        let (m, took) = protocol_error_then_close(&faed, t, &on(t, &list));
        assert_eq!((m.name.as_str(), m.seqid), ("ping", 51));
        println!("{t:?} list of 2^30: {:?} in {took:?}", m.app_error());
    }
    // map<i32, i32> of 2^30 entries, and set<string> of 2^30.
    let map = call("ping", 52, |e| {
        ctx_arg(e);
        e.field_begin(ttype::MAP, 4);
        e.i16(i16::from_be_bytes([ttype::I32, ttype::I32]));
        e.i32(1 << 30);
    });
    let set = call("ping", 53, |e| {
        ctx_arg(e);
        e.field_begin(ttype::SET, 4);
        e.list_begin(ttype::STRING, 1 << 30);
    });
    for msg in [&map, &set] {
        protocol_error_then_close(&faed, Transport::Buffered, msg);
    }
    // A count under the container limit that the frame cannot possibly hold (500,000 i64 in a few bytes).
    let short = call("ping", 54, |e| {
        ctx_arg(e);
        e.field_begin(ttype::LIST, 4);
        e.list_begin(ttype::I64, 500_000);
    });
    protocol_error_then_close(&faed, Transport::Framed, &framed(&short));

    faed.assert_alive();
}

// ---- 6. application errors keep the session ---------------------------------------------------------------

#[test]
fn unknown_method_is_answered_and_session_kept() {
    let faed = Faed::start("");
    for t in [Transport::Buffered, Transport::Framed] {
        let mut c = faed.connect(t);
        c.send(&call("no_such_method", 61, ctx_arg));
        let m = c.expect_app_error(UNKNOWN_METHOD);
        assert_eq!((m.name.as_str(), m.seqid), ("no_such_method", 61), "{t:?}");
        c.call(&ping_call(62)).success("ping", 62);
        // A long name of control bytes: the reply's text quotes a bounded part of it and its header the
        // name's first 256 bytes, so the reply stays small whatever the name's size.
        let long = "\u{1}".repeat(64 << 10);
        c.send(&call(&long, 60, ctx_arg));
        let m = c.expect_app_error(UNKNOWN_METHOD);
        let (text, _) = m.app_error().expect("an application error");
        assert!(text.len() < 1024, "{} bytes of error text", text.len());
        assert!(text.contains("65536 bytes"), "{text}");
        assert_eq!(m.name, long[..256]);
        assert_eq!(m.seqid, 60);
        // A long name of two-byte characters, the 256th byte inside one: cut at its start, still UTF-8.
        let wide = format!("a{}", "é".repeat(1000));
        c.send(&call(&wide, 58, ctx_arg));
        let m = c.expect_app_error(UNKNOWN_METHOD);
        assert_eq!(m.name, wide[..255]);
        c.call(&ping_call(59)).success("ping", 59);

        // A call missing its Context: an application error, the session stays.
        c.send(&call("ping", 63, |_| {}));
        let m = c.recv().expect("reply to ping without ctx");
        assert!(
            m.app_error().is_some(),
            "expected an application error, got {m:?}"
        );
        assert_eq!(m.seqid, 63);
        // A REPLY sent to the server: INVALID_MESSAGE_TYPE, the session stays.
        c.send(&message("ping", mtype::REPLY, 64, ctx_arg));
        let m = c.expect_app_error(2);
        assert_eq!(m.seqid, 64);
        assert_eq!(
            c.call(&noop_call(65, -5)).success("noop", 65),
            &Val::I32(-5)
        );
        assert_eq!(c.call(&noop_call(66, 9)).success("noop", 66), &Val::I32(9));
    }
    faed.assert_alive();
}

// ---- 7. clients leaving mid-message -----------------------------------------------------------------------

#[test]
fn client_closing_mid_message_leaks_nothing() {
    // Few session slots: a session leaked by any of the 48 abandoned connections would soon block new ones.
    let faed = Faed::start("max_sessions = 8");
    let full = ping_call(71);
    for i in 0..48usize {
        let t = if i % 2 == 0 {
            Transport::Buffered
        } else {
            Transport::Framed
        };
        let bytes = on(t, &full);
        let cut = 1 + (i * 7) % (bytes.len() - 1);
        let mut c = faed.connect(t);
        c.send_raw(&bytes[..cut]);
        match i % 3 {
            0 => drop(c),
            1 => {
                // Abortive close: RST.
                socket2::SockRef::from(&c.w)
                    .set_linger(Some(Duration::ZERO))
                    .expect("SO_LINGER");
                drop(c);
            }
            _ => {
                // Half close: the server must notice the end of input and close, sending nothing.
                c.shutdown_write();
                c.expect_closed(CLOSE_WITHIN);
            }
        }
    }
    // A whole call, then half of another, then half close: the first is answered, then the session closes.
    let mut c = faed.connect(Transport::Buffered);
    let mut bytes = full.clone();
    bytes.extend_from_slice(&ping_call(72)[..20]);
    c.send_raw(&bytes);
    c.shutdown_write();
    c.recv().expect("reply before close").success("ping", 71);
    c.expect_closed(CLOSE_WITHIN);

    faed.assert_alive();
}

// ---- 8. trickling clients ---------------------------------------------------------------------------------

#[test]
fn trickling_client_does_not_stall_others() {
    let faed = Faed::start("");
    let addr = faed.addr();
    let msg = ping_call(81);
    let trickler = thread::spawn(move || {
        let mut c = Conn::open(addr, Transport::Buffered);
        for b in &msg[..4] {
            c.send_raw(&[*b]);
            thread::sleep(Duration::from_secs(1));
        }
        c.send_raw(&msg[4..]);
        c.recv().expect("trickler's reply").success("ping", 81);
    });
    let mut other = faed.connect(Transport::Buffered);
    let (mut n, mut worst) = (0, Duration::ZERO);
    while !trickler.is_finished() && n < 200 {
        let t = Instant::now();
        timed_ping(addr);
        assert_eq!(
            other.call(&noop_call(n, n)).success("noop", n),
            &Val::I32(n)
        );
        worst = worst.max(t.elapsed());
        n += 1;
        thread::sleep(Duration::from_millis(50));
    }
    trickler.join().expect("trickler");
    println!("{n} call pairs while a client trickled; slowest {worst:?}");
    assert!(n >= 10, "only {n} calls while the trickler ran");
    assert!(
        worst < Duration::from_secs(1),
        "a call took {worst:?} while a client trickled"
    );
    faed.assert_alive();
}

#[test]
fn message_and_idle_timeouts_disconnect() {
    let faed = Faed::start("message_timeout_ms = 1500\nidle_timeout_ms = 2500");
    let addr = faed.addr();
    // One byte a second: cut off by the message timeout (1.5 s, checked about every second).
    let trickler = thread::spawn(move || {
        let msg = ping_call(82);
        let mut c = Conn::open(addr, Transport::Buffered);
        let t0 = Instant::now();
        for b in &msg[..8] {
            if !c.send_lossy(&[*b]) {
                return Some(t0.elapsed());
            }
            c.set_read_timeout(Duration::from_secs(1));
            let mut buf = [0u8; 64];
            match c.r.read(&mut buf) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(n) => panic!("trickler got {n} bytes: {:02x?}", &buf[..n]),
                Err(e) if is_closed_error(&e) => return Some(t0.elapsed()),
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("trickler read: {e}"),
            }
        }
        None
    });
    // Connected, silent: cut off by the idle timeout.
    let idle = thread::spawn(move || {
        let mut c = Conn::open(addr, Transport::Buffered);
        let t0 = Instant::now();
        c.expect_closed(Duration::from_secs(7));
        t0.elapsed()
    });
    // Active for longer than the idle timeout: never cut off.
    let mut active = faed.connect(Transport::Framed);
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_millis(3500) {
        assert_eq!(
            active.call(&noop_call(i, i)).success("noop", i),
            &Val::I32(i)
        );
        i += 1;
        thread::sleep(Duration::from_millis(300));
    }
    let trickled = trickler.join().expect("trickler");
    let idled = idle.join().expect("idle client");
    println!("trickler cut after {trickled:?}; idle client cut after {idled:?}");
    let trickled = trickled.expect("the trickler was not disconnected within 8 s");
    assert!(
        (Duration::from_millis(1400)..Duration::from_secs(6)).contains(&trickled),
        "message_timeout_ms = 1500, trickler cut after {trickled:?}"
    );
    assert!(
        (Duration::from_millis(2400)..Duration::from_secs(6)).contains(&idled),
        "idle_timeout_ms = 2500, idle client cut after {idled:?}"
    );
    active.call(&ping_call(83)).success("ping", 83);
    faed.assert_alive();
}

// ---- 9. many idle connections -----------------------------------------------------------------------------

#[test]
fn thousand_idle_connections_and_thousand_calls() {
    let limit = raise_nofile(4096);
    assert!(
        limit >= 2200,
        "RLIMIT_NOFILE {limit} too low for 1,000 connections"
    );
    let faed = Faed::start("");
    let addr = faed.addr();
    faed.assert_alive();
    let base = faed.rss_kib();
    let t = Instant::now();
    let idle: Vec<TcpStream> = (0..1000)
        .map(|i| {
            TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    println!("1,000 connections opened in {:?}", t.elapsed());

    let mut c = faed.connect(Transport::Buffered);
    let t = Instant::now();
    for i in 0..1000 {
        let x = i * 7 - 3000;
        assert_eq!(c.call(&noop_call(i, x)).success("noop", i), &Val::I32(x));
    }
    let calls = t.elapsed();
    let loaded = faed.rss_kib();

    // Every one of the 1,000 is a live session.
    let t = Instant::now();
    for (i, s) in idle.iter().enumerate() {
        let mut ic = Conn::from_stream(s.try_clone().expect("clone"), Transport::Buffered);
        ic.call(&ping_call(i as i32)).success("ping", i as i32);
    }
    let pings = t.elapsed();
    let after = faed.rss_kib();
    println!(
        "1,000 calls in {calls:?}; 1,000 pings on the idle connections in {pings:?}; \
         faed RSS: {base} KiB before, {loaded} KiB with 1,000 idle sessions, {after} KiB after"
    );
    assert!(base > 0 && loaded > 0, "VmRSS unreadable");
    let growth = after.max(loaded).saturating_sub(base);
    assert!(
        growth < 64 << 10,
        "RSS grew by {growth} KiB with 1,000 sessions"
    );
    drop(idle);
    faed.assert_alive();
}

// ---- 10. pipelining ---------------------------------------------------------------------------------------

#[test]
fn thousand_pipelined_calls_answered_in_order() {
    let faed = Faed::start("");
    for t in [Transport::Buffered, Transport::Framed] {
        for padded in [false, true] {
            let mut c = faed.connect(t);
            // Padded calls carry an unknown 200-byte argument, so that the batch (~230 KB) spans several
            // socket reads and messages straddle read boundaries.
            let batch: Vec<u8> = (0..1000)
                .flat_map(|i| {
                    let msg = call("noop", i, |e| {
                        e.field_i32(1, i * 3 + 1);
                        if padded {
                            e.field_bytes(9, &[b'p'; 200]);
                        }
                    });
                    on(t, &msg)
                })
                .collect();
            let mut w = c.w.try_clone().expect("clone");
            let writer = thread::spawn(move || w.write_all(&batch));
            let started = Instant::now();
            for i in 0..1000 {
                let m = c.recv().unwrap_or_else(|e| panic!("{t:?} reply {i}: {e}"));
                assert_eq!(
                    m.success("noop", i),
                    &Val::I32(i * 3 + 1),
                    "{t:?} reply {i}"
                );
            }
            writer.join().expect("writer").expect("write the batch");
            println!(
                "{t:?} padded={padded}: 1,000 pipelined replies in {:?}",
                started.elapsed()
            );
            c.expect_silence(Duration::from_millis(100));
            c.call(&ping_call(1000)).success("ping", 1000);
        }
    }
    faed.assert_alive();
}

// ---- 11. the session cap ----------------------------------------------------------------------------------

#[test]
fn session_cap_queues_extra_connections() {
    let faed = Faed::start("max_sessions = 4");
    let mut held: Vec<Conn> = (0..4)
        .map(|i| {
            let mut c = faed.connect(Transport::Buffered);
            c.call(&ping_call(i)).success("ping", i);
            c
        })
        .collect();
    // The fifth is accepted by the kernel, not by faed: no answer.
    let mut fifth = faed.connect(Transport::Buffered);
    fifth.send(&ping_call(5));
    fifth.expect_silence(Duration::from_millis(600));
    // The four are still served.
    for (i, c) in held.iter_mut().enumerate() {
        let seq = 10 + i as i32;
        c.call(&noop_call(seq, seq)).success("noop", seq);
    }
    // One leaves: the fifth is taken up and answered.
    drop(held.remove(0));
    let t = Instant::now();
    fifth.set_read_timeout(Duration::from_secs(3));
    fifth
        .recv()
        .expect("the fifth's reply once a slot freed")
        .success("ping", 5);
    println!(
        "fifth connection answered {:?} after a slot freed",
        t.elapsed()
    );
    // Full again: a sixth waits.
    let mut sixth = faed.connect(Transport::Framed);
    sixth.send(&ping_call(6));
    sixth.expect_silence(Duration::from_millis(500));
    drop(held);
    sixth.set_read_timeout(Duration::from_secs(3));
    sixth.recv().expect("the sixth's reply").success("ping", 6);
    drop(fifth);
    drop(sixth);
    faed.assert_alive();
}

// ---- 12. memory under a flood -----------------------------------------------------------------------------

#[test]
fn flood_without_reading_replies_is_backpressured() {
    let faed = Faed::start("max_pending_reply_bytes = 1048576");
    let addr = faed.addr();
    let value = vec![0xab_u8; 256 << 10];
    let mut c = faed.connect(Transport::Buffered);
    assert_eq!(
        c.call(&lc_set_call(1, b"big", &value)).success("lc_set", 1),
        &Val::Bool(true)
    );
    for i in 2..6 {
        assert_eq!(
            c.call(&lc_get_call(i, b"big")).success("lc_get", i),
            &Val::Bin(value.clone())
        );
    }
    let base = faed.rss_kib();

    // Each ~60-byte lc_get asks for a 256 KiB reply; the flooder never reads.
    let flood = faed.connect(Transport::Buffered);
    let mut w = flood.w.try_clone().expect("clone");
    w.set_write_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let batch: Vec<u8> = (0..1000).flat_map(|i| lc_get_call(i, b"big")).collect();
    const MAX_FLOOD: usize = 64 << 20;
    let writer = thread::spawn(move || {
        let (mut written, mut off) = (0usize, 0usize);
        let t = Instant::now();
        while written < MAX_FLOOD && t.elapsed() < Duration::from_secs(8) {
            match w.write(&batch[off..]) {
                Ok(n) => {
                    written += n;
                    off = (off + n) % batch.len();
                }
                Err(e) if is_timeout(&e) => return (written, true),
                Err(e) => panic!("flood write: {e}"),
            }
        }
        (written, false)
    });
    let (mut peak, mut slowest, mut pings) = (base, Duration::ZERO, 0);
    let mut next_ping = Instant::now();
    while !writer.is_finished() {
        peak = peak.max(faed.rss_kib());
        if Instant::now() >= next_ping {
            slowest = slowest.max(timed_ping(addr));
            pings += 1;
            next_ping = Instant::now() + Duration::from_millis(300);
        }
        thread::sleep(Duration::from_millis(25));
    }
    let (written, blocked) = writer.join().expect("flood writer");
    // The replies stay queued while the flooder does not read: look again.
    thread::sleep(Duration::from_millis(200));
    let held = faed.rss_kib();
    peak = peak.max(held);
    slowest = slowest.max(timed_ping(addr));
    println!(
        "flood: {} KiB written before faed stopped reading (blocked: {blocked}); faed RSS {base} KiB before, \
         peak {peak} KiB, {held} KiB while held; {pings} pings during the flood, slowest {slowest:?}",
        written >> 10
    );
    assert!(
        blocked,
        "faed kept reading {} MiB of requests whose replies were never read",
        written >> 20
    );
    let growth = peak.saturating_sub(base);
    assert!(
        growth < 128 << 10,
        "faed's RSS grew by {} MiB under a flood of unread replies (max_pending_reply_bytes = 1 MiB)",
        growth >> 10
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a ping took {slowest:?} during the flood"
    );
    drop(flood);
    assert_eq!(
        c.call(&lc_get_call(7, b"big")).success("lc_get", 7),
        &Val::Bin(value.clone())
    );

    // A slow reader of replies beyond the limit still gets every one, in order, once it reads.
    let mut slow = faed.connect(Transport::Framed);
    let batch: Vec<u8> = (0..16)
        .flat_map(|i| framed(&lc_get_call(i, b"big")))
        .collect();
    slow.send_raw(&batch);
    thread::sleep(Duration::from_millis(300));
    for i in 0..16 {
        let m = slow
            .recv()
            .unwrap_or_else(|e| panic!("slow reader's reply {i}: {e}"));
        assert_eq!(
            m.success("lc_get", i),
            &Val::Bin(value.clone()),
            "reply {i}"
        );
    }
    slow.call(&ping_call(99)).success("ping", 99);
    faed.assert_alive();
}

#[test]
fn flood_of_large_lc_set_calls_stays_within_bounds() {
    // 160 MiB of 1 MiB values under distinct keys, replies left unread; the cache holds 16 MiB.
    let faed = Faed::start_with(
        "max_pending_reply_bytes = 1048576",
        "[lcache]\nmax_bytes = 16777216\nshards = 4\n",
    );
    let addr = faed.addr();
    faed.assert_alive();
    let base = faed.rss_kib();
    let mut flood = faed.connect(Transport::Buffered);
    let mut w = flood.w.try_clone().expect("clone");
    w.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    const N: i32 = 160;
    let writer = thread::spawn(move || {
        let value = vec![0x42_u8; 1 << 20];
        for i in 0..N {
            w.write_all(&lc_set_call(i, format!("k{i}").as_bytes(), &value))?;
        }
        Ok::<_, std::io::Error>(())
    });
    let t = Instant::now();
    let (mut peak, mut slowest, mut pings) = (base, Duration::ZERO, 0);
    while !writer.is_finished() && t.elapsed() < Duration::from_secs(20) {
        peak = peak.max(faed.rss_kib());
        slowest = slowest.max(timed_ping(addr));
        pings += 1;
        thread::sleep(Duration::from_millis(50));
    }
    writer
        .join()
        .expect("flood writer")
        .expect("write 160 MiB of lc_set");
    let sent = t.elapsed();
    // Now read the replies: every call answered, in order.
    for i in 0..N {
        let m = flood
            .recv()
            .unwrap_or_else(|e| panic!("lc_set reply {i}: {e}"));
        assert_eq!(m.success("lc_set", i), &Val::Bool(true), "lc_set {i}");
    }
    peak = peak.max(faed.rss_kib());
    println!(
        "160 x 1 MiB lc_set sent in {sent:?}; faed RSS {base} KiB before, peak {peak} KiB; {pings} pings \
         meanwhile, slowest {slowest:?}"
    );
    let growth = peak.saturating_sub(base);
    assert!(
        growth < 64 << 10,
        "faed's RSS grew by {} MiB (cache bound 16 MiB)",
        growth >> 10
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a ping took {slowest:?} during the flood"
    );
    let last = flood.call(&lc_get_call(1000, format!("k{}", N - 1).as_bytes()));
    assert_eq!(
        last.success("lc_get", 1000),
        &Val::Bin(vec![0x42_u8; 1 << 20])
    );
    faed.assert_alive();
}

// ---- 13. draining on SIGTERM ------------------------------------------------------------------------------

#[test]
fn sigterm_drains_calls_in_flight_then_exits_0() {
    let mut faed = Faed::start("max_pending_reply_bytes = 1048576\nshutdown_timeout_ms = 5000");
    let addr = faed.addr();
    let value = vec![0x5a_u8; 256 << 10];
    let mut c = faed.connect(Transport::Buffered);
    assert_eq!(
        c.call(&lc_set_call(1, b"v", &value)).success("lc_set", 1),
        &Val::Bool(true)
    );
    // 16 calls with 4 MiB of replies (more than max_pending_reply_bytes and the socket buffers), then a noop.
    let mut batch = Vec::new();
    for i in 0..16 {
        batch.extend(lc_get_call(100 + i, b"v"));
    }
    batch.extend(noop_call(200, 77));
    c.send_raw(&batch);
    // The server is at work on them once the first reply bytes arrive.
    assert!(!c.r.fill_buf().expect("first reply bytes").is_empty());

    faed.signal(libc::SIGTERM);
    let t = Instant::now();
    thread::sleep(Duration::from_millis(300));
    // Draining: no new session is served.
    if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        let mut late = Conn::from_stream(s, Transport::Buffered);
        late.set_read_timeout(Duration::from_secs(1));
        if late.send_lossy(&ping_call(300)) {
            if let Ok(m) = late.recv() {
                panic!("a connection made after SIGTERM was served: {m:?}");
            }
        }
    }
    // Every call sent before SIGTERM is answered, in order.
    for i in 0..16 {
        let m = c
            .recv()
            .unwrap_or_else(|e| panic!("reply {i} after SIGTERM: {e}"));
        assert_eq!(
            m.success("lc_get", 100 + i),
            &Val::Bin(value.clone()),
            "reply {i}"
        );
    }
    assert_eq!(
        c.recv().expect("noop reply").success("noop", 200),
        &Val::I32(77)
    );
    c.expect_closed(CLOSE_WITHIN);
    let status = faed
        .wait_exit(Duration::from_secs(6))
        .expect("faed still running 6 s after SIGTERM");
    let took = t.elapsed();
    println!("drained and exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "faed exited with {status}");
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?} (shutdown_timeout_ms = 5000)"
    );
}

#[test]
fn sigterm_with_a_client_not_reading_exits_after_the_shutdown_timeout() {
    let mut faed = Faed::start("max_pending_reply_bytes = 1048576\nshutdown_timeout_ms = 1500");
    let value = vec![0x33_u8; 256 << 10];
    let mut c = faed.connect(Transport::Buffered);
    assert_eq!(
        c.call(&lc_set_call(1, b"v", &value)).success("lc_set", 1),
        &Val::Bool(true)
    );
    // 16 MiB of replies: more than the server's send buffer (up to tcp_wmem's 4 MiB) and the client's
    // unread receive buffer can take, so some stay in faed (with 4 MiB, faed could hand them all to the
    // kernel under load, count the session drained and exit before the timeout).
    let batch: Vec<u8> = (0..64).flat_map(|i| lc_get_call(i, b"v")).collect();
    c.send_raw(&batch);
    assert!(!c.r.fill_buf().expect("first reply bytes").is_empty());
    // An idle session too: it has nothing in flight and must not hold the exit up.
    let _idle = faed.connect(Transport::Buffered);
    faed.signal(libc::SIGTERM);
    let t = Instant::now();
    let status = faed
        .wait_exit(Duration::from_secs(5))
        .expect("faed still running 5 s after SIGTERM");
    let took = t.elapsed();
    println!("exited {status} {took:?} after SIGTERM with a client not reading");
    assert!(status.success(), "faed exited with {status}");
    assert!(
        took >= Duration::from_millis(1200),
        "faed gave up on unsent replies after {took:?}, before shutdown_timeout_ms = 1500"
    );
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} (shutdown_timeout_ms = 1500)"
    );
}

// ---- 14. CPU under a large unframed message --------------------------------------------------------------

/// User plus system CPU seconds faed has used (/proc/PID/stat).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[test]
fn large_unframed_message_arriving_in_pieces_costs_linear_cpu() {
    // An unframed message has no length: its end is found by walking it. Walking it again from the start
    // on every read makes a 16 MB message of a million small values cost a million steps per read.
    let faed = Faed::start("threads = 1");
    let addr = faed.addr();
    let n = 1_000_000;
    let msg = call("ping", 141, |e| {
        ctx_arg(e);
        e.field_begin(ttype::LIST, 9);
        e.list_begin(ttype::STRING, n);
        for _ in 0..n {
            e.bytes(b"abcdefghijkl");
        }
    });
    let mut c = faed.connect(Transport::Buffered);
    let mut w = c.w.try_clone().expect("clone");
    let cpu0 = cpu_secs(faed.pid());
    let t = Instant::now();
    let writer = thread::spawn(move || {
        for piece in msg.chunks(16 << 10) {
            w.write_all(piece)?;
            thread::sleep(Duration::from_micros(300));
        }
        Ok::<_, std::io::Error>(())
    });
    // Another client on the same (only) event loop.
    let mut worst = Duration::ZERO;
    while !writer.is_finished() && t.elapsed() < Duration::from_secs(20) {
        worst = worst.max(timed_ping_within(addr, Duration::from_secs(20)));
        thread::sleep(Duration::from_millis(50));
    }
    writer.join().expect("writer").expect("upload the message");
    c.set_read_timeout(Duration::from_secs(20));
    c.recv()
        .expect("reply to the large message")
        .success("ping", 141);
    let cpu = cpu_secs(faed.pid()) - cpu0;
    println!(
        "16 MB unframed message in 16 KiB pieces: answered after {:?}, faed CPU {cpu:.2} s, slowest ping \
         meanwhile {worst:?}",
        t.elapsed()
    );
    assert!(
        cpu < 2.0,
        "faed spent {cpu:.2} s of CPU receiving one 16 MB message"
    );
    faed.assert_alive();
}

#[test]
fn a_panic_on_an_event_loop_ends_faed_with_a_non_zero_status() {
    // The test-only trigger: the kernel loop that accepts a connection panics. faed must exit (so that
    // systemd restarts it) rather than run on with a dead loop holding its sessions.
    let dir = unique_dir();
    let mut spec = FaedSpec::new(&dir);
    spec.env.push(("FAED_TEST_PANIC".into(), "kernel".into()));
    let mut faed = Faed::spawn(&spec);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], spec.admin_port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "faed did not start:\n{}",
            faed.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut c = TcpStream::connect_timeout(&spec.addr(), Duration::from_secs(2)).expect("connect");
    let _ = c.write_all(&ping_call(1));
    let status = faed.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "faed still running after its loop panicked:\n{}",
            faed.log()
        )
    });
    let log = faed.log();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(70), "faed exited with {status}\n{log}");
    assert!(
        log.contains("panic") && log.contains("FAED_TEST_PANIC"),
        "{log}"
    );
}
