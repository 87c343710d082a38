//! The XDP path's stack over an in-memory wire (no root): what its socket pool does across connections.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use fae_netstack::pipe::{self, PipeEnd};
use fae_netstack::stack::{Stack, StackConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

const PORT: u16 = 9090;

struct Client {
    iface: Interface,
    dev: PipeEnd,
    sockets: SocketSet<'static>,
    epoch: Instant,
}

impl Client {
    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    fn connect(&mut self, local_port: u16, timestamps: bool) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        if timestamps {
            s.set_tsval_generator(Some(|| 1));
        }
        s.connect(
            self.iface.context(),
            (Ipv4Address::new(10, 9, 0, 1), PORT),
            local_port,
        )
        .expect("connect");
        self.sockets.add(s)
    }
}

/// Runs both ends until `done` holds (at most 10 s): the server accepts, and closes each connection whose
/// client closed.
fn run(
    stack: &mut Stack<PipeEnd>,
    open: &mut Vec<fae_netstack::stack::ConnId>,
    client: &mut Client,
    mut done: impl FnMut(&mut Client) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(client) {
        if Instant::now() >= deadline {
            let states: Vec<_> = client
                .sockets
                .iter()
                .map(|(_, s)| match s {
                    smoltcp::socket::Socket::Tcp(t) => t.state(),
                })
                .collect();
            panic!(
                "the wire did not get there in 10 s: client sockets {states:?}, server {:?}",
                stack.handshakes()
            );
        }
        client.poll();
        stack.poll();
        open.extend(stack.accept());
        for &id in open.iter() {
            if stack.peer_done(id) {
                stack.close(id);
            }
        }
        stack.poll();
        for id in stack.reap() {
            open.retain(|o| *o != id);
            stack.release(id);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A stack on 10.9.0.1 (one group, `backlog` listening sockets, at most `max_half_open` handshakes) and a client on 10.9.0.2, over a clean
/// wire.
fn lab(backlog: usize, max_half_open: usize) -> (Stack<PipeEnd>, Client) {
    let (server_end, client_end) = pipe::pair(1500, 0, 7);
    let stack = Stack::over(
        server_end,
        Ipv4Addr::new(10, 9, 0, 1),
        24,
        StackConfig {
            iface: "pipe".into(),
            queue: 0,
            ports: vec![PORT],
            backlog,
            max_half_open,
            half_open_timeout: Duration::from_secs(5),
            buffer: 16 << 10,
            zero_copy: false,
            frames: fae_netstack::xsk::DEFAULT_FRAMES,
            shared: Default::default(),
            groups: 1,
        },
    )
    .expect("stack");
    let epoch = Instant::now();
    let mut dev = client_end;
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ip),
        &mut dev,
        SmolInstant::from_micros(0),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(
            IpAddress::Ipv4(Ipv4Address::new(10, 9, 0, 2)),
            24,
        ));
    });
    let client = Client {
        iface,
        dev,
        sockets: SocketSet::new(Vec::new()),
        epoch,
    };
    (stack, client)
}

#[test]
fn a_recycled_socket_offers_timestamps_after_serving_a_client_without_them() {
    let (mut stack, mut client) = lab(1, 8);
    // One client after the other, each closing first: the pool's socket of the first (a client without
    // timestamps) is kept and listens again for the third.
    let mut seen = Vec::new();
    let mut open = Vec::new();
    for (i, timestamps) in [false, true, true, true].into_iter().enumerate() {
        let h = client.connect(41000 + i as u16, timestamps);
        run(&mut stack, &mut open, &mut client, |c| {
            c.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established
        });
        seen.push(client.sockets.get::<tcp::Socket>(h).timestamp_enabled());
        client.sockets.get_mut::<tcp::Socket>(h).close();
        run(&mut stack, &mut open, &mut client, |c| {
            let s = c.sockets.get::<tcp::Socket>(h);
            matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed)
        });
        // Let the server see the last ACK and release the socket.
        let until = Instant::now() + Duration::from_millis(50);
        run(&mut stack, &mut open, &mut client, |_| {
            Instant::now() >= until
        });
        client.sockets.remove(h);
    }
    assert_eq!(
        seen,
        [false, true, true, true],
        "timestamps negotiated per connection"
    );
}

#[test]
fn a_burst_of_syns_past_the_listening_pool_is_answered_in_the_same_poll() {
    // One listening socket, 24 SYNs in one poll: each finds a listening socket (the pool grows within
    // the poll), none is dropped to wait for the client's retransmission a second later.
    let (mut stack, mut client) = lab(1, 64);
    let handles: Vec<_> = (0..24u16)
        .map(|i| client.connect(42000 + i, true))
        .collect();
    let mut open = Vec::new();
    run(&mut stack, &mut open, &mut client, |c| {
        handles
            .iter()
            .all(|h| c.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Established)
    });
    let h = stack.handshakes();
    assert_eq!(h.syn_dropped, 0, "{h:?}");
    assert!(h.pool_added >= 23, "{h:?}");
    assert_eq!(h.established, 24, "{h:?}");
}

