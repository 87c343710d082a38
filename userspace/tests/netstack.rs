//! The XDP path's session path without root: faed's own XDP loop (`engine::xdp::XdpLoop`: the smoltcp
//! stack, the connection driver, the sessions and servants) runs over an in-memory wire
//! (`fae_netstack::pipe`) instead of an AF_XDP socket. At the other end, a client smoltcp interface behind
//! smoltcp's `FaultInjector` (loss and corruption, both ways) makes Thrift calls on many connections; the
//! wire reorders what the server sends. Every call must be answered, correctly and in order.
//!
//! Run alone: `cargo test -p fae --test netstack`.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fae::engine::kernel::Gate;
use fae::engine::metrics::LoopMetrics;
use fae::engine::session::Env;
use fae::engine::xdp::{QueueStats, Waiter, XdpLoop};
use fae::wire::{mtype, Encoder, Limits, MessageHeader, Reader, Transport};
use fae_netstack::pipe;
use fae_netstack::stack::{Stack, StackConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::FaultInjector;
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const CLIENT: Ipv4Address = Ipv4Address::new(10, 9, 0, 2);
const PORT: u16 = 9090;
const MAX_HALF_OPEN: usize = 32;
const DEADLINE_SECS: u64 = 90;

struct Impairment {
    loss_pct: u8,
    corrupt_pct: u8,
    reorder_pct: u8,
    /// SYNs from spoofed addresses of the client's subnet, sent while the clients call.
    syn_flood: usize,
}

/// What the server did.
struct Served {
    answered: usize,
    accepted: u64,
    open: u64,
    /// The most half-open connections seen at once, and those dropped (past the cap or timed out).
    worst_half_open: u64,
    half_open_dropped: u64,
    /// Packets the server put on the wire.
    server_packets: u64,
}

/// A bare SYN to the server from `src`:`sport`, checksums done (smoltcp checks them).
fn syn(src: Ipv4Address, sport: u16) -> Vec<u8> {
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};
    let o = SERVER.octets();
    let dst = Ipv4Address::new(o[0], o[1], o[2], o[3]);
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: PORT,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(sport as i32 * 7919),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let mut buf = vec![0; fae_netstack::stack::ipv4_tcp_len(&tcp)];
    fae_netstack::stack::emit_ipv4_tcp(&mut buf, src, dst, &tcp);
    buf
}

/// noop(x) with seqid `seq`, buffered.
fn noop(seq: i32, x: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out);
    e.message_begin(b"noop", mtype::CALL, seq);
    e.field_i32(1, x);
    e.stop();
    out
}

/// The whole reply at the start of `buf`, checked: a REPLY to `seq` returning `x`. `None` until it has all
/// arrived; the bytes it took.
fn reply(buf: &[u8], seq: i32, x: i32) -> Option<usize> {
    let f = fae::wire::scan(buf, Some(Transport::Buffered), &Limits::default())
        .expect("a well-formed reply")?;
    let mut r = Reader::new(f.message);
    let h = MessageHeader::read(&mut r).expect("reply header");
    assert_eq!(
        (h.mtype, h.seqid, h.name),
        (mtype::REPLY, seq, &b"noop"[..]),
        "reply header"
    );
    let (id, _) = r.field().expect("result field").expect("field 0");
    assert_eq!(id, 0);
    assert_eq!(
        r.i32().expect("i32 result"),
        x,
        "noop({x}) returned another value"
    );
    Some(f.consumed)
}

struct Client {
    handle: SocketHandle,
    done: usize,
    sent: Option<(i32, i32)>,
    inbuf: Vec<u8>,
}

