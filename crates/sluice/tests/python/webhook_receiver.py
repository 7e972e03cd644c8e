"""A webhook endpoint for the tests: Python's own http.server, nobody's code here.

Usage: webhook_receiver.py PORT DIR SECRET [CERT KEY]

With CERT and KEY (PEM files), it serves HTTPS (Python's ssl module).

Each POST is appended to DIR/requests.jsonl (flushed and fsynced before the answer,
so what was acknowledged is on disk): its status, whether its X-Sluice-Signature-256
header is the HMAC-SHA256 of the body under SECRET, its Idempotency-Key, and the body.
DIR/mode says how to answer: "ok" (200, the default), "500" or "400".
"""
import hashlib
import hmac
import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port, root, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
log = open(os.path.join(root, "requests.jsonl"), "a")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            mode = open(os.path.join(root, "mode")).read().strip()
        except FileNotFoundError:
            mode = "ok"
        status = {"ok": 200, "500": 500, "400": 400}[mode]
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        record = {
            "status": status,
            "sig_ok": hmac.compare_digest(self.headers.get("X-Sluice-Signature-256", ""), expected),
            "idempotency_key": self.headers.get("Idempotency-Key"),
            "content_type": self.headers.get("Content-Type"),
            "body": json.loads(body),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", port), Handler)
if len(sys.argv) > 5:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
