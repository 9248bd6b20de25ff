"""HL7 ingestion benchmark: ORU^R01 with 25 OBX, 1 and 8 connections, SQLite and PostgreSQL.

Each connection sends the next message after the ACK for the previous one (as analyzers
do). The engine runs as a separate process (`labrelay run`), storing the raw message and
applying all 25 results to a sample that was ordered and received. The same load against
a bare Twisted MLLP server that only stores the raw bytes gives the ceiling on this
machine; the ratio says what decoding, mapping and applying cost.

    .venv/bin/python bench/ingest_hl7.py [--messages 2000] [--postgres URL] [--quick]
        [--only sqlite|postgresql] [--connections N ...] [--engine-only] [--in-process]

Prints messages/s and ACK latency p50/p99 per case, and the CPU time per message of each
process taking part (the server, the engine's ingest process, PostgreSQL's processes, the
bench's own clients), read from /proc. ``--quick``: 300 messages per case.
``--in-process``: the engine applies messages on its own writer thread
(``ingest_process: false``) instead of its ingest process, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from lis_bridge.db import make_engine, upgrade  # noqa: E402
from lis_bridge.models import OrderedTest, Sample  # noqa: E402

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
TESTS = [f"T{i:02d}" for i in range(1, 26)]
WARM_UP = 50  # messages sent first on one connection, not timed
# engine.ingest_process on (the default) or off (--in-process), for all cases of a run
INGEST_PROCESS = [True]
ADMIN_TOKEN = "bench-admin-token"  # noqa: S105 - a local bench engine on 127.0.0.1
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/labrelay_bench"


def oru(specimen_id: str, control_id: str, seq: int = 0) -> bytes:
    """The bench's message. Its values differ from one message (``seq``) to the next, as
    a lab's do (600 values in the 3.00-8.99 range), so that nothing the engine remembers
    of values it has seen flatters the figures."""
    segments = [
        f"MSH|^~\\&|BENCH|LAB|LIS|LAB|20261125120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        "PID|1||BENCHPID||Bench^Patient",
        f"OBR|1|{specimen_id}|{specimen_id}|PANEL^Bench panel",
    ]
    for n, code in enumerate(TESTS, start=1):
        value = 3 + (seq * 7919 + n * 104729) % 600 / 100
        segments.append(
            f"OBX|{n}|NM|{code}^Test {code}||{value:.2f}|mmol/L|3.0-9.0|N|||F|||20261125115900"
        )
    return ("\r".join(segments) + "\r").encode()


def mapping_yaml() -> str:
    lines = [
        "metadata: {analyzer: bench, protocol: hl7, version: '1'}",
        "tests:",
    ]
    for code in TESTS:
        lines += [
            f"  {code}:",
            f"    test: {code}",
            "    units: {ucum: mmol/L}",
        ]
    return "\n".join(lines) + "\n"


def admin_yaml(admin_port: int | None) -> str:
    """The config's admin block, so the bench can read the writer's load from /status."""
    if not admin_port:
        return ""
    return f"admin: {{listen: 'tcp:{admin_port}:interface=127.0.0.1', token: {ADMIN_TOKEN}}}\n"


def config_yaml(port: int, mapping: Path, admin_port: int | None = None) -> str:
    return f"""
database: sqlite:///unused.db
ingest_process: {str(INGEST_PROCESS[0]).lower()}
{admin_yaml(admin_port)}interfaces:
  - name: bench-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {mapping}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
    limits: {{max_connections: 64}}
"""


def prepare_database(url: str, count: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Sample),
            [
                {"specimen_id": f"B{i:07d}", "state": "RECEIVED_AT_LAB", "location": "bench",
                 "state_changed_at": now, "created_at": now}
                for i in range(count)
            ],
        )
        ids = dict(conn.execute(text("SELECT specimen_id, id FROM samples")).tuples().all())
        rows = [
            {"sample_fk": ids[f"B{i:07d}"], "test_code": code, "status": "ORDERED",
             "ordered_at": now}
            for i in range(count)
            for code in TESTS
        ]
        for start in range(0, len(rows), 5000):
            conn.execute(insert(OrderedTest), rows[start : start + 5000])
    engine.dispose()


def fresh_postgres(base_url: str) -> str | None:
    url = make_url(base_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{url.database}"'))
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        print(f"PostgreSQL not available ({exc}); skipping it")
        return None
    finally:
        admin.dispose()
    return url.render_as_string(hide_password=False)


def writer_status(admin_port: int | None) -> dict[str, float] | None:
    """The engine's writer counters from its admin /status (None without admin)."""
    if admin_port is None:
        return None
    import json
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/status",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - http only
            status = json.loads(response.read())
    except (OSError, ValueError):
        return None
    # inbound messages are written by the ingest process's writer when there is one
    ingest = status.get("ingest") or {}
    writer = ingest.get("writer") or status.get("writer")
    return dict(writer) if writer else None


