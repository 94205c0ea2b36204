"""The consumer benchmark's karma API stub: a process of its own, one asyncio loop.

It answers Karma Tracker's ``log-action`` endpoint after ``latency`` seconds (an
``asyncio.sleep``: waiting costs no CPU) and counts calls per ``Idempotency-Key``, which
``GET /stub/keys`` returns. It is part of the measuring instrument, so it must not be what
limits a drain: it runs outside the benchmark's process (no shared GIL with anything), answers
each request in one write with Nagle's algorithm off (asyncio's default for TCP), and its own
ceiling is measured with wrk (``ceiling``) and reported beside the drain's figures.

The tests' stub (``tests/karma_stub.py``) stays a thread in the test process: tests change its
answers while it runs; the benchmark only needs latency and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

# The stub's process imports this module (spawn): not the harness (the bucket, the test servers).

KEYS_PATH = b"/stub/keys"


def _answer(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _serve(latency: float, ports: multiprocessing.Queue) -> None:
    keys: Counter = Counter()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                path = lines[0].split(b" ")[1] if b" " in lines[0] else b""
                length, key = 0, ""
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"idempotency-key":
                        key = value.strip().decode()
                body = await reader.readexactly(length) if length else b""
                if path == KEYS_PATH:
                    writer.write(_answer("200 OK", json.dumps(keys).encode()))
                    continue
                keys[key] += 1
                try:
                    call = json.loads(body) if body else {}
                except ValueError:
                    call = {}
                await asyncio.sleep(latency)
                answer = {"user_id": call.get("user_id"), "intensity": call.get("intensity")}
                writer.write(_answer("200 OK", json.dumps(answer).encode()))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=1024)
    ports.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _main(latency: float, ports: multiprocessing.Queue) -> None:
    asyncio.run(_serve(latency, ports))


@dataclass
class KarmaServer:
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keys(self) -> Counter:
        """Calls per Idempotency-Key so far ("" for calls without one)."""
        with urllib.request.urlopen(f"{self.url}{KEYS_PATH.decode()}", timeout=10) as answer:
            return Counter(json.loads(answer.read()))

    def cpu_seconds(self) -> float:
        from bench.harness import process_cpu

        return process_cpu(self.pid)

    def ceiling(self, seconds: float, connections: int = 64) -> dict:
        """wrk against the stub alone: calls/s it answers, p50, and its CPU per call (µs).

        Its calls carry no Idempotency-Key (counted under "")."""
        from bench.harness import wrk

        cpu = self.cpu_seconds()
        figures = wrk(
            self.port,
            "karma.lua",
            seconds,
            connections,
            path="/api/v1/karma/log-action/",
        )
        used = self.cpu_seconds() - cpu
        figures["cpu_us_per_call"] = used / max(1, figures["requests"]) * 1e6
        return figures


@contextlib.contextmanager
def karma_server(latency: float) -> Iterator[KarmaServer]:
    """A running stub in a process of its own (spawned, so it shares nothing with the bench)."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_main, args=(latency, ports), daemon=True)
    process.start()
    try:
        yield KarmaServer(ports.get(timeout=30), process.pid)
    finally:
        process.terminate()
        process.join(10)
