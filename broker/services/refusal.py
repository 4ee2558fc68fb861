"""A refused chat request answered in-band, as an assistant message (`refuse_as_message`).

Chat front ends (Open WebUI, ...) neither retry a 503 nor read `Retry-After`: their user sees
a bare error. With `refuse_as_message = true` the gate answers a chat request it refuses with
200 and a reply in that API's own shape and framing, so the user reads a sentence saying
until when the GPUs are rented and how to get them back:

- Ollama `/api/chat` and `/api/generate`: one JSON object, or NDJSON lines when streaming
  (Ollama streams unless the request says `"stream": false`);
- OpenAI `/v1/chat/completions` (Ollama's /v1 and OpenAI-style servers): a
  `chat.completion`, or SSE `data:` chunks ending with `data: [DONE]` when `"stream": true`.

Every other route (embeddings, images, ComfyUI) keeps the 503: a program reading those
needs an error, not a sentence posing as its result.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from broker.services.classify import ServiceKind
from broker.services.control import Refusal

_RECLAIM_HINT = "Ask an admin to run `gpu-broker reclaim`, or try again then."


def sentence(refusal: Refusal, now: datetime, tz: tzinfo | None) -> str:
    """What the chat user reads: until when (at the latest) and what to do."""
    until = refusal.rented_until
    if until is not None:
        local = until.astimezone(tz or until.tzinfo)
        when = local.strftime("%H:%M" if until - now < timedelta(hours=20) else "%a %d %b %H:%M")
        return (
            f"The GPUs of this server are rented out until {when} at the latest. {_RECLAIM_HINT}"
        )
    return (
        "The GPUs of this server are being taken back from the marketplace and were not free "
        f"in time. Try again in {refusal.retry_after_s} s."
    )


def _route(kind: ServiceKind, path: str) -> str | None:
    path = path.rstrip("/") if len(path) > 1 else path
    if path == "/v1/chat/completions" and kind in ("ollama", "openai"):
        return "openai"
    if kind == "ollama" and path in ("/api/chat", "/api/generate"):
        return path
    return None


def _request(body: bytes | None) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_refusal(
    kind: ServiceKind,
    path: str,
    body: bytes | None,
    text: str,
    *,
    keep_alive: bool,
    retry_after_s: int,
    now: datetime,
) -> bytes | None:
    """The whole HTTP answer to a refused chat request, or None for a route that is not a
    chat (the caller answers 503 then). `body` is None when the gate has not read it (a
    large or chunked body): the API's default framing is used."""
    route = _route(kind, path)
    if route is None:
        return None
    request = _request(body)
    named = request.get("model")
    model = named if isinstance(named, str) else "gpu-broker"
    if route == "openai":
        stream = request.get("stream") is True  # OpenAI's default: no stream
        payload, content_type = _openai(model, text, stream, int(now.timestamp()))
    else:
        stream = request.get("stream") is not False  # Ollama's default: stream
        payload, content_type = _ollama(route, model, text, stream, now)
    head = [
        b"HTTP/1.1 200 OK\r\n",
        b"Content-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(payload),
        # For scripts and logs: this 200 is a refusal, and when to come back.
        b"X-GPU-Broker-Refused: %d\r\n" % retry_after_s,
        b"Cache-Control: no-store\r\n",
    ]
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + payload


def _ollama(
    route: str, model: str, text: str, stream: bool, now: datetime
) -> tuple[bytes, bytes]:
    created = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
    field = "message" if route == "/api/chat" else "response"

    def piece(content: str) -> Any:
        return {"role": "assistant", "content": content} if field == "message" else content

    final = {
        "model": model, "created_at": created, field: piece("" if stream else text),
        "done": True, "done_reason": "stop", "total_duration": 0, "load_duration": 0,
        "prompt_eval_count": 0, "prompt_eval_duration": 0, "eval_count": 0,
        "eval_duration": 0,
    }  # fmt: skip
    if not stream:
        return json.dumps(final).encode(), b"application/json; charset=utf-8"
    first = {"model": model, "created_at": created, field: piece(text), "done": False}
    lines = [json.dumps(first), json.dumps(final)]
    return ("\n".join(lines) + "\n").encode(), b"application/x-ndjson"


def _openai(model: str, text: str, stream: bool, created: int) -> tuple[bytes, bytes]:
    ident = f"chatcmpl-gpu-broker-{time.monotonic_ns():x}"
    if not stream:
        body = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }  # fmt: skip
        return json.dumps(body).encode(), b"application/json; charset=utf-8"

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        event = {
            "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }  # fmt: skip
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    events = [
        chunk({"role": "assistant", "content": text}, None),
        chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]
    return b"".join(events), b"text/event-stream"
