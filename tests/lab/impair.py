#!/usr/bin/env python3
"""A lossy, reordering Ethernet bridge between two interfaces, for the XDP lab.

This machine's kernel has no netem (CONFIG_NET_SCH_NETEM is not set) and no random-drop tc action, so the
lab impairs the path in userspace: this relay runs in a namespace between the client's and the server's
veth, forwards every frame from one side to the other through AF_PACKET sockets, drops a given fraction,
and holds back another fraction until the next frame in the same direction has gone (or a few ms passed),
which delivers them out of order.

  impair.py IFACE_A IFACE_B --loss 0.01 --reorder 0.02 [--seed N] --stats FILE

Runs until SIGTERM/SIGINT, then writes its counters to FILE as JSON.
"""
import argparse
import json
import random
import select
import signal
import socket
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
HOLD_MAX = 0.005  # a held frame is released after this long even if no other frame follows


def open_raw(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.setblocking(False)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--reorder", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stats", required=True)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    sa, sb = open_raw(args.a), open_raw(args.b)
    peer = {sa: sb, sb: sa}
    held = {sa: None, sb: None}  # per output socket: (frame, since)
    stats = {"forwarded": 0, "dropped": 0, "reordered": 0}
    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def send(out, frame):
        try:
            out.send(frame)
            stats["forwarded"] += 1
        except OSError:
            stats["dropped"] += 1

    while running[0]:
        ready, _, _ = select.select([sa, sb], [], [], 0.002)
        for s in ready:
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if addr[2] == PACKET_OUTGOING:
                    continue  # our own transmissions, seen again on the socket
                out = peer[s]
                r = rnd.random()
                if r < args.loss:
                    stats["dropped"] += 1
                    continue
                if r < args.loss + args.reorder and held[out] is None:
                    held[out] = (frame, time.monotonic())
                    continue
                send(out, frame)
                if held[out] is not None:
                    send(out, held[out][0])  # the held frame now arrives after a later one
                    held[out] = None
                    stats["reordered"] += 1
        now = time.monotonic()
        for out, h in held.items():
            if h is not None and now - h[1] > HOLD_MAX:
                send(out, h[0])
                held[out] = None
    with open(args.stats, "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
