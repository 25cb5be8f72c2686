"""A chat-completions server on loopback for tests of the LLM judge and the caption rewriter."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1: scripted replies first, then ``respond(body)``."""

    def __init__(self, respond: Callable[[dict], str]):
        self.default = respond
        self.script: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({
                    "path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                })
                status, content = server.script.pop(0) if server.script else (200, server.default(body))
                if status != 200:
                    self.send_error(status)
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


