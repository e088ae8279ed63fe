"""``/healthz`` and Prometheus ``/metrics`` on 127.0.0.1, with no web framework.

A deliberately tiny HTTP/1.0 responder: two read-only GET endpoints, a
bounded request size, one response per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


class HttpEndpoint:
    def __init__(
        self,
        health: HealthCheck,
        metrics: Callable[[], CollectorRegistry],
        host: str = "127.0.0.1",
        port: int = 8080,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = await self._route(method, path.split("?", 1)[0])
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path == "/healthz":
            report = await self.health()
            status = "200 OK" if report.get("ok") else "503 Service Unavailable"
            return status, "application/json", json.dumps(report).encode() + b"\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.metrics())
        return "404 Not Found", "text/plain", b"try /healthz or /metrics\n"
