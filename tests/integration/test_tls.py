"""TLS and mutual TLS on an HL7 listener of the running engine (DESIGN: observability and
safety). A throwaway CA, server and client certificates are made in each test; the engine
runs as `labrelay run` on 127.0.0.1 and `labrelay send hl7 --tls` is the client.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select

from lis_bridge.db import make_engine
from lis_bridge.models import RawMessage
from tests.conftest import CORPUS
from tests.integration.enginerun import LABRELAY, REPO, free_port, running_engine

pytestmark = pytest.mark.slow

ORU = REPO / "fixtures" / "oru_DEMO0001.hl7"


@dataclass
class Issued:
    cert: Path
    key: Path


class TestCA:
    """A certificate authority that lives for one test."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "labrelay test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                ]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        issued.key.chmod(0o600)
        return issued


def write_config(tmp_path: Path, transport: str) -> Path:
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
interfaces:
  - name: tls-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}
    transport:
{transport}
    ack: {{policy: after_commit}}
    allowlist: [127.0.0.1]
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: tls-signing-key-0123456789abcdef
"""
    )
    return config


def send_hl7(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABRELAY, "send", "hl7", "--to", f"127.0.0.1:{port}", "--timeout", "5", *options,
         str(ORU)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )


def stored(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(RawMessage)) or 0)
    finally:
        engine.dispose()


def ssl_listener(tmp_path: Path) -> tuple[TestCA, int, Path]:
    """A CA, a free port and an engine config whose HL7 listener is an ssl: endpoint
    string with a server certificate from that CA."""
    ca = TestCA(tmp_path)
    server = ca.issue("engine", server=True)
    port = free_port()
    config = write_config(
        tmp_path,
        f"      listen: ssl:{port}:interface=127.0.0.1:privateKey={server.key}"
        f":certKey={server.cert}",
    )
    return ca, port, config


def test_tls_listener_from_ssl_endpoint_string(db_url: str, tmp_path: Path) -> None:
    ca, port, config = ssl_listener(tmp_path)
    with running_engine(config, db_url, tmp_path):
        done = send_hl7(port, "--tls", "--ca", str(ca.path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert " DEMO-0001 AA" in done.stdout  # PROTOCOLS 83: AA echoes MSH-10
        # A client that does not trust the engine's CA refuses the connection itself.
        (tmp_path / "other").mkdir()
        other = TestCA(tmp_path / "other", "other CA")
        done = send_hl7(port, "--tls", "--ca", str(other.path))
        assert done.returncode == 1
        assert " AA" not in done.stdout
        # Plain MLLP to the TLS port: the handshake fails, nothing is stored or answered.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x0b" + ORU.read_bytes().replace(b"\n", b"\r") + b"\x1c\r")
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        assert b"MSA|" not in answer
    assert stored(db_url) == 1


def test_a_capture_replays_into_a_tls_listener(db_url: str, tmp_path: Path) -> None:
    """`labrelay replay --tls`: a capture holds the plain bytes of a TLS interface; they go
    over TLS again, verified against the CA; without --tls the listener is not reached."""
    import base64
    import json

    ca, port, config = ssl_listener(tmp_path)
    block = b"\x0b" + ORU.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r") + b"\x1c\r"
    capture = tmp_path / "tls-hl7.jsonl"
    capture.write_text("\n".join(json.dumps(line) for line in (
        {"t": "2026-12-04T10:00:00Z", "dir": "open", "peer": "127.0.0.1:40000", "conn": 1},
        {"t": "2026-12-04T10:00:01Z", "dir": "in", "peer": "127.0.0.1:40000", "conn": 1,
         "b64": base64.b64encode(block).decode()},
    )) + "\n")

    def replay(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LABRELAY, "replay", str(capture), "--to", f"127.0.0.1:{port}", "--timeout", "5",
             *options], capture_output=True, text=True, timeout=60, check=False, cwd=REPO)

    with running_engine(config, db_url, tmp_path):
        done = replay("--tls", "--ca", str(ca.path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "conn 1 #1 DEMO-0001 AA" in done.stdout
        assert replay().returncode == 1  # plain bytes to a TLS port: no ACK
        done = replay("--ca", str(ca.path))
        assert done.returncode == 2 and "add --tls" in done.stderr
    assert stored(db_url) == 1


def test_mutual_tls_demands_a_client_certificate_from_the_ca(
    db_url: str, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("engine", server=True)
    analyzer = ca.issue("analyzer-chem1", server=False)
    (tmp_path / "rogue").mkdir()
    rogue_ca = TestCA(tmp_path / "rogue", "rogue CA")
    rogue = rogue_ca.issue("rogue-client", server=False)
    port = free_port()
    config = write_config(
        tmp_path,
        f"      listen: tcp:{port}:interface=127.0.0.1\n"
        f"      tls: {{certificate: {server.cert}, private_key: {server.key}, "
        f"client_ca: {ca.path}}}",
    )
    with running_engine(config, db_url, tmp_path) as engine:
        # No client certificate: the engine ends the handshake; no ACK, nothing stored.
        done = send_hl7(port, "--tls", "--ca", str(ca.path))
        assert done.returncode == 1, done.stdout
        assert " AA" not in done.stdout
        # A certificate from another CA is refused the same way.
        done = send_hl7(port, "--tls", "--ca", str(ca.path), "--cert", str(rogue.cert),
                        "--key", str(rogue.key))
        assert done.returncode == 1, done.stdout
        assert stored(db_url) == 0
        # The analyzer's certificate, signed by the configured CA: accepted.
        done = send_hl7(port, "--tls", "--ca", str(ca.path), "--cert", str(analyzer.cert),
                        "--key", str(analyzer.key))
        assert done.returncode == 0, done.stdout + done.stderr
        assert " DEMO-0001 AA" in done.stdout
        started = engine.events("interface.started")
        assert started and "mutual TLS" in str(started[0]["transport"])
    assert stored(db_url) == 1


def test_config_check_reports_tls_problems_with_line_and_key(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("engine", server=True)
    config = write_config(
        tmp_path,
        "      listen: tcp:2575:interface=127.0.0.1\n"
        f"      tls: {{certificate: {server.cert}, private_key: {ca.path}, "
        f"client_ca: {tmp_path / 'missing.pem'}}}",
    )
    done = subprocess.run([*LABRELAY, "config", "check", str(config)], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode != 0
    # file:line: key path: what is wrong (the tls block is on line 10)
    assert "labrelay.yaml:10: interfaces[0].transport.tls.client_ca: file " in done.stderr
    assert "missing.pem does not exist" in done.stderr
    assert "labrelay-test-CA.pem is not a PEM private key matching" in done.stderr


def test_astm_listener_with_mutual_tls(db_url: str, tmp_path: Path) -> None:
    """The same TLS block on an ASTM listener; Python's ssl module plays the analyzer."""
    ca = TestCA(tmp_path)
    server = ca.issue("engine", server=True)
    analyzer = ca.issue("analyzer-c311", server=False)
    port = free_port()
    config = tmp_path / "astm.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