#[test]
fn syns_over_two_polls_before_an_accept_stay_within_the_half_open_cap() {
    // A cap of 8 handshakes. 12 SYNs in one poll: 8 get sockets (the pool's one and 7 added), 4 are
    // dropped. 12 more in a second poll before any accept: the 8 sockets that took a SYN are still in
    // the pool, not yet on the half-open list, and count; all 12 are dropped.
    let (mut stack, mut client) = lab(1, 8);
    for i in 0..12u16 {
        client.connect(43000 + i, true);
    }
    client.poll();
    stack.poll();
    for i in 12..24u16 {
        client.connect(43000 + i, true);
    }
    client.poll();
    stack.poll();
    let _ = stack.accept();
    let h = stack.handshakes();
    assert_eq!(h.syn_dropped, 16, "{h:?}");
    assert_eq!(h.half_open + h.established, 8, "{h:?}");
    assert_eq!(h.pool_added, 7, "{h:?}");
}

/// Polls the stack (and accepts) until the client has `n` packets waiting, at most `max`.
fn poll_until_client_has(stack: &mut Stack<PipeEnd>, client: &Client, n: usize, max: Duration) {
    let deadline = Instant::now() + max;
    while client.dev.pending() < n {
        assert!(
            Instant::now() < deadline,
            "no packet for the client in {max:?}: {:?}",
            stack.handshakes()
        );
        stack.poll();
        let _ = stack.accept();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `data` from the client's socket `h` and runs both ends until the server has read it all;
/// returns what it read.
fn round_trip(
    stack: &mut Stack<PipeEnd>,
    open: &mut Vec<fae_netstack::stack::ConnId>,
    client: &mut Client,
    h: SocketHandle,
    data: &[u8],
) -> Vec<u8> {
    client
        .sockets
        .get_mut::<tcp::Socket>(h)
        .send_slice(data)
        .expect("client send");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() {
        assert!(Instant::now() < deadline, "read {got:?} in 10 s");
        client.poll();
        stack.poll();
        open.extend(stack.accept());
        for &id in open.iter() {
            stack.recv(id, &mut |b| got.extend_from_slice(b));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    got
}

/// Connects the client from `local_port`, runs both ends until it is established, and sends `data`
/// through (checked); returns the client's socket.
fn connect_and_send(
    stack: &mut Stack<PipeEnd>,
    open: &mut Vec<fae_netstack::stack::ConnId>,
    client: &mut Client,
    local_port: u16,
    data: &[u8],
) -> SocketHandle {
    let h = client.connect(local_port, true);
    run(stack, open, client, |c| {
        c.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established
    });
    assert_eq!(round_trip(stack, open, client, h, data), data);
    h
}

#[test]
fn a_syn_sent_again_after_a_lost_syn_ack_draws_the_syn_ack_again() {
    // The SYN-ACK is lost. The client's SYN, sent again, draws the same SYN-ACK at once (smoltcp would
    // ignore the SYN and resend on its own timer, 1 s after the first). Not a copy of the SYN that
    // arrives within 250 ms of the SYN-ACK (duplicated on the way), and one answer per 250 ms: a SYN
    // with another sequence number right after (forged) draws nothing.
    let (mut stack, mut client) = lab(1, 8);
    let h = client.connect(45000, true);
    client.poll();
    let syn = client.dev.in_flight();
    assert_eq!(syn.len(), 1, "one SYN on the wire");
    let syn = syn[0].clone();
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.discard(), 1, "the SYN-ACK, lost");
    let inject = client.dev.injector();
    inject.send(syn.clone());
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.pending(), 0, "a copy at once draws nothing");
    std::thread::sleep(Duration::from_millis(300));
    inject.send(syn.clone());
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.pending(), 1, "the SYN-ACK, sent again");
    let mut forged = syn;
    forged[24] ^= 0x55; // the sequence number (20-byte IPv4 header)
    inject.send(forged);
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.pending(), 1, "nothing more for a forged SYN");
    client.poll();
    assert_eq!(
        client.sockets.get::<tcp::Socket>(h).state(),
        tcp::State::Established
    );
    let mut open = Vec::new();
    assert_eq!(
        round_trip(&mut stack, &mut open, &mut client, h, b"hello"),
        b"hello"
    );
    let hs = stack.handshakes();
    assert_eq!((hs.syn_ack_resent, hs.established), (1, 1), "{hs:?}");
}