/// Starts the server loop over one end of a wire; runs `conns` client connections making `calls` calls
/// each through the other (and the flood, if any); returns what the server did.
fn serve_through_the_wire(imp: Impairment, conns: usize, calls: usize) -> Served {
    let (server_end, client_end) = pipe::pair(1500, imp.reorder_pct, 0x5eed_f00d);
    let client_fd = client_end.raw_fd();
    let server_sent = server_end.sent_counter();
    let injector = client_end.injector();
    let mut stack = Stack::over(
        server_end,
        SERVER,
        24,
        StackConfig {
            iface: "pipe".into(),
            queue: 0,
            ports: vec![PORT],
            backlog: 8,
            max_half_open: MAX_HALF_OPEN,
            half_open_timeout: Duration::from_secs(5),
            buffer: 64 << 10,
            zero_copy: false,
            frames: fae_netstack::xsk::DEFAULT_FRAMES,
            shared: Arc::default(),
            groups: 4,
        },
    )
    .expect("stack over the wire");
    let cfg = fae::config::Config::default();
    let servants = Arc::new(fae::servant::Servants::new(&cfg).expect("servants"));
    let env = Arc::new(Env::new(&cfg, servants));
    let metrics = Arc::new(LoopMetrics::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let (_returns_tx, returns) = crossbeam_channel::unbounded();
    let (waiter, bell) = Waiter::new(&mut stack).expect("waiter");
    let queue_stats = Arc::new(QueueStats::new(0));
    let lp = XdpLoop {
        index: 0,
        queue_stats: queue_stats.clone(),
        returns,
        waiter,
        stack,
        env,
        metrics: metrics.clone(),
        gate: Arc::new(Gate::new(1000)),
        stopping: stopping.clone(),
        shutdown_timeout: Duration::from_secs(2),
        busy_poll: Duration::ZERO,
        accept_queue: 64,
    };
    let server = std::thread::Builder::new()
        .name("fae-xdp-pipe".into())
        .spawn(move || lp.run())
        .expect("spawn the loop");

    let mut dev = FaultInjector::new(client_end, 0xc0ffee);
    dev.set_drop_chance(imp.loss_pct);
    dev.set_corrupt_chance(imp.corrupt_pct);
    let epoch = Instant::now();
    let now = || SmolInstant::from_micros(epoch.elapsed().as_micros() as i64);
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(CLIENT), 24));
    });
    let mut sockets = SocketSet::new(Vec::new());
    let mut clients: Vec<Client> = (0..conns)
        .map(|i| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 16 << 10]),
                tcp::SocketBuffer::new(vec![0; 16 << 10]),
            );
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            let o = SERVER.octets();
            s.connect(
                iface.context(),
                (Ipv4Address::new(o[0], o[1], o[2], o[3]), PORT),
                40000 + i as u16,
            )
            .expect("connect");
            Client {
                handle: sockets.add(s),
                done: 0,
                sent: None,
                inbuf: Vec::new(),
            }
        })
        .collect();
    let flood = (imp.syn_flood > 0).then(|| {
        let n = imp.syn_flood;
        std::thread::spawn(move || {
            // Over about a second, in batches, from hosts .100 to .199 of the client's subnet.
            for batch in 0..20 {
                for i in 0..n / 20 {
                    let k = batch * (n / 20) + i;
                    let src = Ipv4Address::new(10, 9, 0, 100 + (k % 100) as u8);
                    injector.send(syn(src, 1024 + (k % 60000) as u16));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    });
    let half_open = || queue_stats.half_open.load(Ordering::Relaxed);
    let mut worst_half_open = 0;
    let deadline = Instant::now() + Duration::from_secs(DEADLINE_SECS);
    let mut answered = 0;
    while answered < conns * calls || flood.as_ref().is_some_and(|f| !f.is_finished()) {
        worst_half_open = worst_half_open.max(half_open());
        if Instant::now() >= deadline {
            let states: Vec<String> = clients
                .iter()
                .map(|c| {
                    let s = sockets.get::<tcp::Socket>(c.handle);
                    format!("{}:{:?}:{:?}:{}", c.done, s.state(), c.sent, c.inbuf.len())
                })
                .collect();
            panic!(
                "{answered} of {} calls answered in {DEADLINE_SECS} s; clients {states:?}",
                conns * calls
            );
        }
        iface.poll(now(), &mut dev, &mut sockets);
        for (i, c) in clients.iter_mut().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(c.handle);
            if c.done == calls {
                // (During a flood the clients stay connected until it ends.)
                if flood.is_none() && s.is_open() && s.may_send() {
                    s.close();
                }
                continue;
            }
            if c.sent.is_none() && s.may_send() {
                let (seq, x) = (c.done as i32 + 1, (i * 1000 + c.done) as i32);
                let call = noop(seq, x);
                assert_eq!(s.send_slice(&call).expect("send"), call.len());
                c.sent = Some((seq, x));
            }
            while s.can_recv() {
                s.recv(|b| {
                    c.inbuf.extend_from_slice(b);
                    (b.len(), ())
                })
                .expect("recv");
            }
            if let Some((seq, x)) = c.sent {
                if let Some(n) = reply(&c.inbuf, seq, x) {
                    c.inbuf.drain(..n);
                    assert!(c.inbuf.is_empty(), "bytes after the reply");
                    c.sent = None;
                    c.done += 1;
                    answered += 1;
                }
            }
        }
        iface.poll(now(), &mut dev, &mut sockets);
        let wait = iface
            .poll_delay(now(), &sockets)
            .map_or(10, |d| d.total_millis().clamp(0, 10) as i32);
        let mut pfd = libc::pollfd {
            fd: client_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, wait) };
    }
    // The clients close; the server's sessions end with them.
    let closing = Instant::now() + Duration::from_secs(30);
    let snapshot = || fae::engine::metrics::Snapshot::merge(std::slice::from_ref(&metrics));
    for c in &clients {
        sockets.get_mut::<tcp::Socket>(c.handle).close();
    }
    while snapshot().sessions > 0 && Instant::now() < closing {
        iface.poll(now(), &mut dev, &mut sockets);
        let mut pfd = libc::pollfd {
            fd: client_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: as above.
        unsafe { libc::poll(&mut pfd, 1, 5) };
    }
    stopping.store(true, Ordering::Release);
    bell.wake_now();
    server.join().expect("the loop ended cleanly");
    let snap = snapshot();
    Served {
        answered,
        accepted: snap.accepted,
        open: snap.sessions,
        worst_half_open: worst_half_open.max(half_open()),
        half_open_dropped: queue_stats.half_open_evicted.load(Ordering::Relaxed)
            + queue_stats.half_open_timed_out.load(Ordering::Relaxed),
        server_packets: server_sent.load(Ordering::Relaxed),
    }
}

#[test]
fn sessions_over_a_clean_wire() {
    let imp = Impairment {
        loss_pct: 0,
        corrupt_pct: 0,
        reorder_pct: 0,
        syn_flood: 0,
    };
    let r = serve_through_the_wire(imp, 16, 50);
    assert_eq!(r.answered, 16 * 50);
    assert_eq!(r.accepted, 16);
    assert_eq!(r.open, 0, "sessions left open after the clients closed");
    // One frame per reply, its ACK riding on it: a bare ACK sent first would double the frames (and the
    // client's receive work). Per connection a SYN-ACK and the close's few frames come on top.
    assert!(
        r.server_packets <= (16 * 50 + 16 * 4) as u64,
        "the server sent {} packets for {} calls on 16 connections",
        r.server_packets,
        16 * 50
    );
}

#[test]
fn sessions_over_a_lossy_reordering_corrupting_wire() {
    let imp = Impairment {
        loss_pct: 3,
        corrupt_pct: 2,
        reorder_pct: 10,
        syn_flood: 0,
    };
    let r = serve_through_the_wire(imp, 16, 40);
    assert_eq!(r.answered, 16 * 40);
    assert_eq!(r.accepted, 16);
    assert_eq!(r.open, 0, "sessions left open after the clients closed");
}

#[test]
fn a_syn_flood_takes_no_session_and_stays_within_the_half_open_cap() {
    // 4,000 SYNs from 100 spoofed hosts while 8 clients connect and call: every call is answered, the
    // flood takes no session slot, and half-open connections never pass the cap (32 here).
    let imp = Impairment {
        loss_pct: 0,
        corrupt_pct: 0,
        reorder_pct: 0,
        syn_flood: 4000,
    };
    let r = serve_through_the_wire(imp, 8, 30);
    assert_eq!(r.answered, 8 * 30);
    assert_eq!(r.accepted, 8, "the flood took session slots");
    assert_eq!(r.open, 0, "sessions left open after the clients closed");
    assert!(
        r.worst_half_open as usize <= MAX_HALF_OPEN,
        "{} half-open at once",
        r.worst_half_open
    );
    assert!(
        r.half_open_dropped > 0,
        "the flood left no half-open connection"
    );
}
