"""HTTPS for the platform's front door: Serve's proxy options, the context the platform's own
clients verify it with, and a development certificate authority (`llmops tls dev-cert`).

Serve 2.60's proxy takes a certificate and key but never asks callers for one (uvicorn's
`ssl_cert_reqs` stays `CERT_NONE`), so client certificates (mTLS) are checked in front of it:
docs/operations.md shows where."""

from __future__ import annotations

import ipaddress
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from serve_apps.config import ServeConfig, TlsConfig
from training.errors import LLMOpsError

DEV_FILES = ("ca.pem", "server.pem", "server-key.pem")


class TlsError(LLMOpsError):
    """A certificate, key or CA bundle that cannot be loaded."""


def http_options(config: ServeConfig) -> dict:
    """Serve's `http_options`: where the proxy listens, and its certificate when HTTPS."""
    tls = config.tls
    return {"host": config.host, "port": config.port,
            **({"ssl_certfile": tls.certfile, "ssl_keyfile": tls.keyfile} if tls.enabled else {})}


def check(tls: TlsConfig) -> None:
    """Load every file `tls` names, so a wrong path or a key of another certificate is one line
    here instead of a proxy that never starts."""
    if not tls.enabled:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certfile,
                                                                            tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"serve.tls: cannot load certfile {tls.certfile} with keyfile "
                       f"{tls.keyfile}: {exc}") from exc
    client_context(tls)


def client_context(tls: TlsConfig) -> ssl.SSLContext | bool:
    """What the platform's own clients pass as httpx's `verify` (urllib's `context`): the system
    store plus `ca_certs`; True (httpx's default) for plain HTTP."""
    if not tls.enabled:
        return True
    context = ssl.create_default_context()
    if tls.ca_certs:
        try:
            context.load_verify_locations(tls.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"serve.tls: cannot load ca_certs {tls.ca_certs}: {exc}") from exc
    return context


def dev_cert(out: Path, hosts: list[str], days: int = 90) -> dict[str, str]:
    """A local CA and a server certificate it signs for `hosts` (names or IP addresses, plus
    localhost and the loopback addresses): the `serve.tls` settings that use them. The CA key
    is not kept (make a new set for another host); for production use your own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise TlsError(f"--days must be at least 1, got {days}")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmops development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]
                                                          if hosts else "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {name: out / name for name in DEV_FILES}
    paths["ca.pem"].write_bytes(ca.public_bytes(pem))
    paths["server.pem"].write_bytes(server.public_bytes(pem))
    private = paths["server-key.pem"]
    with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file keeps its mode through O_CREAT
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return {"certfile": str(paths["server.pem"].resolve()),
            "keyfile": str(private.resolve()), "ca_certs": str(paths["ca.pem"].resolve())}
