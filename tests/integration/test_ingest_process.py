"""The engine's side of the ingest process (engine.ingest_process.IngestProcess) with a
real child process: a message it cannot store gets a storage error, never an outcome
(DESIGN rule 2), and the engine keeps starting the process again."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from engine.errors import StorageError
from engine.ingest_process import IngestProcess
from tests.integration.reactor_turns import turns

reactor: Any = _reactor
REPO = Path(__file__).resolve().parents[2]
ORU = (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|c1|P|2.5.1\r"
       b"OBR|1|P-1|P-1|CHEM\rOBX|1|NM|GLU^Glucose||5.4|mmol/L|||||F\r")




class IngestProcessTests(unittest.TestCase):
    def setUp(self) -> None:
        # a temporary directory of its own: trial's mktemp() is relative to the working
        # directory, which under pytest is the checkout
        import shutil
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="labrelay-ingest-test-"))
        self.addCleanup(shutil.rmtree, directory, True)
        config = directory / "labrelay.yaml"
        config.write_text(f"""
interfaces:
  - name: t-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}
    transport: {{listen: 'tcp:0:interface=127.0.0.1'}}
""")
        self.config = config

    async def test_a_database_it_cannot_reach_gives_storage_errors_and_restarts(self) -> None:
        # PostgreSQL on a closed port of 127.0.0.1: the process cannot take its lock or
        # store anything, and exits; the engine starts it again, with a growing delay.
        import os

        env = dict(os.environ, PYTHONPATH=str(REPO), LABRELAY_DATABASE_URL=(
            "postgresql+psycopg2://postgres@127.0.0.1:1/none?connect_timeout=2"))
        command = [sys.executable, "-m", "engine.ingest_process", "--config",
                   str(self.config), "--log-format", "json"]
        ingest = IngestProcess(reactor, command, env)
        ingest.start()
        self.addCleanup(ingest.stop)
        outcomes: list[Any] = []
        d = ingest.submit("t-hl7", ORU, "127.0.0.1:1", True)
        d.addBoth(outcomes.append)
        await turns(lambda: bool(outcomes), limit=20_000)
        assert outcomes[0].check(StorageError), outcomes[0]  # never a positive outcome
        await turns(lambda: ingest.restarts >= 1, limit=20_000)
        assert ingest.last_exit.startswith("exit code")
        # while it is down, or after it is started again, the answer is the same
        again: list[Any] = []
        ingest.submit("t-hl7", ORU, "127.0.0.1:1", True).addBoth(again.append)
        await turns(lambda: bool(again), limit=20_000)
        assert again[0].check(StorageError), again[0]
