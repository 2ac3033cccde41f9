"""
The hub's own certificate authority, its server certificate, and the
cards' client certificates.

On first start the hub makes a CA (C{ca.pem}, the file cards trust) and a
server certificate signed by it whose names are localhost, 127.0.0.1 and
every C{--hostname}.  Keys are ECDSA P-256 (fast handshakes), 0600.  When
the hostnames change the server certificate is reissued; the CA stays.

The same CA issues client certificates (L{issue_client_certificate}: the
user name in the subject, client authentication only, two years), which a
card presents instead of a password.  The hub asks every card for one
without requiring it (L{server_tls_options}), verified against its CA;
which user a certificate logs in as is the user store's business
(L{sevpn.users.IUserStore.certificate_login}), by the certificate's SHA-256
fingerprint.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import stat
from typing import Iterable, List, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sevpn.files import StateDir, StateError, os_error, read_private, write_private
from sevpn.users import CertificateRecord

CA_FILE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
#: How long a client certificate issued by the hub is valid.
CLIENT_LIFETIME = datetime.timedelta(days=730)
#: The largest certificate or key file read.
MAX_PEM = 1 << 20


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
    """
    The names the hub's server certificate holds: the loopback names, so that
    a card on the hub's own machine can verify it, then C{hostnames}
    (C{--hostname}), each once.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    for h in hostnames:
        if h not in names:
            names.append(h)
    return names


def ensure_ca(state_dir: str):
    """The hub's CA certificate and key, made now if there are none yet."""
    StateDir(state_dir).create()
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_path, ca_key_path = os.path.join(state_dir, CA_FILE), os.path.join(state_dir, CA_KEY)
    ca_pem, ca_key_pem = read_private(ca_path, "certificates"), read_private(ca_key_path, "keys")
    if ca_pem is not None and ca_key_pem is not None:
        return _certificate(ca_path, ca_pem), _private_key(ca_key_path, ca_key_pem)
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
    return ca_cert, ca_key


def ensure_pki(state_dir: str, hostnames: Iterable[str] = ()) -> Tuple[str, str]:
    """Make or reuse the CA and server certificate; return (cert, key) paths."""
    ca_cert, ca_key = ensure_ca(state_dir)
    names = server_names(hostnames)
    now = datetime.datetime.now(datetime.timezone.utc)
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
    """
    Twisted TLS options for the hub (TLS 1.2+).  Every card is asked for a
    client certificate, not required to send one (password users need
    none); one it sends must chain to the hub's CA (the C{ca.pem} beside
    C{cert_path}), or the handshake fails.
    """
    from OpenSSL import SSL, crypto
    from twisted.internet import ssl

    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    with open(os.path.join(os.path.dirname(cert_path), CA_FILE), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    ca = crypto.X509.from_cryptography(ca_cert)  # Twisted's caCerts takes pyOpenSSL's type
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        verify=True,
        caCerts=[ca],
        requireCertificate=False,
    )
    context = options.getContext()
    # Named in the certificate request, so a card picks the right certificate.
    context.add_client_ca(ca_cert)
    # An idle session then holds no TLS record buffers: a hub with a
    # thousand quiet cards stays small.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return options


