//! The admin port's numbers: Prometheus text (`/metrics`) and the JSON of `/api/stats` and `/api/backends`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use super::AdminState;
use crate::backend::{Backends, FailureKind, Server};
use crate::engine::metrics::{bucket_upper, MethodSnapshot, Snapshot, BUCKETS, SLOTS};
use crate::servant::misc;

/// Histogram bounds exported to Prometheus: powers of four of nanoseconds, which fall on bucket edges.
fn prometheus_bounds() -> impl Iterator<Item = (usize, f64)> {
    (0..BUCKETS)
        .filter(|&i| {
            let u = bucket_upper(i);
            u >= 1024 && u.is_power_of_two() && u.trailing_zeros() % 2 == 0
        })
        .map(|i| (i, bucket_upper(i) as f64 / 1e9))
}

pub fn prometheus(state: &AdminState) -> String {
    let snap = Snapshot::merge(&state.metrics);
    let mut o = String::with_capacity(16 << 10);
    let _ = writeln!(
        o,
        "# HELP fae_calls_total Calls answered, by method.\n# TYPE fae_calls_total counter"
    );
    for slot in 0..SLOTS {
        let name = Snapshot::slot_name(slot);
        let _ = writeln!(
            o,
            "fae_calls_total{{method=\"{name}\"}} {}",
            snap.methods[slot].calls
        );
    }
    let _ = writeln!(
        o,
        "# HELP fae_call_errors_total Calls answered with a TApplicationException, by method.\n\
         # TYPE fae_call_errors_total counter"
    );
    for slot in 0..SLOTS {
        let name = Snapshot::slot_name(slot);
        let _ = writeln!(
            o,
            "fae_call_errors_total{{method=\"{name}\"}} {}",
            snap.methods[slot].errors
        );
    }
    let _ = writeln!(
        o,
        "# HELP fae_call_duration_seconds Time from a call's start to its reply (a deferred call's includes its back end).\n\
         # TYPE fae_call_duration_seconds histogram"
    );
    for slot in 0..SLOTS {
        let m = &snap.methods[slot];
        if m.calls == 0 {
            continue;
        }
        let labels = format!("method=\"{}\"", Snapshot::slot_name(slot));
        write_histogram(
            &mut o,
            "fae_call_duration_seconds",
            &labels,
            &m.latency,
            Some(m.sum_ns),
        );
    }
    let lc = state.servants.lcache.stats();
    for (name, kind, help, v) in [
        ("fae_sessions", "gauge", "Open sessions.", snap.sessions),
        (
            "fae_sessions_accepted_total",
            "counter",
            "Sessions accepted.",
            snap.accepted,
        ),
        (
            "fae_protocol_errors_total",
            "counter",
            "Malformed messages (session closed).",
            snap.protocol_errors,
        ),
        (
            "fae_slow_calls_total",
            "counter",
            "Calls slower than metrics.slow_call_ms.",
            snap.slow_calls,
        ),
        (
            "fae_deadline_exceeded_total",
            "counter",
            "Calls answered with an error at their deadline (server.call_timeout_ms): a back end that did not answer in time, or a call refused once past it.",
            snap.deadline_exceeded,
        ),
        (
            "fae_sessions_timed_out_total",
            "counter",
            "Sessions closed for idleness or a stalled message.",
            snap.timed_out_sessions,
        ),
        (
            "fae_received_bytes_total",
            "counter",
            "Bytes received from clients.",
            snap.bytes_in,
        ),
        (
            "fae_sent_bytes_total",
            "counter",
            "Bytes sent to clients.",
            snap.bytes_out,
        ),
        (
            "fae_lcache_items",
            "gauge",
            "Entries in the local cache.",
            lc.items as u64,
        ),
        (
            "fae_lcache_bytes",
            "gauge",
            "Bytes charged to the local cache.",
            lc.bytes as u64,
        ),
        (
            "fae_locks_held",
            "gauge",
            "Locks held and not expired.",
            state.servants.lock.held() as u64,
        ),
        (
            "fae_registry_nodes",
            "gauge",
            "Nodes in the registry.",
            state.servants.registry.len() as u64,
        ),
        (
            "fae_uptime_seconds",
            "gauge",
            "Seconds since start.",
            state.servants.misc.uptime_secs(),
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    backends_prometheus(&mut o, &state.servants.backends());
    let _ = writeln!(
        o,
        "# HELP fae_rejected_total Calls the filters refused at once, by reason.\n# TYPE fae_rejected_total counter"
    );
    for r in crate::filter::Reason::ALL {
        let _ = writeln!(
            o,
            "fae_rejected_total{{reason=\"{}\"}} {}",
            r.name(),
            get(&state.filters.rejected[r as usize])
        );
    }
    let _ = writeln!(
        o,
        "# HELP fae_resident_memory_bytes Resident memory of faed.\n# TYPE fae_resident_memory_bytes gauge\n\
         fae_resident_memory_bytes {}",
        super::history::rss_kib() * 1024
    );
    if let Some(c) = state.cluster.as_ref().and_then(|w| w.upgrade()) {
        let v = c.view();
        let mine = v.vbucket_counts().get(&v.my_id).copied().unwrap_or(0) as u64;
        for (name, kind, help, val) in [
            (
                "fae_forwarded_total",
                "counter",
                "Calls forwarded to the node owning their key.",
                snap.forwarded,
            ),
            ("fae_cluster_term", "gauge", "Raft term.", v.term),
            (
                "fae_cluster_commit_index",
                "gauge",
                "Raft commit index.",
                v.commit_index,
            ),
            ("fae_cluster_epoch", "gauge", "Vbucket map epoch.", v.epoch),
            (
                "fae_cluster_members",
                "gauge",
                "Cluster members.",
                v.members.len() as u64,
            ),
            (
                "fae_cluster_vbuckets_owned",
                "gauge",
                "Vbuckets this node owns.",
                mine,
            ),
            (
                "fae_cluster_is_leader",
                "gauge",
                "1 if this node is the raft leader.",
                u64::from(v.is_leader()),
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {val}"
            );
        }
    }
    if let Some(p) = &state.xdp {
        let c = crate::engine::xdp::counters(p);
        for (name, help, v) in [
            (
                "fae_xdp_redirected_total",
                "Packets the XDP program steered to an AF_XDP socket.",
                c.redirected,
            ),
            (
                "fae_xdp_passed_total",
                "Packets the XDP program passed to the kernel.",
                c.passed,
            ),
            (
                "fae_xdp_no_socket_total",
                "RPC-port packets passed because no AF_XDP socket was bound on their queue.",
                c.no_socket,
            ),
            (
                "fae_xdp_malformed_total",
                "Frames too short or malformed to classify, passed to the kernel.",
                c.malformed,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        type Get = fn(&crate::engine::xdp::QueueStats) -> &std::sync::atomic::AtomicU64;
        let per_queue: [(&str, &str, Get); 20] = [
            (
                "fae_xdp_queue_rx_packets_total",
                "Packets received on the queue's AF_XDP socket.",
                |q| &q.rx_packets,
            ),
            (
                "fae_xdp_queue_tx_packets_total",
                "Packets sent from the queue's AF_XDP socket.",
                |q| &q.tx_packets,
            ),
            (
                "fae_xdp_queue_rx_dropped_total",
                "Frames received on the queue that were not IPv4 over Ethernet.",
                |q| &q.rx_dropped,
            ),
            (
                "fae_xdp_queue_tx_stalled_total",
                "Packets the queue could not send at once (no neighbour MAC, or every frame in flight).",
                |q| &q.tx_no_frame,
            ),
            (
                "fae_xdp_queue_tx_device_dropped_total",
                "Sends after which the device had dropped a frame (copy mode; sent again once, see tx_resent).",
                |q| &q.tx_device_dropped,
            ),
            (
                "fae_xdp_queue_tx_resent_total",
                "Frames the device dropped that the queue sent again at once.",
                |q| &q.tx_resent,
            ),
            (
                "fae_xdp_queue_syn_dropped_total",
                "SYNs dropped because the queue's half-open connections were at listener.xdp_max_half_open.",
                |q| &q.syn_dropped,
            ),
            (
                "fae_xdp_queue_listen_added_total",
                "Listening sockets added during a poll for SYNs that found the pool empty (the backlog growing).",
                |q| &q.listen_added,
            ),
            (
                "fae_xdp_queue_syn_duplicate_total",
                "Bare SYNs for connections the queue holds (a client's SYN sent again), kept from the TCP stack and answered (syn_ack_resent, challenge_acks).",
                |q| &q.syn_duplicate,
            ),
            (
                "fae_xdp_queue_syn_ack_resent_total",
                "SYN-ACKs sent again for a client's SYN sent again during its handshake (the SYN-ACK was lost).",
                |q| &q.syn_ack_resent,
            ),
            (
                "fae_xdp_queue_challenge_acks_total",
                "Challenge ACKs (RFC 5961) sent for a SYN on an established connection, or with another sequence number in a handshake (a client that lost it answers with a reset).",
                |q| &q.challenge_acks,
            ),
            (
                "fae_xdp_queue_syn_retried_total",
                "Bare SYNs kept from the TCP stack for a held connection, admitted once that connection was over and released (its client's reset after a challenge ACK, mostly).",
                |q| &q.syn_retried,
            ),
            (
                "fae_xdp_queue_rx_foreign_total",
                "Packets received on the queue for another queue's connection, handed to that queue.",
                |q| &q.rx_foreign,
            ),
            (
                "fae_xdp_queue_rx_ring_full_total",
                "Frames the kernel dropped because the queue's AF_XDP RX ring was full (faed behind).",
                |q| &q.rx_ring_full,
            ),
            (
                "fae_xdp_queue_rx_fill_empty_total",
                "Frames the kernel dropped because the queue's fill ring had no free frame.",
                |q| &q.rx_fill_empty,
            ),
            (
                "fae_xdp_queue_rx_kernel_dropped_total",
                "Frames the kernel dropped on the queue's AF_XDP socket, all reasons (fill-ring-empty drops included).",
                |q| &q.rx_kernel_dropped,
            ),
            (
                "fae_xdp_queue_handshakes_total",
                "TCP handshakes completed on the queue.",
                |q| &q.established,
            ),
            (
                "fae_xdp_queue_half_open_timed_out_total",
                "Half-open connections dropped after listener.xdp_half_open_timeout_ms.",
                |q| &q.half_open_timed_out,
            ),
            (
                "fae_xdp_queue_half_open_evicted_total",
                "Half-open connections dropped, oldest first, past listener.xdp_max_half_open.",
                |q| &q.half_open_evicted,
            ),
            (
                "fae_xdp_queue_accept_refused_total",
                "Established connections reset from the accept queue (waiting for a session slot at server.max_sessions): past listener.xdp_backlog, past server.idle_timeout_ms, or at shutdown.",
                |q| &q.accept_refused,
            ),
        ];
        if !state.xdp_queues.is_empty() {
            for (name, help, get) in per_queue {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
                for (q, _) in &state.xdp_queues {
                    let mut v = get(q).load(std::sync::atomic::Ordering::Relaxed);
                    if name == "fae_xdp_queue_tx_stalled_total" {
                        v += q.tx_no_neighbour.load(std::sync::atomic::Ordering::Relaxed);
                    }
                    let _ = writeln!(o, "{name}{{queue=\"{}\"}} {v}", q.queue);
                }
            }
            let gauges: [(&str, &str, Get); 2] = [
                (
                    "fae_xdp_queue_half_open",
                    "Connections in their TCP handshake on the queue.",
                    |q| &q.half_open,
                ),
                (
                    "fae_xdp_queue_accept_waiting",
                    "Established connections waiting for a session slot (faed at server.max_sessions).",
                    |q| &q.accept_waiting,
                ),
            ];
            for (name, help, get) in gauges {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (q, _) in &state.xdp_queues {
                    let v = get(q).load(std::sync::atomic::Ordering::Relaxed);
                    let _ = writeln!(o, "{name}{{queue=\"{}\"}} {v}", q.queue);
                }
            }
        }
    }
    o
}

pub fn stats_json(state: &AdminState) -> serde_json::Value {
    let snap = Snapshot::merge(&state.metrics);
    let methods: serde_json::Map<String, serde_json::Value> = (0..SLOTS)
        .filter(|&slot| snap.methods[slot].calls > 0)
        .map(|slot| {
            let m = &snap.methods[slot];
            (
                Snapshot::slot_name(slot).to_owned(),
                json!({
                    "calls": m.calls,
                    "errors": m.errors,
                    "p50_us": m.quantile_us(0.5),
                    "p99_us": m.quantile_us(0.99),
                    "p999_us": m.quantile_us(0.999),
                }),
            )
        })
        .collect();
    let lc = state.servants.lcache.stats();
    json!({
        "version": misc::VERSION,
        "build": misc::BUILD_ID,
        "uptime_secs": state.servants.misc.uptime_secs(),
        "loops": state.metrics.len(),
        "sessions": snap.sessions,
        "sessions_accepted": snap.accepted,
        "sessions_timed_out": snap.timed_out_sessions,
        "protocol_errors": snap.protocol_errors,
        "slow_calls": snap.slow_calls,
        "deadline_exceeded": snap.deadline_exceeded,
        "bytes_in": snap.bytes_in,
        "bytes_out": snap.bytes_out,
        "forwarded": snap.forwarded,
        "calls": snap.methods.iter().map(|m| m.calls).sum::<u64>(),
        "errors": snap.methods.iter().map(|m| m.errors).sum::<u64>(),
        "lcache": {"items": lc.items, "bytes": lc.bytes},
        "locks_held": state.servants.lock.held(),
        "registry_nodes": state.servants.registry.len(),
        "methods": methods,
        "backends": backends_json(&state.servants.backends()),
        "mysql": mysql_json(&state.servants.backends()),
        "xdp": state.xdp.as_ref().map(|p| {
            let c = crate::engine::xdp::counters(p);
            let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let queues: Vec<serde_json::Value> = state
                .xdp_queues
                .iter()
                .map(|(q, m)| {
                    let mut v = json!({
                        "queue": q.queue,
                        "rx_packets": get(&q.rx_packets),
                        "tx_packets": get(&q.tx_packets),
                        "rx_dropped": get(&q.rx_dropped),
                        "tx_no_neighbour": get(&q.tx_no_neighbour),
                        "tx_no_frame": get(&q.tx_no_frame),
                        "syn_dropped": get(&q.syn_dropped),
                        "listen_added": get(&q.listen_added),
                        "syn_duplicate": get(&q.syn_duplicate),
                        // How those SYNs were answered.
                        "repeated_syn": json!({
                            "syn_ack_resent": get(&q.syn_ack_resent),
                            "challenge_acks": get(&q.challenge_acks),
                            "retried": get(&q.syn_retried),
                        }),
                        "rx_foreign": get(&q.rx_foreign),
                        // Frames the kernel dropped (the AF_XDP socket's counters, and sends the device
                        // dropped), and those of them sent again.
                        "drops": json!({
                            "rx_ring_full": get(&q.rx_ring_full),
                            "rx_fill_empty": get(&q.rx_fill_empty),
                            "rx_other": get(&q.rx_kernel_dropped),
                            "tx_device": get(&q.tx_device_dropped),
                            "tx_resent": get(&q.tx_resent),
                        }),
                        "half_open": get(&q.half_open),
                        "handshakes": get(&q.established),
                        "half_open_timed_out": get(&q.half_open_timed_out),
                        "half_open_evicted": get(&q.half_open_evicted),
                        "sessions": get(&m.sessions),
                        "calls": crate::engine::metrics::Snapshot::merge(std::slice::from_ref(m))
                            .methods
                            .iter()
                            .map(|x| x.calls)
                            .sum::<u64>(),
                    });
                    // Established connections waiting for a session slot, and reset from there.
                    v["accept_queue"] = json!({
                        "waiting": get(&q.accept_waiting),
                        "refused": get(&q.accept_refused),
                    });
                    v
                })
                .collect();
            json!({"redirected": c.redirected, "passed": c.passed, "no_socket": c.no_socket,
                   "malformed": c.malformed, "queues": queues})
        }),
    })
}

/// One histogram's series: cumulative buckets at the exported bounds, `+Inf`, the count and, when known,
/// the sum (in seconds).
fn write_histogram(o: &mut String, name: &str, labels: &str, latency: &[u64], sum_ns: Option<u64>) {
    let mut cum = 0;
    let mut next = 0;
    for (i, le) in prometheus_bounds() {
        cum += latency[next..=i].iter().sum::<u64>();
        next = i + 1;
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{le}\"}} {cum}");
    }
    let total: u64 = latency.iter().sum();
    let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
    if let Some(ns) = sum_ns {
        let _ = writeln!(o, "{name}_sum{{{labels}}} {}", ns as f64 / 1e9);
    }
    let _ = writeln!(o, "{name}_count{{{labels}}} {total}");
}

/// Labels of one back-end server.
fn server_labels(s: &Server) -> String {
    format!(
        "protocol=\"{}\",pool=\"{}\",server=\"{}\"",
        s.protocol.name(),
        escape_label(&s.pool),
        escape_label(&s.name)
    )
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn backends_prometheus(o: &mut String, b: &Backends) {
    if b.servers.is_empty() {
        return;
    }
    type Counter = fn(&Server) -> u64;
    let families: [(&str, &str, &str, Counter); 8] = [
        (
            "fae_backend_calls_total",
            "counter",
            "Calls a back-end server answered or failed.",
            |s| get(&s.metrics.calls),
        ),
        (
            "fae_backend_app_errors_total",
            "counter",
            "Answers that were application errors (ERROR, CLIENT_ERROR, a Redis error).",
            |s| get(&s.metrics.app_errors),
        ),
        (
            "fae_backend_rejected_total",
            "counter",
            "Calls refused at once by an open circuit breaker.",
            |s| get(&s.metrics.rejected_open),
        ),
        (
            "fae_backend_connections",
            "gauge",
            "Open connections to the server.",
            |s| get(&s.metrics.conns_open),
        ),
        (
            "fae_backend_connections_busy",
            "gauge",
            "Connections with calls in flight (the rest are idle).",
            |s| get(&s.metrics.conns_busy),
        ),
        (
            "fae_backend_connects_total",
            "counter",
            "Connections opened to the server.",
            |s| get(&s.metrics.connects),
        ),
        (
            "fae_backend_queued",
            "gauge",
            "Calls queued or in flight for the server.",
            |s| get(&s.metrics.queued),
        ),
        (
            "fae_backend_breaker_state",
            "gauge",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            |s| s.breaker.state() as u64,
        ),
    ];
    for (name, kind, help, f) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in &b.servers {
            let _ = writeln!(o, "{name}{{{}}} {}", server_labels(s), f(s));
        }
    }
    if let Some(m) = &b.mysql {
        let st = &m.stats;
        for (name, help, v) in [
            (
                "fae_mysql_cache_hits_total",
                "my_query reads answered from the result cache.",
                &st.cache_hits,
            ),
            (
                "fae_mysql_cache_misses_total",
                "my_query reads with a cacheKey not in the result cache.",
                &st.cache_misses,
            ),
            (
                "fae_mysql_cache_evictions_total",
                "Results dropped from the cache (evicted or pushed out).",
                &st.cache_evictions,
            ),
            (
                "fae_mysql_lookup_hits_total",
                "Shard lookups answered from the lookup cache.",
                &st.lookup_hits,
            ),
            (
                "fae_mysql_lookup_misses_total",
                "Shard lookups read from the lookup table.",
                &st.lookup_misses,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                get(v)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP fae_backend_failures_total System failures of calls, by kind.\n# TYPE fae_backend_failures_total counter"
    );
    for s in &b.servers {
        for k in FailureKind::ALL {
            let _ = writeln!(
                o,
                "fae_backend_failures_total{{{},kind=\"{}\"}} {}",
                server_labels(s),
                k.name(),
                get(&s.metrics.failures[k as usize])
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP fae_backend_breaker_transitions_total Circuit breaker transitions, by the state entered.\n\
         # TYPE fae_backend_breaker_transitions_total counter"
    );
    for s in &b.servers {
        for (to, c) in [
            ("open", &s.breaker.opened),
            ("half_open", &s.breaker.half_opened),
            ("closed", &s.breaker.closed),
        ] {
            let _ = writeln!(
                o,
                "fae_backend_breaker_transitions_total{{{},to=\"{to}\"}} {}",
                server_labels(s),
                get(c)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP fae_backend_call_duration_seconds Time from sending a call to the server to its answer.\n\
         # TYPE fae_backend_call_duration_seconds histogram"
    );
    for s in &b.servers {
        let latency: Vec<u64> = s.metrics.latency.iter().map(get).collect();
        let labels = server_labels(s);
        let sum = Some(get(&s.metrics.latency_sum_ns));
        write_histogram(
            o,
            "fae_backend_call_duration_seconds",
            &labels,
            &latency,
            sum,
        );
    }
}

fn mysql_json(b: &Backends) -> serde_json::Value {
    match &b.mysql {
        None => serde_json::Value::Null,
        Some(m) => {
            let st = &m.stats;
            json!({
                "cache_hits": get(&st.cache_hits),
                "cache_misses": get(&st.cache_misses),
                "cache_evictions": get(&st.cache_evictions),
                "lookup_hits": get(&st.lookup_hits),
                "lookup_misses": get(&st.lookup_misses),
            })
        }
    }
}

/// `/api/backends`: every back-end server (pools, breaker states, connections, latency) and MySQL's caches.
pub fn backends_all_json(b: &Backends) -> serde_json::Value {
    json!({"servers": backends_json(b), "mysql": mysql_json(b)})
}

fn backends_json(b: &Backends) -> serde_json::Value {
    let servers: Vec<serde_json::Value> = b
        .servers
        .iter()
        .map(|s| {
            let latency = MethodSnapshot {
                calls: 0,
                errors: 0,
                sum_ns: 0,
                latency: s.metrics.latency.iter().map(get).collect(),
            };
            let failures: serde_json::Map<String, serde_json::Value> = FailureKind::ALL
                .iter()
                .map(|k| {
                    (
                        k.name().to_owned(),
                        json!(get(&s.metrics.failures[*k as usize])),
                    )
                })
                .collect();
            json!({
                "protocol": s.protocol.name(),
                "pool": &*s.pool,
                "server": &*s.name,
                "breaker": s.breaker.state().name(),
                "transitions": {
                    "open": get(&s.breaker.opened),
                    "half_open": get(&s.breaker.half_opened),
                    "closed": get(&s.breaker.closed),
                },
                "calls": get(&s.metrics.calls),
                "failures": failures,
                "app_errors": get(&s.metrics.app_errors),
                "rejected": get(&s.metrics.rejected_open),
                "connections": get(&s.metrics.conns_open),
                "connections_busy": get(&s.metrics.conns_busy),
                "connects": get(&s.metrics.connects),
                "queued": get(&s.metrics.queued),
                "max_conns": s.settings.max_conns,
                "p50_us": latency.quantile_us(0.5),
                "p99_us": latency.quantile_us(0.99),
            })
        })
        .collect();
    json!(servers)
}
