#!/usr/bin/env python3
"""The demo's DNS client: `demo-dns.py SERVER NAME` asks SERVER (IPv4 or IPv6) for NAME's A
record (UDP, one try, 1 s) and prints the address, NXDOMAIN, or "no answer". Used where dig is not installed
(the emulated gateway)."""
import random, socket, struct, sys

def name_end(msg, i):
    while i < len(msg):
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n
    raise ValueError("truncated name")

def lookup(server, name):
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    q += struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(q, (server, 53))
    try:
        while True:
            msg, _ = s.recvfrom(4096)
            if len(msg) >= 12 and struct.unpack("!H", msg[:2])[0] == qid:
                break
    except (socket.timeout, OSError):
        return "no answer"
    flags, qd, an = struct.unpack("!HHH", msg[2:8])
    if flags & 0xF == 3:
        return "NXDOMAIN"
    i = 12
    for _ in range(qd):
        i = name_end(msg, i) + 4
    for _ in range(an):
        i = name_end(msg, i)
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(msg[i:i + 4])
        i += rdlen
    return "no answer"

if __name__ == "__main__":
    try:
        print(lookup(sys.argv[1], sys.argv[2]))
    except (ValueError, struct.error, IndexError):
        print("no answer")
