"""ASTM ingestion benchmark: result messages with 25 R records each.

1. TCP: an instrument-side client sends H P O R*25 L messages (one ENQ...EOT session
   each, 240-character frames, waiting for every ACK) into `labrelay run` on SQLite;
   prints messages/s and per-message latency p50/p99, for one connection and for eight
   and sixteen instruments at once (each on its own connection, each waiting for its own
   ACKs).
2. RS-232 at 9600 baud over a pty: the engine reads the pty through Twisted's SerialPort;
   the sender paces its bytes at the line rate (8N1: 960 bytes/s) and waits for each ACK,
   as a real line would. Prints achieved bytes/s (protocol bytes included, both ways) as
   a share of the line rate.

    .venv/bin/python bench/ingest_astm.py [--messages 1000] [--serial-messages 10] [--quick]
        [--connections N ...] [--in-process]

``--quick``: 300 messages per TCP case and 2 over the serial line (about a minute).
``--in-process``: the engine applies messages on its own writer thread
(``ingest_process: false``) instead of its ingest process, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest_hl7 import (  # noqa: E402
    INGEST_PROCESS,
    TESTS,
    WARM_UP,
    admin_yaml,
    check_stored,
    prepare_database,
    writer_load,
    writer_status,
)
from drivers.astm.files import wire_frames  # noqa: E402

ENQ, ACK, NAK, EOT = b"\x05", b"\x06", b"\x15", b"\x04"
LINE_BYTES_PER_SECOND = 9600 / 10  # 8N1: start + 8 data + stop bits


def astm_message(specimen_id: str) -> bytes:
    records = [
        "H|\\^&|||BENCH^1.0^SN1|||||||P|LIS2-A2|20261125120000",
        "P|1||BENCHPID",
        f"O|1|{specimen_id}||^^^T01|R||||||N||||||||||||||F",
    ]
    for n, code in enumerate(TESTS, start=1):
        records.append(f"R|{n}|^^^{code}|{4 + n / 10:.2f}|mmol/L|3.0 to 9.0|N||F||||"
                       "20261125115900|BENCH")
    records.append("L|1|N")
    return ("\r".join(records) + "\r").encode("latin-1")


def mapping_yaml() -> str:
    lines = ["metadata: {analyzer: bench, protocol: astm, version: '1'}", "tests:"]
    for code in TESTS:
        lines += [f"  {code}:", f"    test: {code}", "    units: {ucum: mmol/L}"]
    return "\n".join(lines) + "\n"


def config_yaml(mapping: Path, *, port: int | None = None, device: str | None = None,
                admin_port: int | None = None) -> str:
    transport = (f"listen: tcp:{port}:interface=127.0.0.1" if port is not None
                 else f"serial: {{device: {device}, baudrate: 9600}}")
    return f"""
database: sqlite:///unused.db
ingest_process: {str(INGEST_PROCESS[0]).lower()}
{admin_yaml(admin_port)}interfaces:
  - name: bench-astm
    protocol: astm
    driver: astm-generic
    mapping: {mapping}
    transport:
      {transport}
    limits: {{max_connections: 64}}