def client_tls_options(ca_file: str, server_name: str, client_certificate=None):
    """
    Twisted TLS options for a card: the hub must present a certificate
    that chains to C{ca_file} and names C{server_name} (checked by
    service_identity).  There is no insecure mode.

    @param client_certificate: the card's own certificate and key (a
        Twisted C{PrivateCertificate}, L{load_client_identity}) to log in
        with, or None.
    """
    from twisted.internet import ssl

    with open(ca_file, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(server_name, trustRoot=ca, clientCertificate=client_certificate)


# client certificates ------------------------------------------------------------


def issue_client_certificate(state_dir: str, user: str) -> Tuple[x509.Certificate, bytes]:
    """
    A new key and a certificate for C{user} signed by the hub's CA (made
    now if the hub never ran): the user name as the subject's common name,
    good for client authentication only, for L{CLIENT_LIFETIME}.  Returns
    the certificate and the key's PEM.
    """
    ca_cert, ca_key = ensure_ca(state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + CLIENT_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, _key_pem(key)


def certificate_pem(cert: x509.Certificate) -> bytes:
    """C{cert} as PEM, the form the state dir's and the cards' certificate files hold."""
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_record(cert: x509.Certificate) -> CertificateRecord:
    """What the user store keeps of a client certificate it registers."""
    return CertificateRecord(
        fingerprint=fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc.isoformat(),
        added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def parse_fingerprint(text: str) -> str:
    """
    A SHA-256 fingerprint as given by a person (colons or none, either
    case) in the form L{fingerprint} writes; a L{StateError} if it is none.
    """
    digits = text.strip().replace(":", "").upper()
    if len(digits) != 64 or any(c not in "0123456789ABCDEF" for c in digits):
        raise StateError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, as 'sevpn hub user cert list' "
                         f"shows them)")
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PEM)
    except FileNotFoundError:
        raise StateError(f"the {what} {path} does not exist")
    except IsADirectoryError:
        raise StateError(f"the {what} {path} is a directory")
    except OSError as e:
        raise StateError(f"cannot read the {what} {path}: {(e.strerror or str(e)).lower()}")


def load_certificate_file(path: str, what: str = "certificate file") -> x509.Certificate:
    """The (first) certificate in the PEM file C{path}; a L{StateError} sentence when there is none."""
    try:
        return x509.load_pem_x509_certificate(_read_file(path, what))
    except ValueError:
        raise StateError(f"the {what} {path} holds no PEM certificate")


def check_client_certificate(state_dir: str, cert: x509.Certificate, path: str) -> CertificateRecord:
    """
    Whether C{cert} (read from C{path}) can log a card in to this hub: it
    must be signed by the hub's CA, unexpired, not a CA, and good for
    client authentication.  Its record for the user store, or a
    L{StateError} saying what is wrong.
    """
    ca_path = os.path.join(state_dir, CA_FILE)
    ca_pem = read_private(ca_path, "certificates")
    if ca_pem is None:
        raise StateError(f"the hub with the state dir {state_dir} has no CA yet, so {path} cannot be signed by it: "
                         f"issue a certificate with 'sevpn hub user add USER --cert'")
    ca = _certificate(ca_path, ca_pem)
    try:
        if cert.issuer != ca.subject:
            raise ValueError("another issuer")
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise StateError(
            f"the certificate in {path} is not signed by this hub's CA ({ca_path}; its issuer is "
            f"{cert.issuer.rfc4514_string() or 'empty'}): issue one with 'sevpn hub user add USER --cert'"
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise StateError(f"the certificate in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise StateError(f"the certificate in {path} is a CA certificate, not a card's")
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise StateError(f"the certificate in {path} is not for client authentication (its extended key usage "
                             f"lacks clientAuth; a hub's server.pem?): the hub would refuse it")
    except x509.ExtensionNotFound:
        pass
    return certificate_record(cert)


def create_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Write a new file C{path} with C{mode}, refusing to replace one that
    exists (an issued key is never written over another) or to follow a
    link.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise StateError(f"{path} already exists: remove it, or pass --out with another directory")
    except OSError as e:
        raise os_error(e, "write", "pass --out with a directory you may write in" if e.errno in (
            errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT) else None)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.unlink(path)
        e.filename = path
        raise os_error(e, "write")


def load_client_identity(cert_file: str, key_file: str):
    """
    The card's certificate and key for TLS (a Twisted C{PrivateCertificate}):
    a L{StateError} sentence when a file is missing, not PEM, the key is
    readable by other users or is not the certificate's, or the
    certificate expired.
    """
    from twisted.internet import ssl

    cert = load_certificate_file(cert_file, "certificate file (--cert-file)")
    try:
        st = os.stat(key_file)
    except OSError as e:
        raise StateError(f"cannot read the key file (--key-file) {key_file}: {(e.strerror or str(e)).lower()}")
    if st.st_mode & 0o077:
        raise StateError(f"the key file (--key-file) {key_file} may be read by other users "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}): run 'chmod 600 {key_file}'")
    key_pem = _read_file(key_file, "key file (--key-file)")
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except TypeError:
        raise StateError(f"the key file (--key-file) {key_file} is encrypted: give an unencrypted key, mode 0600")
    except ValueError:
        raise StateError(f"the key file (--key-file) {key_file} holds no PEM private key")
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise StateError(f"the key in {key_file} is not the key of the certificate in {cert_file}")
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise StateError(f"the certificate in {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
                         f"ask the hub's operator for a new one")
    return ssl.PrivateCertificate.loadPEM(certificate_pem(cert) + _key_pem(key))