#[test]
fn a_syn_ack_that_crosses_the_syn_sent_again_leaves_the_connection_whole() {
    // The first SYN-ACK is lost; smoltcp sends it again on its timer (1 s), and the client's own
    // retransmitted SYN crosses it: that SYN draws nothing (a SYN-ACK went less than 250 ms ago). The
    // client is established on the first SYN-ACK's numbers. Its ACK is lost too, and its SYN (sent
    // again) draws the very same SYN-ACK, which the established client answers with an ACK: one
    // connection, no reset, the data gets through.
    let (mut stack, mut client) = lab(1, 8);
    let h = client.connect(45100, true);
    client.poll();
    let syn = client.dev.in_flight()[0].clone();
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.discard(), 1, "the SYN-ACK, lost");
    poll_until_client_has(&mut stack, &client, 1, Duration::from_secs(3));
    let first = stack.handshakes();
    let inject = client.dev.injector();
    inject.send(syn.clone());
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.pending(), 1, "the crossed SYN drew nothing more");
    client.poll();
    assert_eq!(
        client.sockets.get::<tcp::Socket>(h).state(),
        tcp::State::Established
    );
    assert_eq!(client.dev.discard_sent(), 1, "the client's ACK, lost");
    std::thread::sleep(Duration::from_millis(300));
    inject.send(syn);
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.pending(), 1, "the same SYN-ACK again");
    let mut open = Vec::new();
    assert_eq!(
        round_trip(&mut stack, &mut open, &mut client, h, b"hello"),
        b"hello"
    );
    assert_eq!(
        client.sockets.get::<tcp::Socket>(h).state(),
        tcp::State::Established
    );
    let hs = stack.handshakes();
    assert_eq!(first.syn_ack_resent, 0, "{first:?}");
    assert_eq!((hs.syn_ack_resent, hs.established), (1, 1), "{hs:?}");
}

#[test]
fn a_syn_on_a_connection_its_client_lost_draws_a_challenge_ack_whose_reset_frees_the_port() {
    // A client loses its connection without the server knowing (its reset was lost) and connects again
    // from the same port. smoltcp would ignore the SYN on the established socket, and the client would
    // retry until the server's idle timeout. The stack answers with a challenge ACK; the client answers
    // that with a reset, which closes the stale connection, and its next SYN connects.
    let (mut stack, mut client) = lab(1, 8);
    let mut open = Vec::new();
    let h = connect_and_send(&mut stack, &mut open, &mut client, 45200, b"one");
    let stale = open.clone();
    assert_eq!(stale.len(), 1);
    // Quiet: every ACK delivered (a segment from the stale connection would draw the client's reset
    // by itself).
    let until = Instant::now() + Duration::from_millis(100);
    run(&mut stack, &mut open, &mut client, |_| {
        Instant::now() >= until
    });
    client.sockets.remove(h);
    connect_and_send(&mut stack, &mut open, &mut client, 45200, b"two");
    assert!(
        !stack.is_connection(stale[0]),
        "the stale connection is gone"
    );
    let hs = stack.handshakes();
    assert!(hs.challenge_acks >= 1, "{hs:?}");
    assert_eq!(hs.established, 2, "{hs:?}");
}

#[test]
fn a_new_syn_from_the_port_of_a_lost_handshake_draws_a_challenge_ack_and_connects() {
    // A client's handshake is under way (its SYN-ACK lost) when it connects again from the same port,
    // with a new initial sequence number. smoltcp ignores that SYN on the half-open socket, so the client
    // would wait out the handshake timeout (5 s here). The stack answers it with a challenge ACK; the
    // client answers that with a reset, which ends the old handshake, and its next SYN connects.
    let (mut stack, mut client) = lab(1, 8);
    let h = client.connect(45300, true);
    client.poll();
    stack.poll();
    let _ = stack.accept();
    assert_eq!(client.dev.discard(), 1, "the SYN-ACK, lost");
    client.sockets.remove(h);
    std::thread::sleep(Duration::from_millis(300));
    connect_and_send(&mut stack, &mut Vec::new(), &mut client, 45300, b"again");
    let hs = stack.handshakes();
    assert!(hs.challenge_acks >= 1, "{hs:?}");
    assert_eq!((hs.established, hs.timed_out), (1, 0), "{hs:?}");
}

