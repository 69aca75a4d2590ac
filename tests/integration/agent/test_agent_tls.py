"""The agent talks to a TLS listener (mosquitto with a test CA), checking the broker's certificate."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Controller, RegistryHandle, wait_until  # type: ignore[import-not-found]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.mqtt


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, issuer_key: Any, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a CA the server does not use."""
    pem = serialization.Encoding.PEM
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("modelfleet test CA", ca_key, None, ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, ca.subject, ca_key, ca=False)
    other = _cert("some other CA", other_key, None, other_key, ca=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[3].write_bytes(other.public_bytes(pem))
    return paths


def test_agent_over_tls_and_refuses_a_broker_it_cannot_verify(
    mosquitto: Any, artifact_registry: RegistryHandle, agents: Any, digits_onnx: Path, tmp_path: Path,
) -> None:
    mosquitto.stop()
    ca, cert, key, other_ca = make_pki(tmp_path)
    broker = type(mosquitto)(
        tmp_path / "tls",
        extra_config=f"allow_anonymous true\nuser root\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
    )
    broker.workdir.mkdir()
    broker.start()
    controller = Controller(broker.port, ca_file=ca).start()
    try:
        v1 = artifact_registry.register("digits", digits_onnx)
        agents("dev-tls", broker.port, broker_tls=True, broker_ca_file=str(ca))
        controller.wait_reported("dev-tls", controller.desire("dev-tls", v1), "applied")

        # a device that does not trust the broker's CA never connects (and says why in its log)
        doubter = agents("dev-doubt", broker.port, broker_tls=True, broker_ca_file=str(other_ca))
        doubter.wait_log(r"event=mqtt_connecting")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in doubter.log_text(), 20, "a certificate error")
        assert "dev-doubt" not in controller.presence
    finally:
        controller.stop()
        broker.stop()
