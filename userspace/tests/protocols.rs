//! The compact protocol and the header transports against the real faed binary: calls in every dialect are
//! answered in their own dialect (read back with the Apache `thrift` crate's decoders, not fae's), and the
//! robustness attacks of `robustness.rs` repeated for compact and both header formats: absurd varints,
//! negative and overlong lengths, deep nesting, huge containers, truncated messages, broken headers. Each
//! gets a clear PROTOCOL_ERROR in the dialect it was sent in, then the close; a session opened before the
//! attacks is still served after them, and faed's RSS stays bounded. Also: the unix socket, its mode, and a
//! stale socket file replaced at start.
//!
//! Run alone: `cargo test -p fae --test protocols`.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use fae::wire::header::{self as hdr, HeaderKind};
use fae::wire::{Encoder, Protocol};
use thrift::protocol::{
    TBinaryInputProtocol, TCompactInputProtocol, TInputProtocol, TMessageType, TType,
};

const AT_ONCE: Duration = Duration::from_secs(2);
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// How a test writes its messages.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dialect {
    Buffered,
    Framed,
    Header(HeaderKind),
}

const DIALECTS: [Dialect; 4] = [
    Dialect::Buffered,
    Dialect::Framed,
    Dialect::Header(HeaderKind::THeader),
    Dialect::Header(HeaderKind::TTHeader),
];

/// `msg` (in `proto`) as sent in `d`.
fn wrap(d: Dialect, proto: Protocol, msg: &[u8]) -> Vec<u8> {
    match d {
        Dialect::Buffered => msg.to_vec(),
        Dialect::Framed => framed(msg),
        Dialect::Header(kind) => {
            let mut out = Vec::new();
            let info: &[(&[u8], &[u8])] = &[(b"caller", b"protocols-test")];
            hdr::request(&mut out, kind, 0x5eed, proto, info, msg);
            out
        }
    }
}

/// A call in `proto`: `body` writes the arguments.
fn call_in(
    proto: Protocol,
    name: &str,
    seqid: i32,
    body: impl FnOnce(&mut Encoder<'_>),
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::of(proto, &mut out);
    e.message_begin(name.as_bytes(), fae::wire::mtype::CALL, seqid);
    body(&mut e);
    e.stop();
    out
}

fn ctx(e: &mut Encoder<'_>) {
    e.field_begin(fae::wire::ttype::STRUCT, 1);
    e.field_i64(1, 42);
    e.field_bytes(2, b"protocols");
    e.field_i64(3, 7);
    e.stop();
}

/// One reply as the `thrift` crate reads it: name, type, seqid, and the result struct's fields (id, type,
/// and a string or i64 value when it is one), or the exception's (message, type).
#[derive(Debug)]
struct Reply {
    name: String,
    kind: TMessageType,
    seqid: i32,
    fields: Vec<(i16, TType, Option<String>, Option<i64>)>,
    error: Option<(String, i32)>,
    /// Header replies: the frame's sequence id.
    header_seq: Option<u32>,
}

fn decode(i: &mut dyn TInputProtocol) -> thrift::Result<Reply> {
    let m = i.read_message_begin()?;
    let mut r = Reply {
        name: m.name,
        kind: m.message_type,
        seqid: m.sequence_number,
        fields: Vec::new(),
        error: None,
        header_seq: None,
    };
    if r.kind == TMessageType::Exception {
        let e = thrift::Error::read_application_error_from_in_protocol(i)?;
        r.error = Some((e.message, e.kind as i32));
        return Ok(r);
    }
    i.read_struct_begin()?;
    loop {
        let f = i.read_field_begin()?;
        if f.field_type == TType::Stop {
            break;
        }
        let id = f.id.unwrap_or(-1);
        let (s, n) = match f.field_type {
            TType::String => (
                Some(String::from_utf8_lossy(&i.read_bytes()?).into_owned()),
                None,
            ),
            TType::I64 => (None, Some(i.read_i64()?)),
            TType::I32 => (None, Some(i.read_i32()?.into())),
            TType::Bool => (None, Some(i.read_bool()?.into())),
            TType::Struct => {
                // A declared exception: its message (field 11 of TCacheMissed) is enough here.
                let mut text = None;
                i.read_struct_begin()?;
                loop {
                    let g = i.read_field_begin()?;
                    if g.field_type == TType::Stop {
                        break;
                    }
                    if g.field_type == TType::String {
                        text = Some(String::from_utf8_lossy(&i.read_bytes()?).into_owned());
                    } else {
                        i.skip(g.field_type)?;
                    }
                    i.read_field_end()?;
                }
                i.read_struct_end()?;
                (text, None)
            }
            t => {
                i.skip(t)?;
                (None, None)
            }
        };
        r.fields.push((id, f.field_type, s, n));
        i.read_field_end()?;
    }
    i.read_struct_end()?;
    i.read_message_end()?;
    Ok(r)
}

fn in_protocol<'a>(proto: Protocol, r: &'a mut dyn Read) -> Box<dyn TInputProtocol + 'a> {
    match proto {
        Protocol::Binary => Box::new(TBinaryInputProtocol::new(r, true)),
        Protocol::Compact => Box::new(TCompactInputProtocol::new(r)),
    }
}