#[test]
fn a_handshake_reset_back_to_listen_that_takes_another_syn_is_known_by_its_new_client() {
    // A half-open socket gets its client's reset (as a challenge ACK draws) and goes back to Listen; in
    // the same poll it takes another client's SYN. The stack knows it by its new client: that client's
    // packets reach the application (touched), not only the 1 s sweep.
    let (mut stack, mut client) = lab(1, 8);
    let a = client.connect(46000, true);
    client.poll();
    stack.poll();
    let _ = stack.accept();
    client.poll();
    assert_eq!(
        client.sockets.get::<tcp::Socket>(a).state(),
        tcp::State::Established
    );
    assert_eq!(client.dev.discard_sent(), 1, "client A's ACK, lost");
    client.sockets.get_mut::<tcp::Socket>(a).abort();
    client.poll();
    let b = client.connect(46001, true);
    client.poll();
    assert_eq!(client.dev.in_flight().len(), 2, "A's reset, then B's SYN");
    let mut open = Vec::new();
    run(&mut stack, &mut open, &mut client, |c| {
        c.sockets.get::<tcp::Socket>(b).state() == tcp::State::Established
    });
    // (A's packets touched the same socket: only what comes now counts.)
    stack.take_touched(&mut Vec::new());
    let mut touched = Vec::new();
    client
        .sockets
        .get_mut::<tcp::Socket>(b)
        .send_slice(b"b")
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stack.connections() == 0 || touched.is_empty() {
        assert!(
            Instant::now() < deadline,
            "B's data never reached its connection: {:?}",
            stack.handshakes()
        );
        client.poll();
        stack.poll();
        open.extend(stack.accept());
        stack.take_touched(&mut touched);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(open.len(), 1);
    assert!(touched.contains(&open[0]), "{touched:?} {open:?}");
    assert_eq!(stack.handshakes().established, 1);
}

#[test]
fn a_syn_sent_again_right_after_the_reset_a_challenge_ack_drew_connects_at_once() {
    // As a Linux client does after a challenge ACK: its reset and, right behind it, its SYN again (one
    // batch: the stack sees the SYN before smoltcp has taken the reset). The SYN is kept and admitted at
    // the next poll, once the stale connection is gone; the client connects on that SYN, without
    // waiting for its own retransmission (smoltcp's client: 1 s).
    let (mut stack, mut client) = lab(1, 8);
    let mut open = Vec::new();
    let h = connect_and_send(&mut stack, &mut open, &mut client, 45500, b"one");
    let until = Instant::now() + Duration::from_millis(100);
    run(&mut stack, &mut open, &mut client, |_| {
        Instant::now() >= until
    });
    client.sockets.remove(h);
    let h2 = client.connect(45500, true);
    client.poll();
    let syn = client.dev.in_flight()[0].clone();
    poll_until_client_has(&mut stack, &client, 1, Duration::from_secs(1));
    assert_eq!(stack.handshakes().challenge_acks, 1);
    client.poll();
    assert_eq!(client.dev.in_flight().len(), 1, "the client's reset");
    client.dev.injector().send(syn);
    let sent = client.dev.sent_counter();
    let before = sent.load(std::sync::atomic::Ordering::Relaxed);
    run(&mut stack, &mut open, &mut client, |c| {
        c.sockets.get::<tcp::Socket>(h2).state() == tcp::State::Established
    });
    let hs = stack.handshakes();
    assert_eq!((hs.syn_retried, hs.established), (1, 2), "{hs:?}");
    // The client sent its ACK of the SYN-ACK, and no SYN of its own again.
    let after = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 1, "{hs:?}");
    assert_eq!(
        round_trip(&mut stack, &mut open, &mut client, h2, b"two"),
        b"two"
    );
}

#[test]
fn a_late_copy_of_the_syn_that_opened_a_connection_is_not_a_new_one() {
    // A copy of a client's first SYN arrives after its connection is established (a retransmission that
    // crossed the SYN-ACK), and the connection ends right after (the client resets it). The copy is not
    // kept to open a new connection once the old one is gone.
    let (mut stack, mut client) = lab(1, 8);
    let h = client.connect(45600, true);
    client.poll();
    let syn = client.dev.in_flight()[0].clone();
    let mut open = Vec::new();
    run(&mut stack, &mut open, &mut client, |c| {
        c.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established
    });
    assert_eq!(
        round_trip(&mut stack, &mut open, &mut client, h, b"one"),
        b"one"
    );
    client.dev.injector().send(syn);
    client.sockets.get_mut::<tcp::Socket>(h).abort();
    let until = Instant::now() + Duration::from_millis(200);
    run(&mut stack, &mut open, &mut client, |_| {
        Instant::now() >= until
    });
    let hs = stack.handshakes();
    assert_eq!(stack.connections(), 0, "{hs:?}");
    assert_eq!(
        (hs.syn_retried, hs.half_open, hs.established),
        (0, 0, 1),
        "{hs:?}"
    );
    assert_eq!(hs.challenge_acks, 1, "the copy was seen: {hs:?}");
}
