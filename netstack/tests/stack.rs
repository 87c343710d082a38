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
