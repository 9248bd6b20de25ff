"""Start `labrelay run` as a real process on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LABRELAY = [sys.executable, "-m", "engine"]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EngineProcess:
    process: subprocess.Popen[str]
    config_path: Path
    lines: list[dict[str, object]] = field(default_factory=list)
    raw_lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _reader(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.raw_lines.append(line)
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))

    def events(self, name: str) -> list[dict[str, object]]:
        with self._lock:
            return [e for e in self.lines if e.get("event") == name]

    def wait_for(self, name: str, timeout: float = START_TIMEOUT,
                 count: int = 1) -> dict[str, object]:
        """The first event ``name`` once ``count`` of them were logged (polled, bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found[0]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        output = "".join(self.raw_lines[-40:])
        raise AssertionError(f"engine did not log {name!r} within {timeout}s; output:\n{output}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextmanager
def running_engine(config_path: Path, database_url: str, cwd: Path) -> Iterator[EngineProcess]:
    env = dict(os.environ)
    env["LABRELAY_DATABASE_URL"] = database_url
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [*LABRELAY, "--log-format", "json", "run", "--config", str(config_path)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    engine = EngineProcess(process, config_path)
    reader = threading.Thread(target=engine._reader, daemon=True)
    reader.start()
    try:
        engine.wait_for("engine.started")
        yield engine
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        reader.join(5)
