#!/usr/bin/env python3
"""The demo's WAN side: a DNS resolver that answers every A query with this host's address
(10.90.0.1, or the address given as its first argument), and small web servers on ports 443
and 8080; on the IPv6 address given as its second argument too. Runs in the gvdemo-wan
namespace; stops when killed."""
import socket, struct, threading, http.server, socketserver, sys

ADDR = sys.argv[1] if len(sys.argv) > 1 else "10.90.0.1"
ADDR6 = sys.argv[2] if len(sys.argv) > 2 else None

def dns(bind):
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 53))
    while True:
        q, peer = s.recvfrom(512)
        if len(q) < 12:
            continue
        i = 12
        while i < len(q) and q[i] != 0:
            i += 1 + q[i]
        end = i + 5
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0] if end <= len(q) else 0
        header = q[:2] + b"\x81\x80" + q[4:6] + (b"\x00\x01" if qtype == 1 else b"\x00\x00") + b"\x00\x00\x00\x00"
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ADDR) if qtype == 1 else b""
        s.sendto(header + q[12:end] + answer, peer)

class Quiet(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from the internet, port {self.server.server_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True

class Server6(Server):
    address_family = socket.AF_INET6

def web(bind, port):
    with (Server6 if ":" in bind else Server)((bind, port), Quiet) as srv:
        srv.serve_forever()

for bind in [ADDR] + ([ADDR6] if ADDR6 else []):
    for port in (443, 8080):
        threading.Thread(target=web, args=(bind, port), daemon=True).start()
    threading.Thread(target=dns, args=(bind,), daemon=True).start()
print("demo WAN: DNS on 53, web on 443 and 8080, at", ADDR, ADDR6 or "", flush=True)
threading.Event().wait()
