"""The engine as a Twisted service: interfaces, the writer, the outbox runner, admin HTTP.

`labrelay run` builds one :class:`EngineService`, starts it under the reactor and stops it
on SIGINT/SIGTERM: listeners close first, then the writer finishes what is queued, so
nothing acknowledged is half-written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import structlog
from sqlalchemy import select
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

from engine.config import EngineConfig, InterfaceConfig
from engine.errors import LabrelayError
from engine.pipeline import (
    ASTMHandler,
    HL7Handler,
    InterfaceRuntime,
    Pipeline,
    load_runtime,
    unapplied_messages,
)
from engine.writer import DatabaseWriter
from lis_bridge.db import ensure_current, make_engine, session_factory, upgrade
from lis_bridge.models import MessageStatus, RawMessage

log = structlog.get_logger(__name__)
RELOAD_TIMEOUT = 30.0  # seconds the ingest process has to answer a mapping reload


@dataclass
class InterfaceState:
    name: str
    protocol: str
    transport: str
    status: str = "starting"  # starting | up | failed | stopped
    reason: str = ""
    address: str = ""


class EngineService(MultiService):
    """The engine. ``ingest_command``: how to start the ingest process
    (:mod:`engine.ingest_process`; ``labrelay run`` gives it); without it, or with
    ``ingest_process: false`` in the config, inbound messages are applied by the writer
    thread of this process."""

    def __init__(self, config: EngineConfig, database_url: str, reactor: Any = None, *,
                 ingest_command: list[str] | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.database_url = database_url
        self.reactor = reactor
        self.interface_states: dict[str, InterfaceState] = {}
        self.runtimes: dict[str, InterfaceRuntime] = {}
        self.ports: list[Any] = []
        self.closers: list[Any] = []
        self.factories: dict[str, Any] = {}
        self.engine: Any = None
        self.writer: DatabaseWriter | None = None
        self.pipeline: Pipeline | None = None
        self.ready: Deferred[None] = Deferred()
        self.attention: dict[str, Any] = {}
        self.started_at = datetime.now(UTC)
        self._attention_loop: Any = None
        self.ingest_command = ingest_command
        self.ingest: Any = None  # engine.ingest_process.IngestProcess
        self._reload_lock = defer.DeferredLock()

    # ------------------------------------------------------------------ start

    def startService(self) -> None:
        self.engine = make_engine(self.database_url, writer=True)
        url = self.engine.url.render_as_string(hide_password=True)
        if self.engine.dialect.name == "sqlite":
            upgrade(self.engine)  # the embedded default creates itself on first run
        else:
            ensure_current(self.engine)
        sessions = session_factory(self.engine)
        self.writer = DatabaseWriter(sessions, self.reactor)
        self.writer.start()
        log.info("engine.database.open", database=url)
        for iface in self.config.interfaces:
            state = InterfaceState(iface.name, iface.protocol, iface.transport_summary)
            self.interface_states[iface.name] = state
            if not iface.enabled:
                state.status = "disabled"
                log.info("interface.disabled", interface=iface.name)
                continue
            try:
                self.runtimes[iface.name] = load_runtime(iface)
            except LabrelayError as exc:
                self._failed(state, str(exc))
        if self.config.ingest_process and self.ingest_command:
            import os

            from engine.ingest_process import IngestProcess

            self.ingest = IngestProcess(
                self.reactor, self.ingest_command,
                dict(os.environ, LABRELAY_DATABASE_URL=self.database_url),
                alert=lambda message, detail: self._alert(message, detail, "engine"),
                restarted=self._resume_unapplied)
            self.ingest.start()
        self.pipeline = Pipeline(self.writer, self.runtimes, node_name=self.config.node_name,
                                 ingest=self.ingest)
        starts = [self._start_interface(self.runtimes[name].config) for name in self.runtimes]
        self._resume_unapplied()
        self._resume_queued_orders()
        from twisted.internet.task import LoopingCall

        self._attention_loop = LoopingCall(self._refresh_attention)
        self._attention_loop.clock = self.reactor
        self._attention_loop.start(10.0, now=True)
        self._start_outbox()
        self._start_admin()
        super().startService()
        dl = defer.DeferredList(starts, consumeErrors=True)
        dl.addCallback(lambda _r: self._log_ready())

    def _log_ready(self) -> None:
        up = [s.name for s in self.interface_states.values() if s.status == "up"]
        failed = [s.name for s in self.interface_states.values() if s.status == "failed"]
        log.info("engine.started", interfaces_up=len(up), interfaces_failed=len(failed),
                 failed=failed)
        self.ready.callback(None)

    def _failed(self, state: InterfaceState, reason: str) -> None:
        state.status = "failed"
        state.reason = reason
        log.error("interface.failed", interface=state.name, transport=state.transport,
                  reason=reason)
        self._alert(f"interface {state.name} is down: it could not start", reason, state.name)

    def _alert(self, message: str, detail: str, interface: str) -> None:
        """An engine alert through the outbox (notifications with retries and escalation)."""
        if self.writer is None:
            return
        from lis_bridge.outbox import enqueue

        key = f"notify:engine:{interface}:{message}:{self.started_at:%Y%m%d%H%M%S}"

        def work(session: Any) -> None:
            enqueue(session, "notify", key[:200], {
                "kind": "engine_alert", "severity": "error", "message": message,
                "detail": detail[:500], "interface": interface,
            })

        self.writer.submit(work).addErrback(
            lambda f: log.error("engine.alert.not_stored", error=f.getErrorMessage()[:200]))

    def _refresh_attention(self) -> None:
        """Database counts for /status, refreshed off the reactor thread."""
        if self.writer is None:
            return
        from lis_bridge.health import attention_summary

        def store(summary: dict[str, Any]) -> None:
            self.attention = summary

        self.writer.submit(attention_summary).addCallbacks(
            store, lambda f: log.warning("engine.status.refresh_failed",
                                         error=f.getErrorMessage()[:200]))

    def _start_interface(self, iface: InterfaceConfig) -> Deferred[Any]:
        state = self.interface_states[iface.name]
        assert self.pipeline is not None
        try:
            if iface.protocol == "hl7":
                d = self._start_hl7(iface)
            else:
                d = self._start_astm(iface)
        except (LabrelayError, OSError, ValueError) as exc:
            self._failed(state, str(exc))
            return defer.succeed(None)

        def up(port: Any) -> None:
            state.status = "up"
            if IListeningPort.providedBy(port):
                self.ports.append(port)
                host = port.getHost()
                state.address = f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"
            log.info("interface.started", interface=iface.name, protocol=iface.protocol,
                     transport=iface.transport_summary, bound=state.address)

        def failed(failure: Any) -> None:
            self._failed(state, failure.getErrorMessage())

        d.addCallbacks(up, failed)
        return d

    def _start_hl7(self, iface: InterfaceConfig) -> Deferred[Any]:
        from engine.adapters.mllp import MLLPServerFactory

        assert self.pipeline is not None
        if not iface.listen:
            raise LabrelayError("HL7 interfaces listen for analyzers: set transport.listen")
        factory = MLLPServerFactory(
            HL7Handler(self.pipeline),
            iface.name,
            max_message_size=iface.max_message_bytes,
            idle_timeout=iface.idle_timeout,
            max_connections=iface.max_connections,
            allowlist=iface.allowlist or None,
            mllp_release=iface.mllp_release,
            clock=self.reactor,
        )
        self.factories[iface.name] = factory
        return self._listen(iface, self._captured(iface, factory))

    def _captured(self, iface: InterfaceConfig, factory: Any) -> Any:
        """The interface's factory, wrapped to record every byte when capture is on
        (DESIGN rule 7). Inside TLS, so the capture holds the plain text."""
        if not iface.capture:
            return factory
        from engine.capture import CaptureFactory, CaptureFile

        capture = CaptureFile(self.config.capture_dir, iface.name,
                              max_bytes=self.config.capture_max_bytes,
                              keep=self.config.capture_keep)
        log.info("capture.enabled", interface=iface.name,
                 directory=str(self.config.capture_dir))
        return CaptureFactory(factory, capture)

    def _listen(self, iface: InterfaceConfig, factory: Any) -> Deferred[Any]:
        """Listen on ``transport.listen``; with a ``transport.tls`` block, TLS (mutual TLS
        when it names client_ca) is added here, since an ssl: string cannot demand a
        client certificate."""
        from twisted.internet.endpoints import serverFromString

        assert iface.listen is not None
        endpoint = serverFromString(self.reactor, iface.listen)
        if iface.tls is None:
            return endpoint.listen(factory)
        from twisted.protocols.tls import TLSMemoryBIOFactory

        options = iface.tls.server_options()
        return endpoint.listen(TLSMemoryBIOFactory(options, False, factory))

    def _start_astm(self, iface: InterfaceConfig) -> Deferred[Any]:
        """The same link core on a TCP listener, a TCP client or an RS-232 line."""
        from twisted.application.internet import ClientService, backoffPolicy
        from twisted.internet.endpoints import clientFromString

        from engine.adapters.astm import ASTMFactory, open_serial

        assert self.pipeline is not None
        factory = ASTMFactory(
            ASTMHandler(self.pipeline),
            iface.name,
            clock=self.reactor,
            role=iface.astm.role,
            link_options={
                "frame_size": iface.astm.frame_size,
                "lenient": iface.astm.lenient,
                "accept_lowercase_checksum": iface.astm.accept_lowercase_checksum,
                "max_message_size": iface.max_message_bytes,
            },
            allowlist=iface.allowlist or None,
            max_connections=iface.max_connections,
        )
        self.factories[iface.name] = factory
        wrapped = self._captured(iface, factory)
        if iface.listen:
            return self._listen(iface, wrapped)
        if iface.connect:
            endpoint = clientFromString(self.reactor, iface.connect)
            client = ClientService(endpoint, cast(Any, wrapped), clock=self.reactor,
                                   retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=60.0))
            client.startService()
            self.closers.append(client.stopService)
            return defer.succeed(None)
        assert iface.serial is not None
        serial = iface.serial
        port = open_serial(self.reactor, cast(Any, wrapped), serial.device,
                           baudrate=serial.baudrate,
                           bytesize=serial.bytesize, parity=serial.parity,
                           stopbits=serial.stopbits)
        self.closers.append(port.loseConnection)
        return defer.succeed(None)

    def _resume_unapplied(self) -> None:
        """Messages stored but not applied when the last run stopped (after_commit policy),
        applied one unit each, in arrival order: one faulty message cannot hold back the rest
        (it is HELD with INTERNAL_ERROR and an alert). Also each time the ingest process is
        started again: it may have stored messages and stopped before the engine heard of
        them. A message queued twice is applied once (see :func:`engine.pipeline.apply_later`)."""
        assert self.writer is not None
        assert self.pipeline is not None
        runtimes = self.runtimes
        pipeline = self.pipeline

        def resume(rows: list[tuple[int, str]]) -> None:
            count = 0
            for message_id, interface in rows:
                rt = runtimes.get(interface)
                if rt is not None:
                    pipeline.apply_later(rt, message_id)
                    count += 1
            if count:
                log.info("engine.resumed", messages=count)

        self.writer.submit(unapplied_messages).addCallbacks(
            resume, lambda f: log.error("engine.resume.failed", error=f.getErrorMessage()[:300]))

    def _start_outbox(self) -> None:
        try:
            from engine.outbox_runner import build_outbox_runner
        except ImportError:
            return
        runner = build_outbox_runner(self.config, self.database_url, self.reactor)
        if runner is not None:
            runner.setServiceParent(self)

    def _start_admin(self) -> None:
        if not self.config.admin.listen:
            return
        from twisted.internet.endpoints import serverFromString
        from twisted.web.server import Site

        from engine.admin import AdminResource

        site = Site(AdminResource(self))
        d = serverFromString(self.reactor, self.config.admin.listen).listen(site)

        def up(port: Any) -> None:
            self.ports.append(port)
            host = port.getHost()
            log.info("admin.started", bound=f"{getattr(host, 'host', '')}:"
                     f"{getattr(host, 'port', '')}")

        d.addCallbacks(up, lambda f: log.error("admin.failed", reason=f.getErrorMessage()))

    # ------------------------------------------------------------------ stop

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("engine.stopping")
        for port in self.ports:
            yield defer.maybeDeferred(port.stopListening)
        for closer in self.closers:
            yield defer.maybeDeferred(closer)
        for factory in self.factories.values():
            for conn in list(getattr(factory, "connections", ())):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.loseConnection()
        yield defer.maybeDeferred(super().stopService)
        if self.ingest is not None:
            # it finishes the batch it holds and answers; then this writer drains
            yield self.ingest.stop()
        if self.writer is not None:
            # Let the reactor deliver the last callbacks, then drain the queue.
            from twisted.internet import threads

            yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self.writer.stop
            )
        if self.engine is not None:
            self.engine.dispose()
        for state in self.interface_states.values():
            if state.status == "up":
                state.status = "stopped"
        log.info("engine.stopped")

    # ------------------------------------------------------------------ mapping reload

    def reload_mappings(self) -> Deferred[dict[str, Any]]:
        """``labrelay mapping reload`` / SIGHUP: read every interface's mapping file again,
        here and in the ingest process (:func:`engine.pipeline.reload_mappings`). Fires
        with ``{"ok", "interfaces": {name: outcome}, "ingest_process"}``; ``ok`` is false
        if any file could not be loaded (that interface keeps its mapping) or the two
        processes read different versions of a file. Reloads run one at a time."""
        return self._reload_lock.run(self._reload_mappings)

    @defer.inlineCallbacks
    def _reload_mappings(self) -> Any:
        from twisted.internet import threads

        from engine.pipeline import PipelineStats, reload_mappings

        fresh = dict(self.runtimes)
        # the files are read and validated off the reactor, then swapped in on it
        outcome = yield threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), reload_mappings, fresh,
            self.config.interfaces)
        self.runtimes.update(fresh)
        ok = all("error" not in o for o in outcome.values())
        ingest_note = "not used (ingest_process: false)"
        if self.ingest is not None:
            try:
                remote = yield self.ingest.reload_mappings().addTimeout(
                    RELOAD_TIMEOUT, self.reactor)
            except defer.TimeoutError:
                ok = False
                ingest_note = (f"did not answer within {RELOAD_TIMEOUT:g} s and may still "
                               "use the mappings it had; run the reload again")
            except LabrelayError as exc:
                # not running: it reads the files when it is started again
                ingest_note = str(exc)
            else:
                ingest_note = "reloaded"
                for name, theirs in remote.items():
                    mine = outcome.setdefault(name, {})
                    if theirs.get("sha256") != mine.get("sha256") or "error" in theirs:
                        ok = False
                        mine["ingest_process"] = theirs
                        mine.setdefault("error", theirs.get("error") or (
                            "the ingest process read another version of the file (was it "
                            "being edited?); run the reload again"))
        for name, result in outcome.items():
            if result.get("started") and name in self.runtimes and self.pipeline is not None:
                state = self.interface_states[name]
                state.status, state.reason = "starting", ""
                self.pipeline.stats.setdefault(name, PipelineStats())
                self._start_interface(self.runtimes[name].config)
        log.info("mapping.reload.done", ok=ok,
                 reloaded=sorted(n for n, o in outcome.items() if o.get("reloaded")),
                 failed=sorted(n for n, o in outcome.items() if "error" in o),
                 ingest_process=ingest_note)
        return {"ok": ok, "interfaces": outcome, "ingest_process": ingest_note}

    # ------------------------------------------------------------------ order download

    def push_orders(self, interface: str, specimen_ids: list[str]) -> Deferred[dict[str, Any]]:
        """Download the ordered tests of ``specimen_ids`` to an ASTM analyzer (PROTOCOLS 67).

        Tests are read from the LIS and translated through the interface's mapping; the
        message is stored (direction out) and queued on the link, which sends it when the
        line is free (contention rules apply) and retries per LIS01-A2.
        """
        from engine.pipeline import build_order_download

        runtime = self.runtimes.get(interface)
        factory = self.factories.get(interface)
        if runtime is None or factory is None or runtime.config.protocol != "astm":
            return defer.fail(LabrelayError(
                f"{interface!r} is not a running ASTM interface; order download needs one"))
        assert self.writer is not None
        d = self.writer.submit(lambda s: build_order_download(s, runtime, specimen_ids))

        def queue(result: tuple[bytes | None, dict[str, Any]]) -> dict[str, Any]:
            text, summary = result
            if text is not None:
                self._send_stored_order(interface, factory, summary["message_id"], text)
            return summary

        return d.addCallback(queue)

    def _send_stored_order(self, interface: str, factory: Any, message_id: int,
                           text: bytes) -> None:
        """Queue a stored (QUEUED) order message on the link; SENT once the analyzer accepted
        it, NOT_SENT with an alert if it never did. QUEUED ones are sent again at start."""
        assert self.writer is not None
        writer = self.writer

        def mark(status: str) -> None:
            def work(session: Any) -> None:
                row = session.get(RawMessage, message_id)
                if row is not None:
                    row.status = status

            writer.submit(work).addErrback(
                lambda f: log.error("astm.orders.status_not_stored", message_id=message_id,
                                    error=f.getErrorMessage()[:200]))

        def delivered(_result: Any) -> None:
            log.info("astm.orders.delivered", interface=interface, message_id=message_id)
            mark(MessageStatus.SENT)

        def failed(failure: Any) -> None:
            mark(MessageStatus.NOT_SENT)
            self._alert(f"order download #{message_id} to {interface} failed",
                        failure.getErrorMessage(), interface)

        factory.send_message(text).addCallbacks(delivered, failed)

    def _resume_queued_orders(self) -> None:
        """Order downloads stored but not accepted when the last run stopped."""
        assert self.writer is not None

        def pending(session: Any) -> list[tuple[int, str, bytes]]:
            return list(session.execute(
                select(RawMessage.id, RawMessage.interface, RawMessage.payload)
                .where(RawMessage.status == MessageStatus.QUEUED, RawMessage.direction == "out")
                .order_by(RawMessage.id).limit(1_000)
            ).tuples())

        def resend(rows: list[tuple[int, str, bytes]]) -> None:
            for message_id, interface, payload in rows:
                factory = self.factories.get(interface)
                if factory is not None and hasattr(factory, "send_message"):
                    self._send_stored_order(interface, factory, message_id, payload)
            if rows:
                log.info("astm.orders.resumed", messages=len(rows))

        self.writer.submit(pending).addCallbacks(
            resend, lambda f: log.error("astm.orders.resume_failed",
                                        error=f.getErrorMessage()[:200]))

    # ------------------------------------------------------------------ status

    def _mapping_digest(self, name: str) -> str:
        runtime = self.runtimes.get(name)
        return runtime.mapping_sha256 if runtime is not None else ""

    def status(self) -> dict[str, Any]:
        writer = self.writer
        pipeline = self.pipeline
        interfaces = []
        for state in self.interface_states.values():
            stats = pipeline.stats.get(state.name) if pipeline else None
            factory = self.factories.get(state.name)
            interfaces.append({
                "name": state.name,
                "protocol": state.protocol,
                "transport": state.transport,
                "status": state.status,
                "reason": state.reason,
                "address": state.address,
                "connections": len(getattr(factory, "connections", ()) or ()),
                "received": stats.received if stats else 0,
                "applied": stats.applied if stats else 0,
                "held": stats.held if stats else 0,
                "rejected": stats.rejected if stats else 0,
                "duplicates": stats.duplicates if stats else 0,
                "storage_failures": stats.storage_failures if stats else 0,
                # which version of the mapping file is in use (labrelay mapping reload)
                "mapping_sha256": self._mapping_digest(state.name),
            })
        return {
            "node": self.config.node_name,
            "started_at": self.started_at.isoformat(),
            "interfaces": interfaces,
            "attention": self.attention,
            # the ingest process's writer (inbound messages), when there is one; "writer"
            # below is this process's (alerts, order downloads, status, reprocessing)
            "ingest": self.ingest.status() if self.ingest is not None else None,
            "writer": {
                "backlog": writer.backlog if writer else 0,
                "batches": writer.stats.batches if writer else 0,
                "units": writer.stats.units if writer else 0,
                "largest_batch": writer.stats.largest_batch if writer else 0,
                "busy_seconds": round(writer.stats.busy_seconds, 3) if writer else 0.0,
                "wait_seconds": round(writer.stats.wait_seconds, 3) if writer else 0.0,
                "storage_errors": writer.stats.storage_errors if writer else 0,
            },
        }
