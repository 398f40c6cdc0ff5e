#!/usr/bin/env python3
"""The demo's DNS client: `demo-dns.py SERVER NAME` asks SERVER (IPv4 or IPv6) for NAME's A
record (UDP, one try, 1 s) and prints the address, NXDOMAIN, or "no answer". Used where dig is not installed
(the emulated gateway).

`demo-dns.py --failover SERVER NAME PID` times a fail-over as a LAN host sees it: it asks for
NAME (a blocked name) every millisecond, kills PID (the filtering service) with SIGKILL 100 ms
in, and prints the milliseconds from the kill to the first lookup sent after it that was
answered unfiltered (neither NXDOMAIN nor the block address 0.0.0.0), and how many sent
after the kill got no answer within 50 ms."""
import os, random, signal, socket, struct, sys, threading, time

def name_end(msg, i):
    while i < len(msg):
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n
    raise ValueError("truncated name")

def query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return q + struct.pack("!HH", 1, 1)

def answer_of(msg):
    """The answer's first address, NXDOMAIN, or "no answer"."""
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

def lookup(server, name):
    qid = random.randrange(65536)
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(query(qid, name), (server, 53))
    try:
        while True:
            msg, _ = s.recvfrom(4096)
            if len(msg) >= 12 and struct.unpack("!H", msg[:2])[0] == qid:
                break
    except (socket.timeout, OSError):
        return "no answer"
    return answer_of(msg)

# The filter answers NXDOMAIN or its block address; the resolver anything else.
FILTERED = ("NXDOMAIN", "0.0.0.0", "no answer")

def failover(server, name, pid):
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.005)
    # Up to 3 s after the kill; 60 ms after the first unfiltered answer is enough.
    total, before = 3100, 100
    sent, answers, done, open_seen = [0.0] * total, {}, threading.Event(), threading.Event()
    def receive():
        while not done.is_set():
            try:
                msg, _ = s.recvfrom(4096)
            except OSError:
                continue
            if len(msg) >= 12:
                try:
                    got = answer_of(msg)
                except (ValueError, struct.error, IndexError):
                    got = "no answer"
                answers.setdefault(struct.unpack("!H", msg[:2])[0], (time.monotonic(), got))
                if got not in FILTERED:
                    open_seen.set()
    r = threading.Thread(target=receive)
    r.start()
    start = time.monotonic()
    killed = None
    for i in range(total):
        if killed is not None and open_seen.is_set() and time.monotonic() - killed > 0.06:
            total = i
            break
        wait = start + i / 1000 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if i == before:
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        sent[i] = time.monotonic()
        s.sendto(query(i, name), (server, 53))
    time.sleep(0.06)
    done.set()
    r.join()
    def answer(i):
        a = answers.get(i)
        return a[1] if a and a[0] - sent[i] <= 0.05 else None
    after = range(before, total)
    opened = next((i for i in after if answer(i) not in FILTERED + (None,)), None)
    lost = sum(1 for i in after if answer(i) is None)
    if opened is None:
        return "never failed open (%d lookups unanswered)" % lost
    return "%.1f ms from kill -9 to the first unfiltered answer; %d of %d lookups lost" % (
        (sent[opened] - killed) * 1000, lost, total - before)

if __name__ == "__main__":
    if sys.argv[1] == "--failover":
        print(failover(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        sys.exit(0)
    try:
        print(lookup(sys.argv[1], sys.argv[2]))
    except (ValueError, struct.error, IndexError):
        print("no answer")