/// Reads one reply sent in `d`; the protocol is `proto` (a header reply says its own, and must match).
fn read_reply(s: &mut TcpStream, d: Dialect, proto: Protocol) -> thrift::Result<Reply> {
    let frame = |s: &mut TcpStream| -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        assert!(n <= 16 << 20, "reply frame of {n} bytes");
        let mut body = vec![0u8; n];
        s.read_exact(&mut body)?;
        Ok(body)
    };
    match d {
        Dialect::Buffered => decode(&mut *in_protocol(proto, s)),
        Dialect::Framed => {
            let body = frame(s)?;
            let mut rd = &body[..];
            let r = decode(&mut *in_protocol(proto, &mut rd));
            r
        }
        Dialect::Header(kind) => {
            // The header read here by hand (not by fae's parser): magic, flags, seq, size, protocol id.
            let f = frame(s)?;
            assert_eq!(f[0..2], kind.magic(), "reply magic");
            let seq = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
            let words = u16::from_be_bytes([f[8], f[9]]) as usize;
            let id = f[10];
            let want = if proto == Protocol::Compact { 2 } else { 0 };
            assert_eq!(id, want, "reply header's protocol id");
            let mut payload = &f[10 + 4 * words..];
            let r = decode(&mut *in_protocol(proto, &mut payload));
            let mut r = r?;
            r.header_seq = Some(seq);
            Ok(r)
        }
    }
}

