//! The admin port's HTTP/1.1 server: `httparse` (the parser hyper is built on) reads requests, a thread per
//! connection serves them, bounded three ways: at most `admin.max_connections` connections at once (past it
//! a 503 and a close), a deadline for the whole request (`admin.request_timeout_ms`: a client sending a byte
//! at a time is cut off, and holds only its own thread meanwhile), and sizes (16 KiB of head, 64 headers,
//! `admin.max_body_bytes` of body, known from Content-Length). One request per connection.
//!
//! Why not a framework: the admin port serves a handful of requests a second from counters; hyper or axum
//! would bring an async runtime that nothing else in faed uses, and tiny_http has no deadline for a request
//! (a trickling client keeps one of its threads for ever), which is the bug this server replaced.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut b: String = body.into();
        if !b.ends_with('\n') {
            b.push('\n');
        }
        Self::new(status, "text/plain; charset=utf-8", b)
    }

    pub fn json(v: &serde_json::Value) -> Response {
        Self::new(200, "application/json", v.to_string())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Limits of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub request_timeout: Duration,
    pub max_body: usize,
}

/// Serves `listener` on a thread of its own; `handle` answers each request.
pub fn serve(
    listener: TcpListener,
    limits: Limits,
    handle: Arc<dyn Fn(Request) -> Response + Send + Sync>,
) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("fae-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
                    open.fetch_sub(1, Ordering::AcqRel);
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = write_response(
                        &mut stream,
                        Response::text(503, "too many admin connections"),
                    );
                    continue;
                }
                let (open, handle) = (open.clone(), handle.clone());
                let spawned = std::thread::Builder::new()
                    .name("fae-admin-conn".into())
                    .spawn(move || {
                        if let Err(e) = connection(stream, limits, handle.as_ref()) {
                            tracing::debug!(error = %e, "admin connection");
                        }
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start an admin connection thread");
                }
            }
        })?;
    Ok(())
}

fn connection(
    mut s: TcpStream,
    limits: Limits,
    handle: &(dyn Fn(Request) -> Response + Send + Sync),
) -> std::io::Result<()> {
    let peer = s.peer_addr()?;
    let deadline = Instant::now() + limits.request_timeout;
    s.set_write_timeout(Some(limits.request_timeout))?;
    let response = match read_request(&mut s, peer, deadline, limits.max_body) {
        Ok(req) => handle(req),
        Err(r) => r,
    };
    write_response(&mut s, response)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Reads more bytes into `buf`, within what is left of `deadline`.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<usize, Response> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Response::text(
            408,
            "the request did not arrive in time (admin.request_timeout_ms)",
        ));
    }
    s.set_read_timeout(Some(left))
        .map_err(|_| Response::text(400, "bad socket"))?;
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk) {
        Ok(0) => Err(Response::text(400, "the connection closed mid-request")),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(Response::text(
                408,
                "the request did not arrive in time (admin.request_timeout_ms)",
            ))
        }
        Err(_) => Err(Response::text(400, "the connection failed mid-request")),
    }
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A whole request, which used this many bytes of the buffer.
    Complete(Request, usize),
}

/// Parses one request from `buf`, bounded: a head of at most 16 KiB and 64 headers, a body of at most
/// `max_body` bytes announced by Content-Length (no chunked bodies). Pure, so the fuzz target drives it.
pub fn parse(buf: &[u8], peer: SocketAddr, max_body: usize) -> Result<Parsed, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEAD {
                return Err(Response::text(431, "request head larger than 16 KiB"));
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::text(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(Response::text(400, format!("malformed request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(Response::text(431, "request head larger than 16 KiB"));
    }
    let path_full = parsed.path.unwrap_or("/");
    let (path, query) = path_full.split_once('?').unwrap_or((path_full, ""));
    let mut req = Request {
        method: parsed.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: Vec::new(),
        peer,
    };
    if req.header("transfer-encoding").is_some() {
        return Err(Response::text(411, "send the body with a Content-Length"));
    }
    let len: usize = match req.header("content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Response::text(400, "Content-Length is not a number"))?,
    };
    if len > max_body {
        return Err(Response::text(
            413,
            format!("body of {len} bytes: at most {max_body} (admin.max_body_bytes)"),
        ));
    }
    if buf.len() < head_len + len {
        return Ok(Parsed::Partial);
    }
    req.body = buf[head_len..head_len + len].to_vec();
    Ok(Parsed::Complete(req, head_len + len))
}

fn read_request(
    s: &mut TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    max_body: usize,
) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Parsed::Complete(req, _) = parse(&buf, peer, max_body)? {
            return Ok(req);
        }
        fill(s, &mut buf, deadline)?;
    }
}

fn write_response(s: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(&r.body)
}