def writer_load(before: dict[str, float] | None, after: dict[str, float] | None,
                elapsed: float) -> str:
    """How busy the writer was during the timed run, and its mean batch: a writer busy
    nearly all the time is the bottleneck; one idle half the time waits on the line."""
    if not before or not after:
        return ""
    batches = after["batches"] - before["batches"]
    units = after["units"] - before["units"]
    busy = after["busy_seconds"] - before["busy_seconds"]
    wait = after.get("wait_seconds", 0.0) - before.get("wait_seconds", 0.0)
    return (f"writer busy {busy / elapsed:.0%} of the time, "
            f"mean batch {units / max(batches, 1):.1f} in {busy / max(batches, 1) * 1000:.1f} ms, "
            f"mean wait for a batch {wait / max(units, 1) * 1000:.1f} ms")


def check_stored(url: str, count: int) -> str:
    """What the figures claim: every message stored, applied, and its 25 results written."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            applied = conn.scalar(text("SELECT count(*) FROM raw_messages WHERE status = "
                                       "'APPLIED'"))
            results = conn.scalar(text("SELECT count(*) FROM results"))
    finally:
        engine.dispose()
    ok = applied == count and results == count * len(TESTS)
    return (f"stored: {applied} messages APPLIED, {results} results"
            f"{'' if ok else '  <-- NOT ALL STORED'}")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, and theirs (the engine's ingest process)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(c) for c in children)
        todo.extend(int(c) for c in children)
    return found


def _postgres_pids(url: str) -> list[int]:
    """Every process of the PostgreSQL server the bench uses (backends, WAL writer,
    checkpointer...): pg_stat_activity, read on the same machine."""
    if not url.startswith("postgresql"):
        return []
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [int(pid) for pid in conn.scalars(text(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"))]
    except Exception:  # noqa: BLE001 - a benchmark reports what it can
        return []
    finally:
        engine.dispose()


class CpuMeter:
    """CPU time per message of each process taking part, over the timed run: where the
    machine's cores go (2 cores give 2 s of CPU per second, shared by all of them)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: pids for name, pids in groups.items() if pids}
        self.start = {name: self._total(pids) for name, pids in self.groups.items()}
        self.client_start = time.process_time()

    @staticmethod
    def _total(pids: list[int]) -> float:
        return sum(_cpu_seconds(pid) or 0.0 for pid in pids)

    def report(self, messages: int, elapsed: float) -> str:
        used = {name: self._total(pids) - self.start[name] for name, pids in self.groups.items()}
        used["clients"] = time.process_time() - self.client_start
        total = sum(used.values())
        parts = ", ".join(f"{name} {seconds / messages * 1000:.2f}" for name, seconds in
                          used.items())
        return (f"CPU per message (ms): {parts}; {total / messages * 1000:.2f} in all, "
                f"{total / elapsed:.2f} of {os.cpu_count()} cores busy")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _connection(port: int, messages: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    failures = 0
    for message in messages:
        started = time.perf_counter()
        writer.write(VT + message + FS + CR)
        await writer.drain()
        ack = await asyncio.wait_for(reader.readuntil(FS + CR), 30)
        latencies.append(time.perf_counter() - started)
        if b"MSA|AA" not in ack and b"MSA|CA" not in ack:
            failures += 1
    writer.close()
    await writer.wait_closed()
    return failures


async def _load(
    port: int, connections: int, messages: list[bytes]
) -> tuple[float, list[float], int]:
    per = [messages[i::connections] for i in range(connections)]
    latencies: list[float] = []
    started = time.perf_counter()
    failures = await asyncio.gather(*(_connection(port, chunk, latencies) for chunk in per))
    return time.perf_counter() - started, latencies, sum(failures)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start listening")


def run_case(label: str, command: list[str], env: dict[str, str], port: int, connections: int,
             messages: list[bytes], workdir: Path, admin_port: int | None = None,
             url: str = "") -> float:
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, process)
        # Warm-up, not counted: the first messages pay for imports and compiled statements.
        asyncio.run(_load(port, 1, messages[:WARM_UP]))
        before = writer_status(admin_port)
        meter = CpuMeter({"server": [process.pid], "ingest": _descendants(process.pid),
                          "postgresql": _postgres_pids(url)})
        elapsed, latencies, failures = asyncio.run(_load(port, connections,
                                                         messages[WARM_UP:]))
        cpu = meter.report(len(messages) - WARM_UP, elapsed)
        load = writer_load(before, writer_status(admin_port), elapsed)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    rate = (len(messages) - WARM_UP) / elapsed
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"{label:<44} {rate:8.0f} msg/s   ACK p50 {p50:6.1f} ms   p99 {p99:6.1f} ms"
          f"   not-AA {failures}")
    if load:
        print(f"{'':<44} {load}")
    print(f"{'':<44} {cpu}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--postgres",
                        default=os.environ.get("LABRELAY_BENCH_POSTGRES", DEFAULT_PG))
    parser.add_argument("--quick", action="store_true", help="300 messages per case")
    parser.add_argument("--only", choices=("sqlite", "postgresql"),
                        help="run one database's cases only")
    parser.add_argument("--connections", type=int, action="append",
                        help="connection counts to run (repeatable; default 1 and 8)")
    parser.add_argument("--engine-only", action="store_true",
                        help="skip the bare store-only ceiling runs")
    parser.add_argument("--in-process", action="store_true",
                        help="apply messages on the engine's own writer thread "
                             "(ingest_process: false), for comparison")
    args = parser.parse_args()
    INGEST_PROCESS[0] = not args.in_process
    if args.quick:
        args.messages = 300
    workdir = Path(tempfile.mkdtemp(prefix="labrelay-bench-"))
    try:
        mapping = workdir / "bench.yaml"
        mapping.write_text(mapping_yaml())
        version = sys.version.split()[0]
        where = "the engine's writer thread" if args.in_process else "the ingest process"
        print(f"ORU^R01 with 25 OBX; {args.messages} messages per case; python {version}; "
              f"applied by {where}")
        databases = []
        if args.only != "postgresql":
            databases.append(("sqlite", f"sqlite:///{workdir / 'bench.db'}"))
        pg = fresh_postgres(args.postgres) if args.only != "sqlite" else None
        if pg:
            databases.append(("postgresql", pg))
        modes = ("engine",) if args.engine_only else ("engine", "bare")
        engine_rate = 0.0
        for db_label, url in databases:
            for connections in args.connections or (1, 8):
                for mode in modes:
                    if db_label == "sqlite":
                        url = f"sqlite:///{workdir / f'bench-{connections}-{mode}.db'}"
                    else:
                        url = fresh_postgres(args.postgres) or url
                    prepare_database(url, args.messages + WARM_UP)
                    tag = f"{time.time_ns()}"
                    messages = [oru(f"B{i:07d}", f"{tag}-{i}", i)
                                for i in range(args.messages + WARM_UP)]
                    port = free_port()
                    env = dict(os.environ, LABRELAY_DATABASE_URL=url, PYTHONPATH=str(REPO))
                    if mode == "engine":
                        config = workdir / "bench-config.yaml"
                        admin_port: int | None = free_port()
                        config.write_text(config_yaml(port, mapping, admin_port))
                        command = [sys.executable, "-m", "engine", "--log-format", "json", "run",
                                   "--config", str(config)]
                        label = f"{db_label} engine (store+apply 25) x{connections}"
                    else:
                        command = [sys.executable, str(REPO / "bench" / "bare_mllp_server.py"),
                                   str(port), url]
                        label = f"{db_label} bare MLLP store-only x{connections}"
                    rates = run_case(label, command, env, port, connections, messages, workdir,
                                     admin_port if mode == "engine" else None, url)
                    if mode == "engine":
                        engine_rate = rates
                        print(f"{'':<44} {check_stored(url, len(messages))}")
                    elif engine_rate:
                        print(f"{'':<44} engine / ceiling = {engine_rate / rates:.0%}")

    finally:
        shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    main()