fn open(faed: &Faed) -> TcpStream {
    let s = TcpStream::connect_timeout(&faed.addr(), IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Every in-memory method that needs no setup, in each dialect and protocol, answered in kind; the error
/// paths alike (TCacheMissed, an invalid Context, an unknown method).
#[test]
fn every_dialect_is_answered_in_kind() {
    let faed = Faed::start("");
    for proto in [Protocol::Binary, Protocol::Compact] {
        for d in DIALECTS {
            let what = format!("{d:?} {proto:?}");
            let mut s = open(&faed);
            let mut seq = 0;
            let mut ask = |s: &mut TcpStream, name: &str, body: &dyn Fn(&mut Encoder<'_>)| {
                seq += 1;
                let msg = call_in(proto, name, seq, body);
                s.write_all(&wrap(d, proto, &msg)).unwrap();
                let r = read_reply(s, d, proto).unwrap_or_else(|e| panic!("{what} {name}: {e}"));
                assert_eq!((r.name.as_str(), r.seqid), (name, seq), "{what}");
                if let Some(h) = r.header_seq {
                    assert_eq!(h, 0x5eed, "{what}: the header's sequence id is echoed");
                }
                r
            };
            let r = ask(&mut s, "noop", &|e| e.field_i32(1, -12345));
            assert_eq!(r.fields[0].3, Some(-12345), "{what} noop");
            let r = ask(&mut s, "ping", &ctx);
            assert!(
                r.fields[0].2.as_deref().unwrap().starts_with("ver:"),
                "{what}"
            );
            let key = format!("k-{d:?}-{proto:?}");
            let r = ask(&mut s, "lc_set", &|e| {
                ctx(e);
                e.field_bytes(2, key.as_bytes());
                e.field_bytes(3, b"value \x00\xff");
            });
            assert_eq!(r.fields[0].3, Some(1), "{what} lc_set");
            let r = ask(&mut s, "lc_get", &|e| {
                ctx(e);
                e.field_bytes(2, key.as_bytes());
            });
            assert_eq!(r.fields[0].2.as_deref(), Some("value \0\u{fffd}"), "{what}");
            let r = ask(&mut s, "lc_get", &|e| {
                ctx(e);
                e.field_bytes(2, b"never-set");
            });
            assert_eq!(r.fields[0].0, 1, "{what}: TCacheMissed is result field 1");
            assert!(r.fields[0].2.as_deref().unwrap().contains("never-set"));
            let r = ask(&mut s, "id_next", &ctx);
            assert!(r.fields[0].3.unwrap() > 0, "{what}");
            let r = ask(&mut s, "id_next", &|e| {
                e.field_begin(fae::wire::ttype::STRUCT, 1);
                e.field_i64(1, 0); // rid 0: invalid
                e.field_bytes(2, b"x");
                e.field_i64(3, 0);
                e.stop();
            });
            let (text, kind) = r.error.expect("an invalid Context is an application error");
            assert!(text.contains("rid"), "{what}: {text}");
            assert_ne!(kind, PROTOCOL_ERROR, "{what}");
            let r = ask(&mut s, "no_such_method", &|e| e.field_i32(1, 1));
            assert_eq!(r.error.map(|e| e.1), Some(1), "{what}: UNKNOWN_METHOD");
            assert_eq!(r.kind, TMessageType::Exception);
            // the session carries on
            let r = ask(&mut s, "noop", &|e| e.field_i32(1, 9));
            assert_eq!(r.fields[0].3, Some(9), "{what}");
        }
    }
    faed.assert_alive();
}

/// Sends `bytes` on a new connection and expects a PROTOCOL_ERROR in dialect `d` and protocol `proto`, at
/// once, then the close. Returns the error's text.
fn refused(faed: &Faed, d: Dialect, proto: Protocol, bytes: &[u8]) -> String {
    let mut s = open(faed);
    s.set_read_timeout(Some(AT_ONCE)).unwrap();
    let t = Instant::now();
    let _ = s.write_all(bytes); // faed may close before all of it is written
    let r = read_reply(&mut s, d, proto).unwrap_or_else(|e| {
        panic!(
            "{d:?} {proto:?}: no PROTOCOL_ERROR for {:02x?}: {e}",
            &bytes[..bytes.len().min(32)]
        )
    });
    assert!(t.elapsed() < AT_ONCE, "the error took {:?}", t.elapsed());
    let (text, kind) = r
        .error
        .clone()
        .unwrap_or_else(|| panic!("{d:?}: expected an exception, got {r:?}"));
    assert_eq!(kind, PROTOCOL_ERROR, "{d:?} {proto:?}: {text}");
    assert!(!text.is_empty());
    // then the close, nothing more
    let mut buf = [0u8; 256];
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{d:?}: {n} bytes after the error: {:02x?}",
            &buf[..n.min(32)]
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{d:?}: {e} waiting for the close"),
    }
    text
}

/// The compact attacks, as message bytes in the compact protocol, each with a word its error must say.
fn compact_attacks() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let head = |name: &[u8]| {
        let mut m = vec![0x82, 0x21, 0x01, name.len() as u8];
        m.extend_from_slice(name);
        m
    };
    let mut v = Vec::new();
    // a sequence id varint of 11 bytes
    let mut m = vec![0x82, 0x21];
    m.extend_from_slice(&[0xff; 11]);
    v.push(("absurd varint", m, "varint"));
    // a string length of -1 (0xffffffff as a varint)
    let mut m = head(b"lc_get");
    m.extend_from_slice(&[0x18, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    v.push(("negative length", m, "negative"));
    // a method name claiming 2^31-1 bytes
    let mut m = vec![0x82, 0x21, 0x01, 0xff, 0xff, 0xff, 0xff, 0x07];
    m.extend_from_slice(b"ping");
    v.push(("overlong name", m, "exceeds"));
    // 10,000 nested structs
    let mut m = head(b"ping");
    m.extend(std::iter::repeat_n(0x1c, 10_000));
    v.push(("deep nesting", m, "nesting"));
    // a list<i64> claiming 2^30 elements
    let mut m = head(b"ping");
    m.extend_from_slice(&[0x19, 0xf6, 0x80, 0x80, 0x80, 0x80, 0x04]);
    v.push(("huge container", m, "container"));
    // a bad field type (compact type 14)
    let mut m = head(b"ping");
    m.push(0x1e);
    v.push(("bad type", m, "type"));
    v
}

#[test]
fn compact_attacks_get_a_protocol_error_in_every_transport() {
    let faed = Faed::start("");
    let mut bystander = open(&faed);
    let rss0 = faed.rss_kib();
    for (what, msg, word) in compact_attacks() {
        for d in DIALECTS {
            let text = refused(
                &faed,
                d,
                Protocol::Compact,
                &wrap(d, Protocol::Compact, &msg),
            );
            println!("{what} ({d:?}): {text}");
            // Inside a frame a name longer than the frame is a truncated message.
            let word = if word == "exceeds" && d != Dialect::Buffered {
                "truncated"
            } else {
                word
            };
            assert!(
                text.contains(word),
                "{what} ({d:?}): {text:?} should say {word:?}"
            );
        }
    }
    // A truncated compact message: in a frame or a header frame it is whole-or-malformed at once.
    let whole = call_in(Protocol::Compact, "lc_get", 1, |e| {
        ctx(e);
        e.field_bytes(2, b"some key");
    });
    let cut = &whole[..whole.len() - 4];
    for d in &DIALECTS[1..] {
        let text = refused(
            &faed,
            *d,
            Protocol::Compact,
            &wrap(*d, Protocol::Compact, cut),
        );
        assert!(text.contains("truncated"), "{d:?}: {text}");
    }
    // Unframed, a truncated message is only incomplete: the message timeout ends it, not an error.
    bystander
        .write_all(&call_in(Protocol::Compact, "noop", 5, |e| {
            e.field_i32(1, 5)
        }))
        .unwrap();
    let r = read_reply(&mut bystander, Dialect::Buffered, Protocol::Compact).unwrap();
    assert_eq!(
        (r.seqid, r.fields[0].3),
        (5, Some(5)),
        "the bystander session is served"
    );
    let grew = faed.rss_kib().saturating_sub(rss0);
    assert!(grew < 64 << 10, "RSS grew by {grew} KiB under the attacks");
    faed.assert_alive();
}

#[test]
fn broken_header_frames_get_a_protocol_error() {
    let faed = Faed::start("");
    let mut bystander = open(&faed);
    let rss0 = faed.rss_kib();
    let ping = call_in(Protocol::Binary, "ping", 3, ctx);
    for kind in [HeaderKind::THeader, HeaderKind::TTHeader] {
        let d = Dialect::Header(kind);
        let good = wrap(d, Protocol::Binary, &ping);
        let mut attacks: Vec<(&str, Vec<u8>, &str)> = Vec::new();
        // a header size running past the frame
        let mut b = good.clone();
        b[12..14].copy_from_slice(&0x4000u16.to_be_bytes());
        attacks.push(("header size", b, "header size"));
        // an unknown protocol id
        let mut b = good.clone();
        b[14] = 9;
        attacks.push(("protocol id", b, "protocol id"));
        // the JSON protocol
        let mut b = good.clone();
        b[14] = 1;
        attacks.push(("json", b, "JSON"));
        // a zlib transform (one transform, id 1): refused, not misread
        let mut b = good.clone();
        b[15] = 1;
        b[16] = 1;
        attacks.push(("zlib", b, "zlib"));
        // an info block claiming more headers than the header holds
        let mut b = good.clone();
        let count_at = 17;
        match kind {
            HeaderKind::THeader => b[count_at] = 0x7f,
            HeaderKind::TTHeader => b[count_at..count_at + 2].copy_from_slice(&[0x7f, 0xff]),
        }
        attacks.push(("info count", b, "count"));
        // a frame claiming 2^31-1 bytes: refused on its first bytes
        let mut b = good.clone();
        b[..4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        b.truncate(14);
        attacks.push(("absurd length", b, "exceeds"));
        // a payload that is not a Thrift message
        let mut junk = Vec::new();
        hdr::request(
            &mut junk,
            kind,
            1,
            Protocol::Binary,
            &[],
            b"\x00\x01\x02\x03junk",
        );
        attacks.push(("junk payload", junk, "version"));
        for (what, bytes, word) in attacks {
            let text = refused(&faed, d, Protocol::Binary, &bytes);
            println!("{kind:?} {what}: {text}");
            assert!(
                text.contains(word),
                "{kind:?} {what}: {text:?} should say {word:?}"
            );
        }
        // a connection that changes transport after its first frame
        let mut s = open(&faed);
        s.write_all(&good).unwrap();
        let r = read_reply(&mut s, d, Protocol::Binary).unwrap();
        assert_eq!(r.name, "ping");
        let mut other = good.clone();
        let other_magic = match kind {
            HeaderKind::THeader => HeaderKind::TTHeader.magic(),
            HeaderKind::TTHeader => HeaderKind::THeader.magic(),
        };
        other[4..6].copy_from_slice(&other_magic);
        s.write_all(&other).unwrap();
        let r = read_reply(&mut s, d, Protocol::Binary).unwrap();
        assert_eq!(
            r.error.map(|e| e.1),
            Some(PROTOCOL_ERROR),
            "{kind:?}: magic changed"
        );
    }
    bystander.write_all(&ping).unwrap();
    let r = read_reply(&mut bystander, Dialect::Buffered, Protocol::Binary).unwrap();
    assert_eq!(r.name, "ping", "the bystander session is served");
    let grew = faed.rss_kib().saturating_sub(rss0);
    assert!(grew < 64 << 10, "RSS grew by {grew} KiB under the attacks");
    faed.assert_alive();
}

/// Kitex's TTHeaderFramed form (a length before the payload) is answered the same way.
#[test]
fn ttheader_framed_payload_is_answered_in_kind() {
    let faed = Faed::start("");
    let msg = call_in(Protocol::Binary, "noop", 77, |e| e.field_i32(1, 77));
    let mut s = open(&faed);
    s.write_all(&wrap(
        Dialect::Header(HeaderKind::TTHeader),
        Protocol::Binary,
        &framed(&msg),
    ))
    .unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).unwrap();
    let words = u16::from_be_bytes([f[8], f[9]]) as usize;
    let payload = &f[10 + 4 * words..];
    let inner = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    assert_eq!(
        inner,
        payload.len() - 4,
        "the reply's payload has its own length too"
    );
    let r = decode(&mut TBinaryInputProtocol::new(&mut &payload[4..], true)).unwrap();
    assert_eq!((r.seqid, r.fields[0].3), (77, Some(77)));
}

/// The unix socket: served like TCP, its file's mode as configured, a stale file replaced at start and the
/// file removed at exit; an existing non-socket file is refused with a clear error.
#[test]
fn unix_socket_is_served_and_cleaned_up() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let dir = std::env::temp_dir().join(format!("fae-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("faed.sock");
    // a stale socket file: bound, then its listener gone
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let keys = format!(
        "unix_socket = \"{}\"\nunix_socket_mode = 0o600\n",
        path.display()
    );
    let faed = Faed::start(&keys);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket file mode");
    for proto in [Protocol::Binary, Protocol::Compact] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        for seq in 1..=3 {
            s.write_all(&call_in(proto, "noop", seq, |e| e.field_i32(1, seq * 10)))
                .unwrap();
            let r = decode(&mut *in_protocol(proto, &mut s)).unwrap();
            assert_eq!((r.seqid, r.fields[0].3), (seq, Some(i64::from(seq) * 10)));
        }
        // an attack on the unix socket: the same error, the same close
        s.write_all(&[
            0x82, 0x21, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ])
        .unwrap();
        let r = decode(&mut *in_protocol(Protocol::Compact, &mut s)).unwrap();
        assert_eq!(r.error.map(|e| e.1), Some(PROTOCOL_ERROR));
    }
    // A second faed on the same path is refused: the file belongs to a live server.
    let second = FaedSpec::new(dir.join("second"));
    let config = second.dir.join("faed.toml");
    let text = config_text(second.port, second.admin_port, &keys, "", "");
    std::fs::write(&config, text).unwrap();
    let run_second = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_faed"))
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "a second faed started on the same socket"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run_second();
    assert!(err.contains("another server accepts"), "{err}");
    faed.assert_alive();
    drop(faed);
    assert!(
        !path.exists(),
        "faed removed its socket file when it stopped"
    );
    // A file that is not a socket is never removed.
    std::fs::write(&path, b"not a socket").unwrap();
    let err = run_second();
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A header frame's caller reaches the filters: the sampled call log names it.
#[test]
fn the_callers_service_from_a_header_reaches_the_call_log() {
    let dir = TempDir::new();
    let spec = FaedSpec {
        sections: "[metrics]\nsample_per_10000 = 10000\n".into(),
        log_level: "warn,fae::calls=info".into(),
        ..FaedSpec::new(dir.path().join("faed"))
    };
    let mut faed = Faed::spawn(&spec);
    faed.wait_ready(Duration::from_secs(10))
        .expect("faed ready");
    for kind in [HeaderKind::THeader, HeaderKind::TTHeader] {
        let mut s = open(&faed);
        let msg = call_in(Protocol::Binary, "ping", 1, ctx);
        s.write_all(&wrap(Dialect::Header(kind), Protocol::Binary, &msg))
            .unwrap();
        read_reply(&mut s, Dialect::Header(kind), Protocol::Binary).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while faed.log().matches("caller=protocols-test").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the sampled call log does not name the caller:\n{}",
            faed.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
