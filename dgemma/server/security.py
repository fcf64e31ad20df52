"""Defences of a local server against web pages: the Host check (DNS rebinding) and the JSON-only request bodies.

A page on any site can make the browser send requests to http://127.0.0.1:8000. Two things stop it from driving a
keyless dgemma server:

- **Content type.** A "simple" cross-origin POST (no CORS preflight) can only carry `text/plain`, form or multipart
  bodies. The API reads `application/json` bodies only, so such a request is refused (415) before it is parsed.
- **Host.** With DNS rebinding, the page's own name (evil.example) starts resolving to 127.0.0.1, so its requests
  are same-origin and may read the answers. Their `Host` header still says evil.example: only names the server
  knows are served. Allowed are IP literals (a rebinding attack needs a name), `localhost`, the bound host, and
  the names given with `--allowed-hosts` (`*` turns the check off, e.g. behind a proxy that rewrites Host).
"""

from __future__ import annotations

import ipaddress
import json

from .protocol import RequestError, error_body


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: answer 400 to requests whose Host header names a host this server was not told about."""

    def __init__(self, app, bound_host: str, allowed: tuple[str, ...] = ()):
        self.app = app
        self.any = "*" in allowed
        self.names = {host_name(n) for n in (bound_host, "localhost", *allowed) if n != "*"}

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host header: not a browser (every browser sends one)
            return True
        name = host_name(header)
        return name in self.names or _is_ip(name) or name.endswith(".localhost")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if self.allows(header):
            return await self.app(scope, receive, send)
        msg = (f"Host {header!r} is not served here (a defence against DNS rebinding); start the server with "
               f"--allowed-hosts {host_name(header)} to allow it")
        body = json.dumps(error_body(msg, code="invalid_host")).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def require_json(content_type: str | None) -> None:
    """415 unless the body is declared `application/json` (see the module docstring)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(f"the request body must be sent as 'Content-Type: application/json', got "
                           f"{content_type!r}", code="unsupported_media_type", status=415)
