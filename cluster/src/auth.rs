//! Who may speak on the cluster port: a shared secret and a mutual challenge–response on every connection.
//!
//! Every member holds the same secret (`cluster.secret_file`). A connection opens with three frames, each
//! bounded to [`MAX_HANDSHAKE_FRAME`] and the whole exchange to [`HANDSHAKE_TIMEOUT`]:
//!
//! ```text
//! client → server  HELLO  version | client id (u64 BE) | client nonce (32 random bytes)
//! server → client  HELLO  version | server id | server nonce | HMAC-SHA256(secret, "fae-cluster/1 server" | cn | sn | cid | sid)
//! client → server  PROOF  HMAC-SHA256(secret, "fae-cluster/1 client" | sn | cn | cid | sid)
//! ```
//!
//! Each side proves it knows the secret over the other's fresh nonce, so a recorded exchange cannot be
//! replayed and neither side's proof can be reflected as the other's (the labels differ). A side that fails
//! gets a REFUSED frame saying why, then a close. The server then binds the connection to the client's id:
//! a raft message on it from any other sender is dropped and counted (see `transport`).
//!
//! Why this and not mutual TLS: the threat the cluster port faces is membership (who may join, vote, take
//! vbuckets, make members leave), which a secret answers with one file to distribute and no certificates to
//! issue, rotate and expire; it adds one small crate (`hmac`, on the `sha2` already in the tree) where
//! rustls would add a TLS stack and a crypto provider to a 2-core build. What it does not give is
//! confidentiality or protection from an on-path attacker after the handshake (frames are not encrypted or
//! signed): run the cluster port on a private network, or under WireGuard/IPsec where the path is not
//! trusted. docs/ARCHITECTURE.md says the same.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ClusterError;

pub(crate) const KIND_HELLO: u8 = 4;
pub(crate) const KIND_PROOF: u8 = 5;
pub(crate) const KIND_REFUSED: u8 = 6;
const VERSION: u8 = 1;
const NONCE: usize = 32;
const TAG: usize = 32;
/// The largest frame accepted before a connection is authenticated (a REFUSED reason included).
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 512;
/// The whole handshake, from the connection's first byte.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest secret accepted: 16 bytes (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// The cluster secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Arc<[u8]>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// A secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, ClusterError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(ClusterError::Config(format!(
                "the cluster secret has {} bytes: at least {MIN_SECRET_BYTES} are needed (e.g. `head -c 32 \
                 /dev/urandom | base64 > secret`)",
                bytes.len()
            )));
        }
        Ok(ClusterSecret(bytes.into()))
    }

    /// Reads a secret file: its content less trailing whitespace (a final newline is not part of it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ClusterError> {
        let path = path.as_ref();
        let mut bytes = std::fs::read(path).map_err(|e| {
            ClusterError::Config(format!(
                "cannot read the cluster secret file {}: {e}",
                path.display()
            ))
        })?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        Self::new(bytes).map_err(|e| ClusterError::Config(format!("{}: {e}", path.display())))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8], cid: u64, sid: u64) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [
            label,
            first,
            second,
            &cid.to_be_bytes()[..],
            &sid.to_be_bytes()[..],
        ] {
            m.update(part);
        }
        m
    }

    fn tag(&self, label: &[u8], first: &[u8], second: &[u8], cid: u64, sid: u64) -> [u8; TAG] {
        self.mac(label, first, second, cid, sid)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is right, compared in constant time.
    fn check(
        &self,
        label: &[u8],
        first: &[u8],
        second: &[u8],
        cid: u64,
        sid: u64,
        tag: &[u8],
    ) -> bool {
        self.mac(label, first, second, cid, sid)
            .verify_slice(tag)
            .is_ok()
    }
}

const SERVER_LABEL: &[u8] = b"fae-cluster/1 server";
const CLIENT_LABEL: &[u8] = b"fae-cluster/1 client";

fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::getrandom(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

/// Why a handshake failed, for the log and the counters.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The other side does not know the secret (or has another one).
    BadProof,
    /// The other side runs without a secret, or spoke something else.
    NoHandshake,
    Io(io::Error),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadProof => f.write_str("authentication failed: the cluster secrets differ"),
            Refusal::NoHandshake => f.write_str(
                "no cluster handshake: one side runs without cluster.secret_file, the other with it",
            ),
            Refusal::Io(e) => write!(f, "cluster handshake: {e}"),
        }
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Refusal::Io(e)
    }
}

fn write_small(s: &mut TcpStream, kind: u8, payload: &[u8]) -> io::Result<()> {
    crate::transport::write_frame(s, kind, payload)?;
    s.flush()
}

/// Reads one handshake frame before `deadline`; never more than [`MAX_HANDSHAKE_FRAME`] bytes.
fn read_small(s: &mut TcpStream, deadline: Instant) -> Result<(u8, Vec<u8>), Refusal> {
    let mut head = [0u8; 4];
    read_by(s, &mut head, deadline)?;
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 || len > MAX_HANDSHAKE_FRAME {
        return Err(Refusal::NoHandshake);
    }
    let mut body = vec![0u8; len];
    read_by(s, &mut body, deadline)?;
    let kind = body.remove(0);
    Ok((kind, body))
}

fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn refuse(s: &mut TcpStream, why: &Refusal) {
    let _ = write_small(s, KIND_REFUSED, why.to_string().as_bytes());
}

/// A REFUSED frame's reason, or what else came.
fn unexpected(kind: u8, body: &[u8]) -> Refusal {
    if kind == KIND_REFUSED {
        let reason = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
        Refusal::Io(io::Error::new(
            ErrorKind::PermissionDenied,
            format!("refused by the other side: {reason}"),
        ))
    } else {
        Refusal::NoHandshake
    }
}

