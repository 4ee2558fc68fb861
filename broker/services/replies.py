"""Answers the gate writes itself, in the error shape each service's clients already parse.

A client library turns a service's own error body into a readable exception; a body in any
other shape would surface as a parse error instead of the sentence we want the user to read.
"""

from __future__ import annotations

import json

from broker.services.classify import ServiceKind

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}
_TYPES = {400: "invalid_request_error", 403: "permission_error", 408: "invalid_request_error",
          413: "invalid_request_error", 431: "invalid_request_error",
          501: "invalid_request_error"}  # fmt: skip


def error_body(kind: ServiceKind, path: str, status: int, message: str) -> bytes:
    if path.startswith("/v1/") or kind == "openai":
        # OpenAI's shape; Ollama's /v1 routes answer in it too.
        kind_of_error = _TYPES.get(status, "service_unavailable")
        body: object = {"error": {"message": message, "type": kind_of_error, "param": None,
                                  "code": None}}  # fmt: skip
    elif kind == "comfyui":
        # ComfyUI's /prompt error shape, which its web UI shows as a dialog.
        body = {"error": {"type": "gpu_broker", "message": message, "details": "",
                          "extra_info": {}}, "node_errors": {}}  # fmt: skip
    else:
        body = {"error": message}
    return json.dumps(body).encode()


def error_response(
    kind: ServiceKind,
    path: str,
    status: int,
    message: str,
    *,
    keep_alive: bool,
    retry_after_s: int | None = None,
) -> bytes:
    body = error_body(kind, path, status, message)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if retry_after_s is not None:
        head.append(b"Retry-After: %d\r\n" % retry_after_s)
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body