"""


class Line:
    """The instrument side of the link over a socket or a pty fd."""

    def __init__(self, send: object, recv: object, pace: bool) -> None:
        self.send, self.recv, self.pace = send, recv, pace
        self.bytes_moved = 0

    def write(self, data: bytes) -> None:
        if self.pace:
            time.sleep(len(data) / LINE_BYTES_PER_SECOND)  # the wire's own time, not a test wait
        self.send(data)  # type: ignore[operator]
        self.bytes_moved += len(data)

    def reply(self, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.recv()  # type: ignore[operator]
            if data:
                self.bytes_moved += len(data)
                for byte in data:
                    if bytes([byte]) in (ACK, NAK, EOT):
                        return bytes([byte])
        raise TimeoutError("no reply within 30 s")

    def session(self, text: bytes) -> None:
        self.write(ENQ)
        if self.reply() != ACK:
            raise RuntimeError("ENQ not acknowledged")
        for frame in wire_frames(text):
            for _attempt in range(6):
                self.write(frame)
                if self.reply() == ACK:
                    break
            else:
                raise RuntimeError("frame refused 6 times")
        self.write(EOT)


def start_engine(config: Path, url: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, LABRELAY_DATABASE_URL=url, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "engine", "--log-format", "json", "run",
                             "--config", str(config)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_engine(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


class _Instrument(asyncio.Protocol):
    """One analyzer on its own connection: ENQ, frames (each waits for its ACK), EOT.

    A protocol, not streams: a reply is a future resolved in ``data_received``, so the
    load generator spends microseconds per frame and leaves the two cores to the engine
    it measures (``asyncio.wait_for`` on a stream read made a task per frame).
    """

    def __init__(self, texts: list[bytes], latencies: list[float], done: asyncio.Future[None]):
        self.texts, self.latencies, self.done = texts, latencies, done
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)
        self.task = asyncio.ensure_future(self._run())

    def data_received(self, data: bytes) -> None:
        for byte in data:
            if byte in (ACK[0], NAK[0], EOT[0]) and self.reply and not self.reply.done():
                self.reply.set_result(bytes([byte]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reply and not self.reply.done():
            self.reply.set_exception(ConnectionError("engine closed the connection"))

    async def _send(self, data: bytes) -> bytes:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.reply = loop.create_future()
        timeout = loop.call_later(30, self.reply.cancel)  # bounded: no reply in 30 s fails
        self.transport.write(data)
        try:
            return await self.reply
        finally:
            timeout.cancel()

    async def _run(self) -> None:
        assert self.transport is not None
        try:
            for text in self.texts:
                started = time.perf_counter()
                if await self._send(ENQ) != ACK:
                    raise RuntimeError("ENQ not acknowledged")
                for frame in wire_frames(text):
                    for _attempt in range(6):
                        if await self._send(frame) == ACK:
                            break
                    else:
                        raise RuntimeError("frame refused 6 times")
                self.transport.write(EOT)
                self.latencies.append(time.perf_counter() - started)
            self.transport.close()
            self.done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting benchmark
            self.transport.close()
            if not self.done.done():
                self.done.set_exception(exc)


async def _instrument(port: int, texts: list[bytes], latencies: list[float]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: _Instrument(texts, latencies, done), "127.0.0.1", port)
    await done


async def _instruments(
    port: int, connections: int, texts: list[bytes]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(_instrument(port, texts[i::connections], latencies)
                           for i in range(connections)))
    return time.perf_counter() - started, latencies


def bench_tcp(workdir: Path, mapping: Path, count: int, connections: int) -> None:
    from bench.ingest_hl7 import _wait_listening, free_port

    url = f"sqlite:///{workdir / f'astm-tcp-{connections}.db'}"
    prepare_database(url, count + WARM_UP)
    port, admin_port = free_port(), free_port()
    config = workdir / "astm-tcp.yaml"
    config.write_text(config_yaml(mapping, port=port, admin_port=admin_port))
    process = start_engine(config, url, workdir)
    try:
        _wait_listening(port, process)
        texts = [astm_message(f"B{i:07d}") for i in range(count + WARM_UP)]
        # Warm-up, not counted: the first messages pay for imports and compiled statements.
        asyncio.run(_instruments(port, 1, texts[:WARM_UP]))
        before = writer_status(admin_port)
        elapsed, latencies = asyncio.run(_instruments(port, connections, texts[WARM_UP:]))
        load = writer_load(before, writer_status(admin_port), elapsed)
    finally:
        stop_engine(process)
    latencies.sort()
    check = check_stored(url, count + WARM_UP)
    print(f"TCP, SQLite, 25 results/message, x{connections}: {count / elapsed:7.0f} msg/s   "
          f"p50 {statistics.median(latencies) * 1000:5.1f} ms   "
          f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:5.1f} ms   {check}")
    if load:
        print(f"    {load}")


def bench_serial(workdir: Path, mapping: Path, count: int) -> None:
    import termios
    import tty

    url = f"sqlite:///{workdir / 'astm-serial.db'}"
    prepare_database(url, count)
    master, slave = os.openpty()
    tty.setraw(master)
    device = os.ttyname(slave)
    config = workdir / "astm-serial.yaml"
    config.write_text(config_yaml(mapping, device=device))
    process = start_engine(config, url, workdir)
    os.set_blocking(master, False)

    def recv() -> bytes:
        try:
            return os.read(master, 64)
        except BlockingIOError:
            time.sleep(0.0005)
            return b""

    try:
        time.sleep(3)  # the engine opens the pty; nothing to poll for on a serial line
        line = Line(lambda data: os.write(master, data), recv, pace=True)
        started = time.perf_counter()
        for i in range(count):
            line.session(astm_message(f"B{i:07d}"))
        elapsed = time.perf_counter() - started
    finally:
        stop_engine(process)
        termios.tcflush(master, termios.TCIOFLUSH)
        os.close(master)
        os.close(slave)
    rate = line.bytes_moved / elapsed
    print(f"RS-232 pty at 9600 baud: {count} messages, {line.bytes_moved} bytes in "
          f"{elapsed:.1f} s = {rate:.0f} bytes/s = {rate / LINE_BYTES_PER_SECOND:.1%} of the "
          "line rate (protocol bytes counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--serial-messages", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help="300 messages per TCP case, 2 over the serial line")
    parser.add_argument("--in-process", action="store_true",
                        help="apply messages on the engine's own writer thread "
                             "(ingest_process: false), for comparison")
    parser.add_argument("--connections", type=int, action="append",
                        help="TCP connection counts to run (repeatable; default 1, 8, 16)")
    args = parser.parse_args()
    INGEST_PROCESS[0] = not args.in_process
    print("ASTM results, 25 per message; applied by "
          + ("the engine's writer thread" if args.in_process else "the ingest process"))
    if args.quick:
        args.messages, args.serial_messages = 300, 2
    workdir = Path(tempfile.mkdtemp(prefix="labrelay-astm-bench-"))
    mapping = workdir / "bench-astm.yaml"
    mapping.write_text(mapping_yaml())
    try:
        for connections in args.connections or (1, 8, 16):
            bench_tcp(workdir, mapping, args.messages, connections)
        bench_serial(workdir, mapping, args.serial_messages)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