/// A client HELLO: the client's id and nonce.
pub(crate) fn client_hello(body: &[u8]) -> Option<(u64, &[u8])> {
    if body.len() != 1 + 8 + NONCE || body[0] != VERSION {
        return None;
    }
    Some((u64::from_be_bytes(body[1..9].try_into().ok()?), &body[9..]))
}

/// A server HELLO: the server's id, nonce and proof.
pub(crate) fn server_hello(body: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    if body.len() != 1 + 8 + NONCE + TAG || body[0] != VERSION {
        return None;
    }
    let id = u64::from_be_bytes(body[1..9].try_into().ok()?);
    Some((id, &body[9..9 + NONCE], &body[9 + NONCE..]))
}

/// The connecting side: proves itself as `me` and checks the server knows the secret. Returns the
/// server's id.
pub(crate) fn client(s: &mut TcpStream, secret: &ClusterSecret, me: u64) -> Result<u64, Refusal> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let cn = nonce()?;
    let mut hello = Vec::with_capacity(1 + 8 + NONCE);
    hello.push(VERSION);
    hello.extend_from_slice(&me.to_be_bytes());
    hello.extend_from_slice(&cn);
    write_small(s, KIND_HELLO, &hello)?;
    let (kind, body) = read_small(s, deadline)?;
    let Some((sid, sn, tag)) = (kind == KIND_HELLO).then(|| server_hello(&body)).flatten() else {
        return Err(unexpected(kind, &body));
    };
    if !secret.check(SERVER_LABEL, &cn, sn, me, sid, tag) {
        refuse(s, &Refusal::BadProof);
        return Err(Refusal::BadProof);
    }
    let proof = secret.tag(CLIENT_LABEL, sn, &cn, me, sid);
    write_small(s, KIND_PROOF, &proof)?;
    Ok(sid)
}

/// The accepting side: checks the client knows the secret and proves itself as `me`. Returns the id the
/// client authenticated as (0 for a tool such as `fae cluster status`, which is not a member).
pub(crate) fn server(s: &mut TcpStream, secret: &ClusterSecret, me: u64) -> Result<u64, Refusal> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (kind, body) = read_small(s, deadline)?;
    let Some((cid, cn)) = (kind == KIND_HELLO).then(|| client_hello(&body)).flatten() else {
        let why = unexpected(kind, &body);
        refuse(s, &Refusal::NoHandshake);
        return Err(why);
    };
    let sn = nonce()?;
    let mut hello = Vec::with_capacity(1 + 8 + NONCE + TAG);
    hello.push(VERSION);
    hello.extend_from_slice(&me.to_be_bytes());
    hello.extend_from_slice(&sn);
    hello.extend_from_slice(&secret.tag(SERVER_LABEL, cn, &sn, cid, me));
    write_small(s, KIND_HELLO, &hello)?;
    let (kind, body) = read_small(s, deadline)?;
    if kind != KIND_PROOF {
        return Err(unexpected(kind, &body));
    }
    if !secret.check(CLIENT_LABEL, &sn, cn, cid, me, &body) {
        refuse(s, &Refusal::BadProof);
        return Err(Refusal::BadProof);
    }
    Ok(cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_secret: &str,
        client_secret: &str,
    ) -> (Result<u64, String>, Result<u64, String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ss = ClusterSecret::new(server_secret.as_bytes()).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            server(&mut s, &ss, 7).map_err(|e| e.to_string())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let cs = ClusterSecret::new(client_secret.as_bytes()).unwrap();
        let client = client(&mut c, &cs, 9).map_err(|e| e.to_string());
        (t.join().unwrap(), client)
    }

    #[test]
    fn the_same_secret_authenticates_both_ways() {
        let (s, c) = pair("0123456789abcdef", "0123456789abcdef");
        assert_eq!(s, Ok(9));
        assert_eq!(c, Ok(7));
    }

    #[test]
    fn another_secret_is_refused_on_both_sides() {
        let (s, c) = pair("0123456789abcdef", "0123456789abcdeX");
        assert!(c.unwrap_err().contains("secrets differ"));
        assert!(s.is_err());
    }

    #[test]
    fn a_short_secret_is_refused_and_debug_hides_it() {
        assert!(ClusterSecret::new(*b"short").is_err());
        let s = ClusterSecret::new(*b"0123456789abcdef-hidden").unwrap();
        assert!(!format!("{s:?}").contains("hidden"));
    }

    #[test]
    fn a_client_without_the_handshake_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let ss = ClusterSecret::new(*b"0123456789abcdef").unwrap();
            server(&mut s, &ss, 7).map_err(|e| e.to_string())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        // A raft frame straight away, as a node without the secret sends.
        crate::transport::write_frame(&mut c, crate::transport::KIND_RAFT, b"x").unwrap();
        assert!(t.join().unwrap().is_err());
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert_eq!(buf.get(4), Some(&KIND_REFUSED), "{buf:?}");
    }

    #[test]
    fn a_silent_client_is_cut_off_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let ss = ClusterSecret::new(*b"0123456789abcdef").unwrap();
            let t0 = Instant::now();
            let r = server(&mut s, &ss, 7).map_err(|e| e.to_string());
            (r, t0.elapsed())
        });
        let _c = TcpStream::connect(addr).unwrap();
        let (r, took) = t.join().unwrap();
        assert!(r.unwrap_err().contains("too long"));
        assert!(took < HANDSHAKE_TIMEOUT * 3, "{took:?}");
    }
}
