"""A small OpenAI-compatible chat-completions server for the synthesis tests (standard library only).

    python tests/openai_server.py --replies replies.json [--port 0] [--log requests.jsonl]

Serves POST /v1/chat/completions on 127.0.0.1 and prints "listening on PORT" once it accepts
connections (port 0: a free one). The request's model name chooses the behaviour, so one server
covers every case of a test module:

    ok            the reply of the first `match` substring found in the last user message
                  (replies file: {"match": [[substring, reply], ...], "default": reply}), with a
                  usage block counting the reply's words as completion tokens
    delay:S       the same after sleeping S seconds (a slow model)
    error         HTTP 500 with an OpenAI-style error object
    flaky         HTTP 503 for the first two requests of the model, then as `ok`
    non-json      HTTP 200 with an HTML page
    timeout       sleeps 30 s before answering (clients give up first)
    needs-key     as `ok` when the Authorization header is "Bearer sk-test-secret", else HTTP 401

Every request is appended to --log as one JSON line {model, user, seed, max_tokens, response_format, authorized}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TEST_KEY = "sk-test-secret"


class Handler(BaseHTTPRequestHandler):
    replies: dict = {"match": [], "default": ""}
    log_path: str | None = None
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def log_message(self, format, *args):  # keep the test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out, killed)
            pass

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": {"message": message, "type": "server_error"}}).encode())

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        model = str(body.get("model", ""))
        user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        authorized = self.headers.get("Authorization") == f"Bearer {TEST_KEY}"
        with self.lock:
            self.counts[model] = self.counts.get(model, 0) + 1
            count = self.counts[model]
            if self.log_path:
                line = {"model": model, "user": user, "seed": body.get("seed"), "max_tokens": body.get("max_tokens")}
                line["response_format"] = body.get("response_format")
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**line, "authorized": authorized}, ensure_ascii=False) + "\n")
        self._respond(model, user, count, authorized)

    def _respond(self, model: str, user: str, count: int, authorized: bool) -> None:
        if model == "error":
            self._error(500, "the model crashed")
        elif model == "flaky" and count <= 2:
            self._error(503, "warming up")
        elif model == "non-json":
            self._send(200, b"<html><body>Welcome to nginx!</body></html>", "text/html")
        elif model == "timeout":
            time.sleep(30)
            self._error(504, "too late")
        elif model == "needs-key" and not authorized:
            self._error(401, "invalid API key")
        else:
            if model.startswith("delay:"):
                time.sleep(float(model.split(":", 1)[1]))
            self._send(200, json.dumps(_completion(model, _reply(user))).encode())


def _reply(user: str) -> str:
    for substring, reply in Handler.replies.get("match", []):
        if substring in user:
            return reply
    return Handler.replies.get("default", "")


def _completion(model: str, content: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(content.split()), "total_tokens": len(content.split())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--replies", help="JSON file {match: [[substring, reply], ...], default: reply}")
    parser.add_argument("--log", help="append every request here as a JSON line")
    args = parser.parse_args()
    if args.replies:
        with open(args.replies, encoding="utf-8") as handle:
            Handler.replies = json.load(handle)
    Handler.log_path = args.log
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