interfaces:
  - name: tls-astm
    protocol: astm
    driver: astm-generic
    mapping: {REPO / 'mappings' / 'roche_cobas_c311.yaml'}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
      tls: {{certificate: {server.cert}, private_key: {server.key}, client_ca: {ca.path}}}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: tls-signing-key-0123456789abcdef
"""
    )

    def enq(with_certificate: bool) -> bytes:
        context = ssl.create_default_context(cafile=str(ca.path))
        if with_certificate:
            context.load_cert_chain(str(analyzer.cert), str(analyzer.key))
        # TLS 1.2 refuses in the handshake, TLS 1.3 on the first read: either way no ACK.
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"\x05")  # PROTOCOLS 1: ENQ asks for the line
                answer = sock.recv(1)
                sock.sendall(b"\x04")
                return answer
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""

    capture = CORPUS / "astm" / "roche_cobas_c311__1.txt"

    def send_astm(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LABRELAY, "send", "astm", "--to", f"127.0.0.1:{port}", "--timeout", "20",
             "--listen-after", "0", *options, str(capture)],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO)

    with running_engine(config, db_url, tmp_path):
        assert enq(with_certificate=False) == b""
        assert enq(with_certificate=True) == b"\x06"  # ACK
        # labrelay's own ASTM sender over TLS, as an analyzer on this interface would be
        done = send_astm("--tls", "--ca", str(ca.path))
        assert done.returncode == 1  # no client certificate: the handshake is refused
        assert stored(db_url) == 0
        done = send_astm("--tls", "--ca", str(ca.path), "--cert", str(analyzer.cert),
                         "--key", str(analyzer.key))
        assert done.returncode == 0, done.stdout + done.stderr
        assert " FN 1 ACK" in done.stdout
        assert stored(db_url) == 1
    done = subprocess.run([*LABRELAY, "send", "astm", "--serial", "/dev/null", "--tls",
                           str(capture)], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)
    assert done.returncode == 2 and "are for --to HOST:PORT" in done.stderr
