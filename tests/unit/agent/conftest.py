"""Fixtures for the agent's unit tests (the blob server lives in agent_blobserver.py) and a small disk."""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from agent_blobserver import BlobServer, make_handler  # type: ignore[import-not-found]
from servicekit import missing_service  # type: ignore[import-not-found]


def _serve(state: BlobServer, tls: ssl.SSLContext | None = None) -> Iterator[BlobServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        state.scheme = "https"
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def blob_server() -> Iterator[BlobServer]:
    yield from _serve(BlobServer())


@pytest.fixture
def https_blob_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BlobServer]:
    """The blob server over TLS, with a certificate for 127.0.0.1 from a test CA that this
    process trusts (SSL_CERT_FILE, as the store's default TLS context reads it)."""
    ca_file, cert_file, key_file = _make_pki(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    yield from _serve(BlobServer(), tls)


def _make_pki(folder: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelfleet test CA")])

    def cert(name: x509.Name, public: ec.EllipticCurvePublicKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(name).issuer_name(ca_name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(ca_key, hashes.SHA256())

    folder.mkdir()
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(cert(ca_name, ca_key.public_key(), ca=True).public_bytes(pem))
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    paths[1].write_bytes(cert(server_name, key.public_key(), ca=False).public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs: a disk that fills up part-way through a download."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        missing_service(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
