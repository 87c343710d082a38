//! The bench-only peer: FunServant on the Apache `thrift` crate's own server parts (see
//! `fae::client::peer` for what it serves and why it is fair).
//!
//! Run: `cargo run --release --example thrift_peer -- 127.0.0.1:9002 [buffered|framed]`

use std::net::TcpListener;
use std::sync::Arc;

use fae::client::fun_rpc::FunServantSyncProcessor;
use fae::client::peer::{serve, Peer};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9002".into());
    let framed = args.next().as_deref() == Some("framed");
    let processor = Arc::new(FunServantSyncProcessor::new(Peer::default()));
    let listener = TcpListener::bind(&addr)?;
    eprintln!(
        "thrift_peer: serving on {addr} ({})",
        if framed { "framed" } else { "buffered" }
    );
    for stream in listener.incoming() {
        let stream = stream?;
        let p = processor.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, framed, &p);
        });
    }
    Ok(())
}
