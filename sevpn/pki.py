"""
The hub's own certificate authority and server certificate.

On first start the hub makes a CA (C{ca.pem}, the file cards trust) and a
server certificate signed by it whose names are localhost, 127.0.0.1 and
every C{--hostname}.  Keys are ECDSA P-256 (fast handshakes), 0600.  When
the hostnames change the server certificate is reissued; the CA stays.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable, List, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sevpn.files import StateDir, StateError, read_private, write_private

CA_FILE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: Iterable[str]) -> List[x509.GeneralName]:
    out: List[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def server_names(hostnames: Iterable[str]) -> List[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    for h in hostnames:
        if h not in names:
            names.append(h)
    return names


def ensure_pki(state_dir: str, hostnames: Iterable[str] = ()) -> Tuple[str, str]:
    """Make or reuse the CA and server certificate; return (cert, key) paths."""
    StateDir(state_dir).create()
    names = server_names(hostnames)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_path, ca_key_path = os.path.join(state_dir, CA_FILE), os.path.join(state_dir, CA_KEY)
    ca_pem, ca_key_pem = read_private(ca_path, "certificates"), read_private(ca_key_path, "keys")
    if ca_pem is not None and ca_key_pem is not None:
        ca_cert = _certificate(ca_path, ca_pem)
        ca_key = _private_key(ca_key_path, ca_key_pem)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sevpn hub CA {os.urandom(4).hex()}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(ca_key_path, _key_pem(ca_key))
        write_private(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)

    cert_path, key_path = os.path.join(state_dir, SERVER_CERT), os.path.join(state_dir, SERVER_KEY)
    cert_pem = read_private(cert_path, "certificates")
    if cert_pem is not None and read_private(key_path, "keys") is not None:
        cert = _certificate(cert_path, cert_pem)
        try:
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            current = set(_san(names)) <= set(have) and cert.issuer == ca_cert.subject
        except x509.ExtensionNotFound:
            current = False
        if current and cert.not_valid_after_utc > now + datetime.timedelta(days=30):
            return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def _certificate(path: str, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise StateError(f"{path} holds no PEM certificate: restore it from a backup")


def _private_key(path: str, pem: bytes):
    try:
        return serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError):
        raise StateError(f"{path} holds no usable private key: restore it from a backup")


def fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint as C{openssl x509 -fingerprint -sha256} shows it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_ca_file(path: str) -> x509.Certificate:
    """
    The CA certificate a card is to trust, from C{path} (the hub's
    C{STATE/ca.pem}); a L{StateError} sentence when the file is not that.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
    except FileNotFoundError:
        raise StateError(f"the CA file {path} does not exist (copy the hub's STATE/ca.pem here)")
    except IsADirectoryError:
        raise StateError(f"the CA file {path} is a directory: give the hub's STATE/ca.pem")
    except OSError as e:
        raise StateError(f"cannot read the CA file {path}: {(e.strerror or str(e)).lower()}")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise StateError(f"the CA file {path} holds no PEM certificate: give the hub's STATE/ca.pem")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise StateError(
            f"the CA file {path} is not a CA certificate (a hub's server.pem?): give the hub's STATE/ca.pem"
        )
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise StateError(f"the CA file {path} holds a certificate that expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert


def ca_info(state_dir: str) -> dict:
    """The hub's CA: its path, SHA-256 fingerprint, subject and expiry."""
    path = os.path.join(state_dir, CA_FILE)
    pem = read_private(path, "certificates")
    if pem is None:
        raise StateError(
            f"the hub with the state dir {state_dir} has no CA yet: it makes one when it first starts "
            f"(twistd sevpn-hub --state-dir {state_dir})"
        )
    cert = _certificate(path, pem)
    expires = cert.not_valid_after_utc
    return {
        "path": os.path.abspath(path),
        "sha256": fingerprint(cert),
        "subject": cert.subject.rfc4514_string(),
        "not_after": expires.isoformat(),
        "days_left": (expires - datetime.datetime.now(datetime.timezone.utc)).days,
    }


def server_tls_options(cert_path: str, key_path: str):
    """Twisted TLS options for the hub (TLS 1.2+)."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    # An idle session then holds no TLS record buffers: a hub with a
    # thousand quiet cards stays small.
    options.getContext().set_mode(SSL.MODE_RELEASE_BUFFERS)
    return options


def client_tls_options(ca_file: str, server_name: str):
    """
    Twisted TLS options for a card: the hub must present a certificate
    that chains to C{ca_file} and names C{server_name} (checked by
    service_identity).  There is no insecure mode.
    """
    from twisted.internet import ssl

    with open(ca_file, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(server_name, trustRoot=ca)
