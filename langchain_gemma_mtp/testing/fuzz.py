"""Random and malformed requests against a running chat-completions server: the fuzz run of the tests and of
`python -m benchmarks.server_fuzz`.

`fuzz_cases(seed, model)` yields requests a careless or hostile client could send: JSON of every
wrong type at every level of a good body, messages and tools of wrong shapes, deep nesting, huge
strings, invalid UTF-8 and lone surrogates, NaN, random headers, methods and paths, and clients
that hang up or stop reading in the middle of a stream. `send(case, url)` sends one over a plain
socket (so a hang-up is a real hang-up) and returns the status the server answered with; a
server that takes longer than the timeout fails the case. Nothing here knows the model: the
caller checks that a good request still gets the right answer.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CHAT_PATH = "/v1/chat/completions"
# How a client reads the answer: whole (to the end), hangup (after its first bytes), stall (reads
# nothing for a while, then hangs up), partial (sends less body than it declared, then hangs up).
READS = ("whole", "hangup", "stall", "partial")


@dataclass
class FuzzCase:
    """One request of the fuzz run."""

    kind: str
    body: bytes
    method: str = "POST"
    path: str = CHAT_PATH
    headers: dict[str, str] = field(default_factory=dict)
    read: str = "whole"


@dataclass
class FuzzOutcome:
    """What the server did with one case: its status (None: the client hung up before one came)."""

    case: FuzzCase
    status: int | None
    seconds: float
    error: str | None = None  # the client's own failure (a timeout: the server hung)


def _scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2**63,
            -(2**70),
            1e308,
            -0.5,
            3.7,
            "",
            "x",
            "\u202e\U0001f600\x00",
            "<|turn>system\n",
            "a" * rng.randint(1, 5000),
            rng.random(),
        ]
    )


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, nested a few levels."""
    roll = rng.random()
    if depth >= 3 or roll < 0.5:
        return _scalar(rng)
    if roll < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["role", "content", "type", "function", "name", "x", ""]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))
    }


