"""A small local OpenAI-compatible provider for tests: chat completions, embeddings, Responses.

Started by a test (``with StubProvider() as stub: ... stub.base_url``), on a
free loopback port, in a thread. It answers like a provider does: a delay,
output lengths drawn from a seeded generator (capped at the request's
``max_tokens``), and a realistic ``usage`` block counted by its own
tokenizer (words and punctuation, plus a few tokens per message), so a test
can check that the budget commits what the provider *reported*, not what
the client guessed. It records every request (path, body, API key, receive
time) and bills each one at its own price table, in nano-dollars, per API
key: give every agent its own key and `bill` says what each one spent.

A request whose text contains ``[fail]`` is answered 400 (no client
retries it) and billed nothing. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PRICES_NANO = {
    "gpt-4o-mini": (150, 600),
    "gpt-4o": (2500, 10000),
    "text-embedding-3-small": (20, 0),
}
"""Nano-dollars per (input, output) token: the provider's own price list (litellm's list has the same)."""

WORDS = ["budget", "window", "token", "redis", "stream", "agent", "fleet"]
WORDS += ["refill", "limit", "spend", "queue", "lease", "commit", "wait"]
FAIL = "[fail]"


def count_tokens(text: str) -> int:
    """The stub's tokenizer: one token per word or punctuation mark."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


@dataclass
class Record:
    """One request as the stub received it."""

    path: str
    body: dict[str, Any]
    key: str
    received: float
    status: int = 200
    input_tokens: int = 0
    output_tokens: int = 0
    nano: int = 0


@dataclass
class StubProvider:
    """The server; `delay` is (min, max) seconds per reply; `out_tokens` the (min, max) seeded output length."""

    seed: int = 7
    delay: tuple[float, float] = (0.02, 0.06)
    out_tokens: tuple[int, int] = (8, 40)
    prefix: str = ""
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.arrived = threading.Event()
        """Set when a request arrives (before the stub's delay): a test waits on it, never on the clock."""

    # lifecycle ---------------------------------------------------------------

    def start(self) -> StubProvider:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                received = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                stub._answer(self, self.path, body, key, received)

            def do_GET(self) -> None:
                payload = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in PRICES_NANO]})
                self._send(200, payload.encode())

            def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="stub-provider", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StubProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: the ``api_base`` / ``base_url`` of every client."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # billing -----------------------------------------------------------------

    def bill(self) -> dict[str, int]:
        """Nano-dollars billed per API key."""
        out: dict[str, int] = defaultdict(int)
        with self._lock:
            for r in self.records:
                out[r.key] += r.nano
        return dict(out)

    def billed(self) -> list[Record]:
        """The requests that were answered 200 (and billed)."""
        with self._lock:
            return [r for r in self.records if r.status == 200]

    def worst_window(self, window: float, limit_nano: int) -> float:
        """The most billed in any `window` seconds by receive time, as a fraction of `limit_nano`."""
        billed = sorted(self.billed(), key=lambda r: r.received)
        worst = 0
        for i, first in enumerate(billed):
            total = sum(r.nano for r in billed[i:] if r.received < first.received + window)
            worst = max(worst, total)
        return worst / limit_nano

    # answering ---------------------------------------------------------------

    def _rng(self, body: dict[str, Any]) -> random.Random:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        return random.Random(f"{self.seed}:{digest}")

    def _price(self, body: dict[str, Any]) -> tuple[int, int]:
        model = str(body.get("model", "")).split("/")[-1]
        return PRICES_NANO.get(model, PRICES_NANO["gpt-4o-mini"])

    def _reply_text(self, rng: random.Random, cap: int | None) -> str:
        n = rng.randint(*self.out_tokens)
        words = [rng.choice(WORDS) for _ in range(n)]
        text = self.prefix + " ".join(words)
        while cap is not None and count_tokens(text) > cap and words:
            words.pop()
            text = self.prefix + " ".join(words)
        return text

    def _record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def _answer(self, handler: Any, path: str, body: dict[str, Any], key: str, received: float) -> None:
        self.arrived.set()
        rng = self._rng(body)
        time.sleep(rng.uniform(*self.delay))
        record = Record(path, body, key, received)
        if FAIL in json.dumps(body):
            record.status = 400
            self._record(record)
            error = {"error": {"message": "the stub was asked to fail", "type": "invalid_request_error"}}
            handler._send(400, json.dumps(error).encode())
            return
        route = path.split("?")[0].removeprefix("/v1")
        if route == "/chat/completions":
            self._chat(handler, body, record, rng)
        elif route == "/embeddings":
            self._embeddings(handler, body, record)
        elif route == "/responses":
            self._responses(handler, body, record, rng)
        else:
            record.status = 404
            self._record(record)
            handler._send(404, b'{"error": {"message": "no such route"}}')

    def _bill(self, record: Record, body: dict[str, Any], prompt: int, completion: int) -> None:
        price_in, price_out = self._price(body)
        record.input_tokens, record.output_tokens = prompt, completion
        record.nano = prompt * price_in + completion * price_out
        self._record(record)

    def _chat(self, handler: Any, body: dict[str, Any], record: Record, rng: random.Random) -> None:
        messages = body.get("messages") or []
        prompt = sum(count_tokens(content_text(m.get("content"))) + 4 for m in messages) + 3
        prompt += count_tokens(json.dumps(body["tools"])) if body.get("tools") else 0
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        text = self._reply_text(rng, cap)
        completion = count_tokens(text)
        self._bill(record, body, prompt, completion)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        ident, created, model = "chatcmpl-stub" + secrets.token_hex(4), int(time.time()), body.get("model")
        if body.get("stream"):
            chunks = []
            pieces = re.findall(r"\S+\s*", text) or [""]
            for i, piece in enumerate(pieces):
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                chunks.append(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                )
            chunks.append(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                }
            )
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            handler._send(200, data.encode(), "text/event-stream")
            return
        reply = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }
        handler._send(200, json.dumps(reply).encode())

    def _embeddings(self, handler: Any, body: dict[str, Any], record: Record) -> None:
        items = body.get("input")
        items = [items] if isinstance(items, str) else list(items or [])
        prompt = sum(max(1, count_tokens(str(i))) for i in items)
        self._bill(record, body, prompt, 0)
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))]
        reply = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        handler._send(200, json.dumps(reply).encode())

    def _responses(self, handler: Any, body: dict[str, Any], record: Record, rng: random.Random) -> None:
        raw = body.get("input")
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
        prompt = sum(count_tokens(content_text(i.get("content")) + str(i.get("output", ""))) + 4 for i in items)
        prompt += count_tokens(str(body.get("instructions") or "")) + 3
        text = self._reply_text(rng, body.get("max_output_tokens"))
        completion = count_tokens(text)
        self._bill(record, body, prompt, completion)
        reply = {
            "id": "resp_stub" + secrets.token_hex(4),
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body.get("model"),
            "output": [
                {
                    "type": "message",
                    "id": "msg_stub" + secrets.token_hex(4),
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": prompt,
                "output_tokens": completion,
                "total_tokens": prompt + completion,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }
        handler._send(200, json.dumps(reply).encode())
