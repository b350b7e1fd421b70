"""The HTTP ingress reads a body chunk by chunk and stops at the limit (no Ray): a chunked upload, which has
no Content-Length to refuse up front, is never read whole."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
from starlette.requests import Request  # noqa: E402

from deployments.http import read_body  # noqa: E402


def chunked_request(chunks: int, size: int) -> tuple[Request, list[int]]:
    """A POST whose body arrives in `chunks` messages of `size` bytes; the list counts those received."""
    received: list[int] = []

    async def receive() -> dict:
        received.append(1)
        more = len(received) < chunks
        return {"type": "http.request", "body": b"x" * size, "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/v1/act", "headers": [(b"transfer-encoding", b"chunked")]}
    return Request(scope, receive), received


def test_a_chunked_body_past_the_limit_stops_being_read() -> None:
    request, received = chunked_request(chunks=10_000, size=65536)  # 655 MB offered
    assert asyncio.run(read_body(request, limit=200_000)) is None
    assert len(received) == 4  # 4 x 64 kB passes 200 kB: the other 9,996 chunks were never pulled


def test_a_body_within_the_limit_is_read_whole() -> None:
    request, received = chunked_request(chunks=3, size=1000)
    assert asyncio.run(read_body(request, limit=200_000)) == b"x" * 3000