def good_body(model: str, rng: random.Random, max_tokens: int = 16) -> dict[str, Any]:
    """A request every server of this model should answer, with some of the optional fields set."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": rng.randint(1, max_tokens)}
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    optional = {
        "temperature": rng.choice([0, 0.7, 1.5]),
        "top_p": 0.9,
        "top_k": 5,
        "seed": rng.randint(0, 99),
        "stop": ["\n\n"],
        "stream": rng.random() < 0.5,
        "tools": [tool],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "chat_template_kwargs": {"enable_thinking": True},
        "speculative": {"draft_hint": "code", "num_draft_tokens": 2},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    }
    for key in rng.sample(sorted(optional), rng.randint(0, 3)):
        body[key] = optional[key]
    return body


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON value (as key/index paths), the root excluded."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _replace(body: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        body = body[key]
    body[path[-1]] = value


def _nested(depth: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def _mutations(model: str, max_tokens: int) -> list[tuple[str, Any]]:
    """(kind, build(rng) -> body bytes): the ways a body goes wrong."""

    def wrong_type(rng):
        body = good_body(model, rng, max_tokens)
        path = rng.choice(list(_paths(body)))
        _replace(body, path, random_value(rng))
        return json.dumps(body).encode()

    def missing_key(rng):
        body = good_body(model, rng, max_tokens)
        path = rng.choice(list(_paths(body)))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return json.dumps(body).encode()

    def extra_key(rng):
        body = good_body(model, rng, max_tokens)
        containers = [p for p in _paths(body) if isinstance(_get(body, p), dict)] or [()]
        target = _get(body, rng.choice(containers))
        target[rng.choice(["role", "content", "type", "function", "arguments", "name", "zzz"])] = random_value(rng)
        return json.dumps(body).encode()

    def random_body(rng):
        return json.dumps(random_value(rng)).encode()

    def random_messages(rng):
        body = good_body(model, rng, max_tokens)
        body["messages"] = [random_value(rng) for _ in range(rng.randint(1, 4))]
        return json.dumps(body).encode()

    def random_tools(rng):
        body = good_body(model, rng, max_tokens)
        body["tools"] = rng.choice([random_value(rng), [random_value(rng)], [{"type": "function", "function": random_value(rng)}]])
        body["tool_choice"] = rng.choice([None, "required", "auto", random_value(rng)])
        return json.dumps(body).encode()

    def deep_body(rng):
        return _nested(rng.choice([100, 1000, 20_000, 100_000]), rng).encode()

    def deep_field(rng):
        body = json.dumps(good_body(model, rng, max_tokens))
        key = rng.choice(["messages", "tools", "tool_choice", "response_format", "chat_template_kwargs", "stop"])
        nested = _nested(rng.choice([50, 500, 5000, 50_000]), rng)
        return (body[:-1] + f', "{key}": {nested}}}').encode()

    def deep_content(rng):
        body = good_body(model, rng, max_tokens)
        body["messages"] = [{"role": "user", "content": json.loads(_nested(rng.choice([30, 200, 900]), rng))}]
        return json.dumps(body).encode()

    def huge_string(rng):
        body = good_body(model, rng, max_tokens)
        path = rng.choice(list(_paths(body)))
        _replace(body, path, rng.choice("ab <|\u00e9\U0001f600") * rng.choice([10_000, 100_000, 400_000]))
        return json.dumps(body).encode()

    def bad_utf8(rng):
        raw = json.dumps(good_body(model, rng, max_tokens)).encode()
        at = rng.randrange(len(raw))
        return raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf4\x90\x80\x80"]) + raw[at:]

    def surrogate(rng):
        body = json.dumps(good_body(model, rng, max_tokens))
        return body.replace('"Hello"', rng.choice(['"\\ud800"', '"a\\udfffb"', '"\\ud83d"'])).encode()

    def nan(rng):
        body = json.dumps(good_body(model, rng, max_tokens))
        return body.replace('"max_tokens": ', f'"max_tokens": {rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])}, "x": ').encode()

    def truncated(rng):
        raw = json.dumps(good_body(model, rng, max_tokens)).encode()
        return raw[: rng.randrange(len(raw))]

    def random_bytes(rng):
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))

    return [
        ("wrong_type", wrong_type),
        ("missing_key", missing_key),
        ("extra_key", extra_key),
        ("random_body", random_body),
        ("random_messages", random_messages),
        ("random_tools", random_tools),
        ("deep_body", deep_body),
        ("deep_field", deep_field),
        ("deep_content", deep_content),
        ("huge_string", huge_string),
        ("bad_utf8", bad_utf8),
        ("surrogate", surrogate),
        ("nan", nan),
        ("truncated", truncated),
        ("random_bytes", random_bytes),
    ]


def _get(body: Any, path: tuple) -> Any:
    for key in path:
        body = body[key]
    return body


def _headers(rng: random.Random) -> dict[str, str]:
    choices = [
        {},
        {"content-type": "application/json"},
        {"content-type": "text/plain"},
        {"content-type": "application/json; charset=latin-1"},
        {"authorization": "Bearer " + "k" * rng.randint(0, 300)},
        {"accept": "text/event-stream"},
        {"x-random": "".join(chr(rng.randint(33, 126)) for _ in range(rng.randint(1, 100)))},
        {"content-encoding": "gzip"},
        {"transfer-encoding": "chunked"},
    ]
    return dict(rng.choice(choices))


def fuzz_cases(seed: int, model: str, max_tokens: int = 16) -> Iterator[FuzzCase]:
    """An endless, reproducible stream of fuzz cases; good requests ask for at most `max_tokens`."""
    rng = random.Random(seed)
    mutations = _mutations(model, max_tokens)
    while True:
        roll = rng.random()
        if roll < 0.06:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
            path = rng.choice([CHAT_PATH, "/v1/models", "/health", "/metrics", "/v1/" + "x" * rng.randint(0, 3000), "/%ff%fe"])
            yield FuzzCase("method_path", b"", method=method, path=path, headers=_headers(rng))
            continue
        if roll < 0.2:  # a good streamed request whose client misbehaves
            body = good_body(model, rng, max_tokens)
            body.update(stream=True, max_tokens=rng.randint(1, max_tokens))
            read = rng.choice(READS[1:])
            yield FuzzCase(f"client_{read}", json.dumps(body).encode(), headers={"content-type": "application/json"}, read=read)
            continue
        kind, build = rng.choice(mutations)
        headers = _headers(rng) if rng.random() < 0.3 else {"content-type": "application/json"}
        yield FuzzCase(kind, build(rng), headers=headers)


def _request_bytes(case: FuzzCase, host: str) -> tuple[bytes, bytes]:
    """(head, body) of an HTTP/1.1 request; `partial` declares more body than it sends."""
    headers = {"host": host, "connection": "close", **case.headers}
    chunked = headers.get("transfer-encoding") == "chunked"
    body = case.body
    if chunked:
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    elif case.method not in ("GET", "HEAD") or case.body:
        declared = len(body) + (1000 if case.read == "partial" else 0)
        headers["content-length"] = str(declared)
    head = f"{case.method} {case.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1"), body


def _status(data: bytes) -> int | None:
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else None


def send(case: FuzzCase, url: str, timeout_s: float = 30.0) -> FuzzOutcome:
    """Send one case to the server at `url` (http://host:port) and read its answer as the case says."""
    parts = urlsplit(url)
    started = time.perf_counter()
    head, body = _request_bytes(case, parts.netloc)
    data = b""
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s) as sock:
            try:
                sock.sendall(head + body)
            except OSError:  # the server answered (a 413) and closed before reading it all
                return FuzzOutcome(case, _status(sock.recv(65536)), time.perf_counter() - started)
            if case.read == "partial":
                time.sleep(0.05)
                return FuzzOutcome(case, None, time.perf_counter() - started)
            if case.read == "stall":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                time.sleep(0.3)
                return FuzzOutcome(case, _status(sock.recv(64)), time.perf_counter() - started)
            while chunk := sock.recv(65536):
                data += chunk
                if case.read == "hangup" and b"data:" in data:
                    break
    except TimeoutError:
        return FuzzOutcome(case, _status(data), time.perf_counter() - started, f"no complete answer in {timeout_s} s")
    except OSError as exc:  # the server closed on us before reading all we sent: it answered first
        if _status(data) is None:
            return FuzzOutcome(case, None, time.perf_counter() - started, f"connection failed: {exc}")
    return FuzzOutcome(case, _status(data), time.perf_counter() - started)


def failures(outcomes: list[FuzzOutcome]) -> list[str]:
    """What went wrong: a 5xx, a hang, or a whole-read case that got no status at all."""
    bad = []
    for o in outcomes:
        if o.error or (o.status is not None and o.status >= 500) or (o.status is None and o.case.read == "whole"):
            bad.append(f"{o.case.kind} {o.case.method} {o.case.path[:40]} -> {o.status} ({o.error}) body {o.case.body[:120]!r}")
    return bad
