"""The engine configuration: one YAML file, loaded safely and validated.

Every error names the file, the line, the key path and what was expected; all errors
are reported together and the engine does not start. Strings may refer to environment
variables as ``${NAME}`` or ``${NAME:-default}`` (for secrets: database URL, keys, tokens).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError
from lis_bridge.db import DEFAULT_DATABASE_URL

MAX_CONFIG_BYTES = 1_000_000
DEFAULT_LAB_NAME = "labrelay demonstration laboratory"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class SerialSettings:
    device: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1


@dataclass(frozen=True, slots=True)
class ASTMOptions:
    frame_size: int = 240
    lenient: bool = False
    accept_lowercase_checksum: bool = True
    role: str = "computer"


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """TLS on a listener, given as ``transport.tls`` beside a ``tcp:`` listen string.

    Twisted's ``ssl:`` endpoint string cannot demand a client certificate (its parser
    accepts privateKey, certKey, extraCertChain, dhParameters, sslmethod only), so mutual
    TLS needs this block: with ``client_ca`` the server requires a certificate signed by
    one of the CAs in that PEM file and refuses the handshake otherwise.
    """

    certificate: Path  # PEM: the server certificate (and optionally its chain after it)
    private_key: Path  # PEM: the server's private key
    client_ca: Path | None = None  # PEM: CA certificate(s) client certificates must chain to

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_options(self) -> Any:
        """A Twisted ``CertificateOptions`` for the listener (raises ValueError/OSError)."""
        from OpenSSL import crypto
        from twisted.internet import ssl

        cert_pem = self.certificate.read_bytes()
        key_pem = self.private_key.read_bytes()
        certs = _pem_certificates(cert_pem, self.certificate)
        try:
            server = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key_pem)
        except (crypto.Error, ValueError) as exc:
            raise ValueError(
                f"{self.private_key} is not a PEM private key matching {self.certificate}: {exc}"
            ) from exc
        chain = [ssl.Certificate.loadPEM(c).original for c in certs[1:]] or None
        if self.client_ca is None:
            return ssl.CertificateOptions(
                privateKey=server.privateKey.original,
                certificate=server.original,
                extraCertChain=chain,
            )
        ca_certs = [
            ssl.Certificate.loadPEM(c).original
            for c in _pem_certificates(self.client_ca.read_bytes(), self.client_ca)
        ]
        return ssl.CertificateOptions(
            privateKey=server.privateKey.original,
            certificate=server.original,
            extraCertChain=chain,
            verify=True,
            requireCertificate=True,
            caCerts=ca_certs,
        )


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _pem_certificates(data: bytes, path: Path) -> list[bytes]:
    from OpenSSL import crypto

    found = _PEM_CERT.findall(data)
    if not found:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    for pem in found:
        try:
            crypto.load_certificate(crypto.FILETYPE_PEM, pem)
        except crypto.Error as exc:
            raise ValueError(f"{path} holds an unreadable certificate: {exc}") from exc
    return list(found)


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    name: str
    protocol: str  # hl7 | astm
    driver: str = "auto"
    driver_options: dict[str, Any] = field(default_factory=dict)
    mapping: Path | None = None
    listen: str | None = None  # Twisted server endpoint string
    connect: str | None = None  # Twisted client endpoint string
    serial: SerialSettings | None = None
    ack_policy: str = "after_apply"  # after_apply | after_commit
    held_ack: str = "AE"  # the code for stored-but-held content: AE (default) or AA
    mllp_release: int = 1
    max_message_bytes: int = 1_048_576
    idle_timeout: float = 600.0
    max_connections: int = 8
    allowlist: tuple[str, ...] = ()
    capture: bool = False
    encoding: str | None = None
    auto_receive: bool = False
    accept_unordered: bool = False
    astm: ASTMOptions = field(default_factory=ASTMOptions)
    enabled: bool = True
    tls: TLSSettings | None = None

    @property
    def transport_summary(self) -> str:
        if self.listen:
            if self.tls is not None:
                kind = "mutual TLS" if self.tls.mutual else "TLS"
                return f"listen {self.listen} ({kind})"
            return f"listen {self.listen}"
        if self.connect:
            return f"connect {self.connect}"
        assert self.serial is not None
        s = self.serial
        return f"serial {s.device} {s.baudrate} {s.bytesize}{s.parity}{s.stopbits:g}"


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    output_dir: Path = Path("reports")
    signing_key: str = ""
    key_id: str = "k1"
    lab_name: str = DEFAULT_LAB_NAME
    lab_address: str = ""
    lab_phone: str = ""
    signatory_name: str = ""
    signatory_title: str = ""
    workers: int = 2


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str
    type: str  # webhook | smtp
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = ""
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    username: str = ""
    password: str = ""
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class NotificationsConfig:
    channels: tuple[ChannelConfig, ...] = ()
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    escalate_after: float = 300.0
    max_attempts: int = 12
    initial_retry_delay: float = 5.0
    max_retry_delay: float = 600.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str | None = None
    token: str = ""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    source: Path
    database: str = DEFAULT_DATABASE_URL
    node_name: str = "labrelay"
    capture_dir: Path = Path("captures")
    capture_max_bytes: int = 100 * 1024 * 1024  # a capture file is rotated at this size
    capture_keep: int = 5  # rotated files kept per interface and day
    interfaces: tuple[InterfaceConfig, ...] = ()
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    # inbound messages stored and applied in a process beside the engine's reactor
    # (engine.ingest_process); false keeps them on the engine's own writer thread
    ingest_process: bool = True

    def interface(self, name: str) -> InterfaceConfig:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        raise ConfigError(f"{self.source}: no interface named {name!r}")


# --------------------------------------------------------------------------- YAML with lines


@dataclass
class _Node:
    value: Any
    line: int
    children: dict[str, _Node] | list[_Node] | None = None


def _compose(text: str) -> _Node | None:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        return _convert(loader, root)
    finally:
        loader.dispose()


_STANDARD_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                  "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
                  "tag:yaml.org,2002:seq", "tag:yaml.org,2002:timestamp")


def _convert(loader: yaml.SafeLoader, node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if node.tag not in _STANDARD_TAGS:
        # Nothing from a file is turned into an object: a python/... tag is refused outright.
        raise yaml.MarkedYAMLError(problem=f"the tag {node.tag!r} is not allowed",
                                   problem_mark=node.start_mark)
    if isinstance(node, yaml.MappingNode):
        children: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            children[str(key)] = _convert(loader, value_node)
        return _Node({k: v.value for k, v in children.items()}, line, children)
    if isinstance(node, yaml.SequenceNode):
        items = [_convert(loader, item) for item in node.value]
        return _Node([i.value for i in items], line, items)
    return _Node(loader.construct_object(node, deep=True), line)


def _expand_env(value: Any) -> Any:
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None:
            if default is None:
                raise KeyError(name)
            return default
        return found

    return _ENV.sub(repl, value)


class _Reader:
    """Reads one mapping node, recording every problem with its line and key path."""

    def __init__(self, node: _Node, path: str, errors: list[str], source: Path) -> None:
        self.node = node
        self.path = path
        self.errors = errors
        self.source = source
        self.seen: set[str] = set()
        if not isinstance(node.children, dict):
            self.error(node.line, path, f"expected a mapping of keys, got {_kind(node.value)}")
            self.node = _Node({}, node.line, {})

    def error(self, line: int, path: str, text: str) -> None:
        self.errors.append(f"{self.source}:{line}: {path or '(top level)'}: {text}")

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def child(self, key: str) -> _Node | None:
        self.seen.add(key)
        children = self.node.children
        assert isinstance(children, dict)
        return children.get(key)

    def get(
        self,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
        expected: str = "",
    ) -> Any:
        node = self.child(key)
        if node is None or node.value is None:
            if required:
                self.error(self.node.line, self._key(key), f"is required ({expected or kind})")
            return default
        try:
            value = _expand_env(node.value)
        except KeyError as exc:
            self.error(node.line, self._key(key), f"environment variable {exc.args[0]} is not set")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            want = expected or _type_name(kind)
            self.error(node.line, self._key(key), f"expected {want}, got {_kind(value)} {value!r}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.error(node.line, self._key(key), problem)
                return default
        return value

    def sub(self, key: str) -> _Reader | None:
        node = self.child(key)
        if node is None or node.value is None:
            return None
        return _Reader(node, self._key(key), self.errors, self.source)

    def items(self, key: str) -> Iterator[tuple[int, _Node]]:
        node = self.child(key)
        if node is None or node.value is None:
            return
        if not isinstance(node.children, list):
            self.error(node.line, self._key(key), f"expected a list, got {_kind(node.value)}")
            return
        yield from enumerate(node.children)

    def finish(self) -> None:
        children = self.node.children
        assert isinstance(children, dict)
        for key, node in children.items():
            if key not in self.seen:
                known = ", ".join(sorted(self.seen))
                self.error(node.line, self._key(key), f"unknown key (known keys here: {known})")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a mapping", list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"expected one of {', '.join(map(str, choices))}"

    return check


def _endpoint_check(server: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        from twisted.internet import endpoints, reactor

        example = "tcp:2575:interface=127.0.0.1" if server else "tcp:host=10.1.2.3:port=5000"
        try:
            if server:
                endpoints.serverFromString(reactor, value)
            else:
                endpoints.clientFromString(reactor, value)
        except (ValueError, TypeError, KeyError) as exc:
            if value.startswith("ssl:") and "unexpected keyword" in str(exc):
                return (f"not a valid ssl: endpoint string ({exc}); ssl: accepts privateKey, "
                        "certKey, extraCertChain, dhParameters, sslmethod, interface, backlog. "
                        "For mutual TLS (client certificates) use tcp: with a transport.tls "
                        "block naming client_ca")
            return f"not a valid Twisted endpoint string ({exc}); example: {example}"
        except OSError as exc:  # ssl: reads its key and certificate files while parsing
            return f"cannot read a file it names: {exc}"
        except Exception as exc:  # noqa: BLE001 - pyOpenSSL raises its own Error for bad PEM
            return f"its TLS key or certificate cannot be loaded: {exc}"
        if server and value.startswith(("tcp:", "ssl:")) and "interface=" not in value:
            return (
                "a listener must name the address it binds to, e.g. "
                f"{value}:interface=127.0.0.1 (labrelay never binds every address by default)"
            )
        return None

    return check


# --------------------------------------------------------------------------- sections


def _interface(r: _Reader, base: Path, names: set[str]) -> InterfaceConfig | None:
    name = r.get("name", str, required=True, expected="a short name like chem-hl7",
                 check=lambda v: None if _NAME.match(v) else
                 "use lower-case letters, digits, '-', '_' or '.' (at most 64)")
    if name in names:
        r.error(r.node.line, r._key("name"), f"interface name {name!r} is used twice")
    protocol = r.get("protocol", str, required=True, check=_one_of("hl7", "astm"),
                     expected="hl7 or astm")
    driver = r.get("driver", str, "auto")
    driver_options = r.get("driver_options", dict, {})
    mapping_text = r.get("mapping", str)
    mapping = None
    if mapping_text:
        # Relative paths: from the working directory first, then beside the config file.
        mapping = Path(mapping_text)
        if not mapping.is_absolute() and not mapping.exists():
            mapping = base / mapping
        if not mapping.exists():
            r.error(r.node.line, r._key("mapping"), f"mapping file {mapping_text} does not exist")
    transport = r.sub("transport")
    listen = connect = None
    serial = None
    tls = None
    if transport is None:
        r.error(r.node.line, r._key("transport"),
                "is required: one of listen: <endpoint>, connect: <endpoint>, serial: {...}")
    else:
        listen = transport.get("listen", str, check=_endpoint_check(server=True))
        connect = transport.get("connect", str, check=_endpoint_check(server=False))
        serial_r = transport.sub("serial")
        if serial_r is not None:
            serial = SerialSettings(
                device=serial_r.get("device", str, "", required=True, expected="e.g. /dev/ttyS0"),
                baudrate=serial_r.get(
                    "baudrate", int, 9600,
                    check=_one_of(300, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)),
                bytesize=serial_r.get("bytesize", int, 8, check=_one_of(7, 8)),
                parity=serial_r.get("parity", str, "N", check=_one_of("N", "E", "O")),
                stopbits=serial_r.get("stopbits", (int, float), 1, check=_one_of(1, 1.5, 2)),
            )
            serial_r.finish()
        tls = _tls(transport.sub("tls"), base, listen,
                   listen_given=transport.child("listen") is not None)
        chosen = [x for x in (listen, connect, serial) if x]
        if len(chosen) != 1 and not any("transport" in e for e in r.errors[-3:]):
            transport.error(transport.node.line, transport.path,
                            "give exactly one of listen, connect or serial")
        transport.finish()
    ack = r.sub("ack")
    ack_policy, held_ack, mllp_release = "after_apply", "AE", 1
    if ack is not None:
        ack_policy = ack.get("policy", str, "after_apply",
                             check=_one_of("after_apply", "after_commit"))
        held_ack = ack.get("held", str, "AE", check=_one_of("AE", "AA"))
        mllp_release = ack.get("mllp_release", int, 1, check=_one_of(1, 2))
        ack.finish()
    limits = r.sub("limits")
    max_bytes, idle, max_conn = 1_048_576, 600.0, 8
    if limits is not None:
        max_bytes = limits.get("max_message_bytes", int, max_bytes,
                               check=lambda v: None if 1024 <= v <= 64 * 1024 * 1024
                               else "must be between 1024 and 67108864")
        idle = limits.get("idle_timeout", float, idle, check=_positive)
        max_conn = limits.get("max_connections", int, max_conn, check=_positive)
        limits.finish()
    allowlist: list[str] = []
    for index, item in r.items("allowlist"):
        import ipaddress

        try:
            ipaddress.ip_network(str(item.value), strict=False)
            allowlist.append(str(item.value))
        except ValueError:
            r.error(item.line, f"{r._key('allowlist')}[{index}]",
                    f"expected an IP address or network like 10.1.0.0/16, got {item.value!r}")
    astm_r = r.sub("astm")
    astm = ASTMOptions()
    if astm_r is not None:
        astm = ASTMOptions(
            frame_size=astm_r.get("frame_size", int, 240,
                                  check=lambda v: None if 16 <= v <= 63993
                                  else "must be between 16 and 63993"),
            lenient=astm_r.get("lenient", bool, False),
            accept_lowercase_checksum=astm_r.get("accept_lowercase_checksum", bool, True),
            role=astm_r.get("role", str, "computer", check=_one_of("computer", "instrument")),
        )
        astm_r.finish()
    encoding = r.get("encoding", str)
    if encoding:
        import codecs

        try:
            codecs.lookup(encoding)
        except LookupError:
            r.error(r.node.line, r._key("encoding"), f"unknown character encoding {encoding!r}")
    iface = InterfaceConfig(
        name=name or "?",
        protocol=protocol or "hl7",
        driver=driver,
        driver_options=driver_options,
        mapping=mapping,
        listen=listen,
        connect=connect,
        serial=serial,
        ack_policy=ack_policy,
        held_ack=held_ack,
        mllp_release=mllp_release,
        max_message_bytes=max_bytes,
        idle_timeout=idle,
        max_connections=max_conn,
        allowlist=tuple(allowlist),
        capture=r.get("capture", bool, False),
        encoding=encoding,
        auto_receive=r.get("auto_receive", bool, False),
        accept_unordered=r.get("accept_unordered", bool, False),
        astm=astm,
        enabled=r.get("enabled", bool, True),
        tls=tls,
    )
    r.finish()
    if name:
        names.add(name)
    return iface


def _tls(
    r: _Reader | None, base: Path, listen: str | None, *, listen_given: bool
) -> TLSSettings | None:
    """``transport.tls``: certificate, private_key, optional client_ca (mutual TLS)."""
    if r is None:
        return None

    def path_of(key: str, required: bool) -> Path | None:
        text = r.get(key, str, None, required=required, expected="a PEM file path")
        if not text:
            return None
        path = Path(text)
        if not path.is_absolute() and not path.exists():
            path = base / path  # like mappings: the working directory, then beside the config
        if not path.is_file():
            r.error(r.node.line, r._key(key), f"file {text} does not exist")
            return None
        return path

    certificate = path_of("certificate", True)
    private_key = path_of("private_key", True)
    client_ca = path_of("client_ca", False)
    r.finish()
    if listen is None:
        if not listen_given:  # else the listen string's own error has been reported
            r.error(r.node.line, r.path, "TLS settings apply to a listener: set transport.listen")
        return None
    if not listen.startswith(("tcp:", "tcp6:")):
        r.error(r.node.line, r.path,
                "with a tls block the listen string must be tcp:PORT:interface=ADDRESS (labrelay "
                "adds TLS itself); for TLS without client certificates an ssl: string alone works")
        return None
    if certificate is None or private_key is None:
        return None
    settings = TLSSettings(certificate, private_key, client_ca)
    try:
        settings.server_options()
    except (OSError, ValueError) as exc:
        r.error(r.node.line, r.path, f"cannot load the TLS files: {exc}")
        return None
    return settings


def _reports(r: _Reader | None) -> ReportsConfig:
    if r is None:
        return ReportsConfig()
    cfg = ReportsConfig(
        output_dir=Path(r.get("output_dir", str, "reports")),
        signing_key=r.get("signing_key", str, ""),
        key_id=r.get("key_id", str, "k1"),
        lab_name=r.get("lab_name", str, DEFAULT_LAB_NAME),
        lab_address=r.get("lab_address", str, ""),
        lab_phone=r.get("lab_phone", str, ""),
        signatory_name=r.get("signatory_name", str, ""),
        signatory_title=r.get("signatory_title", str, ""),
        workers=r.get("workers", int, 2, check=_positive),
    )
    if cfg.signing_key and len(cfg.signing_key) < 16:
        r.error(r.node.line, r._key("signing_key"),
                "is too short: use at least 16 random characters (e.g. `openssl rand -hex 32`)")
    r.finish()
    return cfg


def _notifications(r: _Reader | None) -> NotificationsConfig:
    if r is None:
        return NotificationsConfig()
    channels: list[ChannelConfig] = []
    for index, item in r.items("channels"):
        c = _Reader(item, f"{r._key('channels')}[{index}]", r.errors, r.source)
        ctype = c.get("type", str, "webhook", required=True, check=_one_of("webhook", "smtp"))
        channels.append(
            ChannelConfig(
                name=c.get("name", str, f"channel{index}", required=True),
                type=ctype,
                url=c.get("url", str, "", required=ctype == "webhook",
                          check=lambda v: None if v.startswith(("http://", "https://"))
                          else "expected an http:// or https:// URL"),
                headers={str(k): str(v) for k, v in (c.get("headers", dict, {}) or {}).items()},
                host=c.get("host", str, "127.0.0.1"),
                port=c.get("port", int, 25, check=_positive),
                sender=c.get("sender", str, "", required=ctype == "smtp"),
                recipients=tuple(c.get("recipients", list, [], required=ctype == "smtp")),
                starttls=c.get("starttls", bool, False),
                username=c.get("username", str, ""),
                password=c.get("password", str, ""),
                timeout=c.get("timeout", float, 10.0, check=_positive),
            )
        )
        c.finish()
    known = {ch.name for ch in channels}
    routes: dict[str, tuple[str, ...]] = {}
    routes_r = r.sub("routes")
    if routes_r is not None:
        for kind in ("report_ready", "critical_value", "engine_alert"):
            names = routes_r.get(kind, list, [])
            for name in names:
                if name not in known:
                    routes_r.error(routes_r.node.line, routes_r._key(kind),
                                   f"channel {name!r} is not defined under channels")
            routes[kind] = tuple(str(n) for n in names)
        routes_r.finish()
    cfg = NotificationsConfig(
        channels=tuple(channels),
        routes=routes,
        escalate_after=r.get("escalate_after", float, 300.0, check=_positive),
        max_attempts=r.get("max_attempts", int, 12, check=_positive),
        initial_retry_delay=r.get("initial_retry_delay", float, 5.0, check=_positive),
        max_retry_delay=r.get("max_retry_delay", float, 600.0, check=_positive),
    )
    r.finish()
    return cfg


def parse_config(text: str, source: Path) -> EngineConfig:
    errors: list[str] = []
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"{source}:{line}: not valid YAML: {exc}") from exc
    if root is None:
        raise ConfigError(f"{source}: the file is empty; start from config/labrelay.example.yaml")
    top = _Reader(root, "", errors, source)
    base = source.resolve().parent
    database = top.get("database", str, DEFAULT_DATABASE_URL)
    node_name = top.get("node_name", str, "labrelay")
    capture_dir = Path(top.get("capture_dir", str, "captures"))
    capture_max_bytes = top.get(
        "capture_max_bytes", int, 100 * 1024 * 1024,
        check=lambda v: None if v >= 65536 else "must be at least 65536 (64 KiB)")
    capture_keep = top.get("capture_keep", int, 5,
                           check=lambda v: None if v >= 0 else "must be 0 or more")
    interfaces: list[InterfaceConfig] = []
    names: set[str] = set()
    for index, item in top.items("interfaces"):
        iface = _interface(_Reader(item, f"interfaces[{index}]", errors, source), base, names)
        if iface is not None:
            interfaces.append(iface)
    reports = _reports(top.sub("reports"))
    notifications = _notifications(top.sub("notifications"))
    admin_r = top.sub("admin")
    admin = AdminConfig()
    if admin_r is not None:
        admin = AdminConfig(
            listen=admin_r.get("listen", str, None, check=_endpoint_check(server=True)),
            token=admin_r.get("token", str, ""),
        )
        admin_r.finish()
    ingest_process = top.get("ingest_process", bool, True)
    top.finish()
    if errors:
        raise ConfigError(
            f"{source}: {len(errors)} problem(s); the engine will not start until they are fixed:\n"
            + "\n".join(f"  {e}" for e in errors)
        )
    return EngineConfig(
        source=source,
        database=database,
        node_name=node_name,
        capture_dir=capture_dir,
        capture_max_bytes=capture_max_bytes,
        capture_keep=capture_keep,
        interfaces=tuple(interfaces),
        reports=reports,
        notifications=notifications,
        admin=admin,
        ingest_process=ingest_process,
    )


def load_config(path: Path) -> EngineConfig:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a configuration file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: no such configuration file; copy config/labrelay.example.yaml and edit it"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    return parse_config(text, path)
