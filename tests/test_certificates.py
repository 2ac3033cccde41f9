"""
Client certificates (SoftEther's certificate authentication): the hub's CA
issues them, the user store maps each by its SHA-256 fingerprint to one
user, the hub logs a card in as that user when its TLS connection carried
the certificate and its hello no password, and revoking one ends its
sessions.  Units first, then a real hub service and cards over real TLS on
loopback (both TLS paths); a real twistd hub and card in namespaces in
L{tests.test_system_certs}.
"""

import datetime
import hashlib
import json
import os
import shutil
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn import pki, wire
from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.cardservice import tls_endpoint_for
from sevpn.guard import LoginGuard
from sevpn.hub import Refused
from sevpn.hubservice import HubService
from sevpn.users import CertificateRecord, HubState, StateError
from tests.support import FakeTap, Lab, mac
from tests.test_tls import PlainTLS, eventually


def tempdir(testcase) -> str:
    path = tempfile.mkdtemp(prefix="ce-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def other_ca_certificate(user: str = "alice"):
    """A client certificate exactly like the hub's, from another hub's CA."""
    other = tempfile.mkdtemp(prefix="ce-other-")
    try:
        return pki.issue_client_certificate(other, user)
    finally:
        shutil.rmtree(other)


def signed_by(state_dir: str, user: str = "alice", days=(-1, 700), eku=ExtendedKeyUsageOID.CLIENT_AUTH, ca=False):
    """A certificate signed by the hub's CA with the given validity (days from now), EKU and CA flag."""
    ca_cert, ca_key = pki.ensure_ca(state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


class Issuing(SynchronousTestCase):
    def setUp(self):
        self.dir = tempdir(self)
        self.cert, self.key_pem = pki.issue_client_certificate(self.dir, "alice")

    def test_a_card_certificate_from_the_hubs_ca(self):
        ca = x509.load_pem_x509_certificate(open(os.path.join(self.dir, "ca.pem"), "rb").read())
        self.cert.verify_directly_issued_by(ca)  # raises if not
        self.assertEqual(self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "alice")
        self.assertEqual(list(self.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertFalse(self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertIsInstance(self.cert.public_key().curve, ec.SECP256R1)
        lifetime = self.cert.not_valid_after_utc - self.cert.not_valid_before_utc
        self.assertTrue(datetime.timedelta(days=700) < lifetime < datetime.timedelta(days=740), lifetime)
        key = serialization.load_pem_private_key(self.key_pem, None)
        self.assertEqual(key.public_key(), self.cert.public_key())

    def test_each_issue_is_a_new_key(self):
        again, key = pki.issue_client_certificate(self.dir, "alice")
        self.assertNotEqual(again.public_key(), self.cert.public_key())
        self.assertNotEqual(pki.fingerprint(again), pki.fingerprint(self.cert))

    def test_the_ca_is_made_once(self):
        ca = open(os.path.join(self.dir, "ca.pem"), "rb").read()
        pki.issue_client_certificate(self.dir, "bob")
        pki.ensure_pki(self.dir)  # the hub's first start keeps the CA the command made
        self.assertEqual(open(os.path.join(self.dir, "ca.pem"), "rb").read(), ca)

    def test_fingerprint_is_the_sha256_of_the_certificate(self):
        der = self.cert.public_bytes(serialization.Encoding.DER)
        self.assertEqual(pki.fingerprint(self.cert).replace(":", "").lower(), hashlib.sha256(der).hexdigest())

    def test_fingerprints_as_people_type_them(self):
        fp = pki.fingerprint(self.cert)
        self.assertEqual(pki.parse_fingerprint(fp.replace(":", "").lower()), fp)
        self.assertEqual(pki.parse_fingerprint(f" {fp}\n"), fp)
        for bad in ("", fp[:-3], fp + ":00", "ZZ" + fp[2:]):
            self.assertRaises(StateError, pki.parse_fingerprint, bad)

    def test_the_key_is_written_private_and_never_over_another(self):
        path = os.path.join(self.dir, "alice.key")
        pki.create_private(path, self.key_pem)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        e = self.assertRaises(StateError, pki.create_private, path, b"other")
        self.assertIn("already exists", str(e))
        self.assertEqual(open(path, "rb").read(), self.key_pem)
        link = os.path.join(self.dir, "link.key")
        os.symlink(os.path.join(self.dir, "elsewhere"), link)
        self.assertRaises(StateError, pki.create_private, link, b"x")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "elsewhere")))


class Registering(SynchronousTestCase):
    """What C{--cert-file} accepts: only what the hub's TLS would."""

    def setUp(self):
        self.dir = tempdir(self)
        pki.ensure_pki(self.dir)

    def test_its_own(self):
        cert, _ = pki.issue_client_certificate(self.dir, "alice")
        record = pki.check_client_certificate(self.dir, cert, "alice.pem")
        self.assertEqual(record.fingerprint, pki.fingerprint(cert))
        self.assertEqual(record.subject, "CN=alice")
        self.assertEqual(record.serial, format(cert.serial_number, "x"))
        self.assertIsNone(record.revoked)

    def test_another_hubs(self):
        cert, _ = other_ca_certificate()
        e = self.assertRaises(StateError, pki.check_client_certificate, self.dir, cert, "alice.pem")
        self.assertIn("the certificate in alice.pem is not signed by this hub's CA", str(e))

    def test_another_ca_with_the_same_name(self):
        """The issuer's name is not enough: the signature is checked."""
        ca_cert, _ = pki.ensure_ca(self.dir)
        impostor_key = ec.generate_private_key(ec.SECP256R1())
        cert = signed_by(self.dir)
        forged = (
            x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca_cert.subject)
            .public_key(cert.public_key()).serial_number(1).not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc).sign(impostor_key, hashes.SHA256())
        )
        e = self.assertRaises(StateError, pki.check_client_certificate, self.dir, forged, "f.pem")
        self.assertIn("not signed by this hub's CA", str(e))

    def test_expired(self):
        e = self.assertRaises(StateError, pki.check_client_certificate, self.dir, signed_by(self.dir, days=(-9, -1)),
                              "old.pem")
        self.assertIn("expired on", str(e))

    def test_a_server_certificate(self):
        server = x509.load_pem_x509_certificate(open(os.path.join(self.dir, "server.pem"), "rb").read())
        e = self.assertRaises(StateError, pki.check_client_certificate, self.dir, server, "server.pem")
        self.assertIn("not for client authentication", str(e))

    def test_a_ca_certificate(self):
        e = self.assertRaises(StateError, pki.check_client_certificate, self.dir, signed_by(self.dir, ca=True), "c.pem")
        self.assertIn("is a CA certificate", str(e))

    def test_a_file_that_holds_none(self):
        path = os.path.join(self.dir, "junk.pem")
        with open(path, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(StateError, pki.load_certificate_file, path, "certificate file (--cert-file)")
        self.assertEqual(str(e), f"the certificate file (--cert-file) {path} holds no PEM certificate")


class CardIdentity(SynchronousTestCase):
    """What a card presents: its certificate and key, checked before it dials."""

    def setUp(self):
        self.dir = tempdir(self)
        cert, key_pem = pki.issue_client_certificate(self.dir, "alice")
        self.cert_file, self.key_file = os.path.join(self.dir, "alice.pem"), os.path.join(self.dir, "alice.key")
        pki.create_private(self.cert_file, pki.certificate_pem(cert), 0o644)
        pki.create_private(self.key_file, key_pem)
        self.cert = cert

    def test_loaded(self):
        identity = pki.load_client_identity(self.cert_file, self.key_file)
        self.assertEqual(identity.original.to_cryptography(), self.cert)

    def test_a_key_others_may_read(self):
        os.chmod(self.key_file, 0o644)
        e = self.assertRaises(StateError, pki.load_client_identity, self.cert_file, self.key_file)
        self.assertIn(f"the key file (--key-file) {self.key_file} may be read by other users (mode 0644)", str(e))

    def test_another_certificates_key(self):
        _, other_key = pki.issue_client_certificate(self.dir, "bob")
        os.unlink(self.key_file)
        pki.create_private(self.key_file, other_key)
        e = self.assertRaises(StateError, pki.load_client_identity, self.cert_file, self.key_file)
        self.assertIn("is not the key of the certificate", str(e))

    def test_an_encrypted_key(self):
        key = serialization.load_pem_private_key(open(self.key_file, "rb").read(), None)
        os.unlink(self.key_file)
        pki.create_private(self.key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass")))
        e = self.assertRaises(StateError, pki.load_client_identity, self.cert_file, self.key_file)
        self.assertIn("is encrypted", str(e))

    def test_missing_files(self):
        e = self.assertRaises(StateError, pki.load_client_identity, self.cert_file + ".x", self.key_file)
        self.assertIn("does not exist", str(e))
        e = self.assertRaises(StateError, pki.load_client_identity, self.cert_file, self.key_file + ".x")
        self.assertIn("cannot read the key file (--key-file)", str(e))


def record(fp_byte: int = 1, **kw) -> CertificateRecord:
    fields = dict(fingerprint=":".join([f"{fp_byte:02X}"] * 32), subject="CN=alice", serial="1f",
                  not_after="2030-01-01T00:00:00+00:00", added="2025-01-01T00:00:00+00:00")
    fields.update(kw)
    return CertificateRecord(**fields)


class Store(SynchronousTestCase):
    """The user store's certificate records, and the mapping certificate -> user."""

    def setUp(self):
        self.dir = tempdir(self)
        self.state = HubState(self.dir)
        self.state.add_user("DEFAULT", "alice", None)
        self.state.add_user("DEFAULT", "bob", b"pw")
        self.a, self.b = record(1), record(2)

    def users_file(self, hub="DEFAULT"):
        with open(os.path.join(self.dir, "hubs", hub, "users.json")) as f:
            return json.load(f)

    def test_a_user_without_a_password_has_no_password_login(self):
        self.assertNotIn("password", self.users_file()["users"]["alice"])
        self.assertEqual(self.state.authenticate("DEFAULT", "alice", b""), wire.Refusal.AUTH_FAILED)

    def test_registered_and_kept_in_the_users_file(self):
        self.assertTrue(self.state.add_certificate("DEFAULT", "alice", self.a))
        self.assertFalse(self.state.add_certificate("DEFAULT", "alice", self.a))  # already hers
        stored = self.users_file()["users"]["alice"]["certificates"]
        self.assertEqual(stored, {self.a.fingerprint: {"subject": "CN=alice", "serial": "1f",
                                                       "not_after": "2030-01-01T00:00:00+00:00",
                                                       "added": "2025-01-01T00:00:00+00:00"}})
        fresh = HubState(self.dir)  # as the running hub sees it
        self.assertEqual(fresh.certificates("DEFAULT", "alice"), [self.a])
        self.assertEqual(fresh.certificate_user("DEFAULT", self.a.fingerprint), "alice")
        self.assertIsNone(fresh.certificate_login("DEFAULT", "alice", self.a.fingerprint))

    def test_a_password_change_keeps_the_certificates(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        self.state.add_user("DEFAULT", "alice", b"new")
        self.assertEqual(self.state.certificates("DEFAULT", "alice"), [self.a])
        self.assertIsNone(self.state.authenticate("DEFAULT", "alice", b"new"))  # both ways now

    def test_the_user_in_the_hello_must_be_the_certificates(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        self.assertEqual(self.state.certificate_login("DEFAULT", "bob", self.a.fingerprint), wire.Refusal.AUTH_FAILED)
        self.assertEqual(self.state.certificate_login("DEFAULT", "alice", self.b.fingerprint),
                         wire.Refusal.AUTH_FAILED)  # unknown
        self.assertEqual(self.state.certificate_login("NOPE", "alice", self.a.fingerprint), wire.Refusal.AUTH_FAILED)

    def test_one_certificate_one_user(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        e = self.assertRaises(StateError, self.state.add_certificate, "DEFAULT", "bob", self.a)
        self.assertIn("is already user alice's", str(e))
        self.assertRaises(StateError, self.state.add_certificate, "DEFAULT", "nobody", self.b)

    def test_one_user_several_certificates(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        self.state.add_certificate("DEFAULT", "alice", self.b)
        self.assertEqual(self.state.revoke_certificates("DEFAULT", "alice", self.a.fingerprint), [self.a.fingerprint])
        self.assertEqual(self.state.certificate_login("DEFAULT", "alice", self.a.fingerprint),
                         wire.Refusal.AUTH_FAILED)
        self.assertIsNone(self.state.certificate_login("DEFAULT", "alice", self.b.fingerprint))
        self.assertEqual(self.state.revoke_certificates("DEFAULT", "alice"), [self.b.fingerprint])
        self.assertEqual(self.state.revoke_certificates("DEFAULT", "alice"), [])
        self.assertEqual(self.state.certificate_login("DEFAULT", "alice", self.b.fingerprint),
                         wire.Refusal.AUTH_FAILED)

    def test_revoked_stays_revoked(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        self.state.revoke_certificates("DEFAULT", "alice")
        [kept] = HubState(self.dir).certificates("DEFAULT", "alice")
        self.assertIsNotNone(kept.revoked)
        self.assertIsNone(self.state.certificate_user("DEFAULT", self.a.fingerprint))
        for user in ("alice", "bob"):
            e = self.assertRaises(StateError, self.state.add_certificate, "DEFAULT", user, self.a)
            self.assertIn("was revoked on", str(e))

    def test_revoking_what_is_not_there(self):
        e = self.assertRaises(StateError, self.state.revoke_certificates, "DEFAULT", "alice", self.a.fingerprint)
        self.assertIn("has no certificate", str(e))
        self.assertRaises(StateError, self.state.revoke_certificates, "DEFAULT", "nobody")

    def test_a_disabled_user_is_refused(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        self.state.set_user("DEFAULT", "alice", disabled=True)
        self.assertEqual(self.state.certificate_login("DEFAULT", "alice", self.a.fingerprint),
                         wire.Refusal.AUTH_FAILED)

    def test_why_a_certificate_session_ends(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        fp = self.a.fingerprint
        self.assertIsNone(self.state.revoked("DEFAULT", "alice", fp))
        self.state.revoke_certificates("DEFAULT", "alice")
        self.assertEqual(self.state.revoked("DEFAULT", "alice", fp),
                         f"the certificate {fp} of user alice was revoked by the operator")
        self.assertIsNone(self.state.revoked("DEFAULT", "alice"))  # her password sessions may stay
        self.state.delete_user("DEFAULT", "alice")
        self.assertEqual(self.state.revoked("DEFAULT", "alice", fp), "user alice was deleted by the operator")
        self.state.add_user("DEFAULT", "alice", b"pw")  # the same name again: not the same certificates
        self.assertEqual(self.state.revoked("DEFAULT", "alice", fp),
                         f"the certificate {fp} of user alice was removed by the operator")

    def test_a_damaged_certificate_entry(self):
        self.state.add_certificate("DEFAULT", "alice", self.a)
        path = os.path.join(self.dir, "hubs", "DEFAULT", "users.json")
        for certs, why in (([], "'certificates' must be an object"),
                           ({"AB:CD": {}}, "is not a SHA-256 fingerprint"),
                           ({self.a.fingerprint: {"subject": 1}}, "has no 'subject' text")):
            data = self.users_file()
            data["users"]["alice"]["certificates"] = certs
            with open(path, "w") as f:
                json.dump(data, f)
            e = self.assertRaises(StateError, HubState(self.dir).users, "DEFAULT")
            self.assertIn(f"the users file {path} is damaged (user alice: ", str(e))
            self.assertIn(why, str(e))


class HubLogin(SynchronousTestCase):
    """L{Hub.authenticate} and L{Hub.join} with the fingerprint the TLS layer gives."""

    def setUp(self):
        self.lab = Lab(self)
        self.hub = self.lab.hub
        state = self.lab.state
        state.add_user("DEFAULT", "alice", None)
        self.lab.user("bob", "secret")
        self.fp = record(7).fingerprint
        state.add_certificate("DEFAULT", "alice", record(7))

    def login(self, user="alice", password=None, certificate=None, address="192.0.2.9"):
        hello = wire.Hello("DEFAULT", user, password, "02:00:00:00:00:09")
        results = []
        self.hub.authenticate(f"{address}:4000", address, hello, certificate).addBoth(results.append)
        [result] = results
        if isinstance(result, Exception) or hasattr(result, "value"):
            result.trap(Refused)
            return result.value.message.code
        return ("ok", result)

    def test_certificate_without_password(self):
        self.assertEqual(self.login(certificate=self.fp), ("ok", self.fp))

    def test_a_password_is_checked_as_a_password_even_with_a_certificate(self):
        self.assertEqual(self.login("bob", "secret", certificate=self.fp), ("ok", None))
        self.assertEqual(self.login("bob", "wrong", certificate=self.fp), wire.Refusal.AUTH_FAILED)
        self.assertEqual(self.login("alice", "anything", certificate=self.fp), wire.Refusal.AUTH_FAILED)

    def test_refusals_look_like_a_wrong_password(self):
        self.assertEqual(self.login("bob", certificate=self.fp), wire.Refusal.AUTH_FAILED)  # not bob's
        self.assertEqual(self.login(certificate=record(8).fingerprint), wire.Refusal.AUTH_FAILED)  # unknown
        self.lab.state.revoke_certificates("DEFAULT", "alice")
        self.assertEqual(self.login(certificate=self.fp), wire.Refusal.AUTH_FAILED)
        self.assertEqual(self.hub.refusals_by_code, {wire.Refusal.AUTH_FAILED: 3})

    def test_neither_password_nor_certificate(self):
        self.assertEqual(self.login(), wire.Refusal.BAD_HELLO)

    def test_certificate_failures_count_as_guesses(self):
        self.hub.guard = LoginGuard(allowed=3)
        for _ in range(3):
            self.assertEqual(self.login("bob", certificate=self.fp), wire.Refusal.AUTH_FAILED)
        self.assertEqual(self.login("bob", certificate=self.fp), wire.Refusal.THROTTLED)
        self.assertEqual(self.login("bob", "secret", address="192.0.2.10"), ("ok", None))  # others are not

    def test_the_check_runs_where_the_hub_puts_it(self):
        ran = []
        self.hub.verify = lambda f, *a: (ran.append(f.__name__), succeed(f(*a)))[1]
        self.login(certificate=self.fp)
        self.assertEqual(ran, ["certificate_login"])

    def join(self, certificate, user="alice", n=9):
        hello = wire.Hello("DEFAULT", user, None if certificate else "secret", f"02:00:00:00:00:{n:02x}")
        session, _, _ = self.hub.join(f"192.0.2.{n}:4000", hello, certificate)
        return session

    def test_revoking_ends_the_certificates_sessions_only(self):
        self.lab.state.add_user("DEFAULT", "alice", b"pw")
        by_cert, by_password = self.join(self.fp, n=1), self.join(None, n=2)
        self.assertEqual(by_cert.describe(0)["auth"], "certificate")
        self.assertEqual(by_cert.describe(0)["certificate"], self.fp)
        self.assertEqual(by_password.describe(0)["auth"], "password")
        self.lab.state.revoke_certificates("DEFAULT", "alice", self.fp)
        ended, errors = self.hub.users_changed()
        self.assertEqual(errors, [])
        self.assertEqual(ended, [(by_cert, f"the certificate {self.fp} of user alice was revoked by the operator")])
        self.assertEqual(list(self.hub.sessions.values()), [by_password])

    def test_a_held_certificate_session_ends_too(self):
        session = self.join(self.fp)
        self.assertTrue(session.held)  # no link: as after a cut line
        self.lab.state.revoke_certificates("DEFAULT", "alice")
        self.hub.users_changed()
        self.assertTrue(session.ended)

    def test_a_resumed_session_answers_for_the_login_that_resumed_it(self):
        import base64

        other = record(8)
        self.lab.state.add_certificate("DEFAULT", "alice", other)
        session = self.join(self.fp)
        resume = wire.Resume(session.id, base64.b64encode(session.token).decode(), 0)
        hello = wire.Hello("DEFAULT", "alice", None, "02:00:00:00:00:09", resume=resume)
        again, resumed, _ = self.hub.join("192.0.2.9:4001", hello, other.fingerprint)
        self.assertEqual((again, resumed, again.certificate), (session, True, other.fingerprint))
        self.lab.state.revoke_certificates("DEFAULT", "alice", self.fp)
        self.assertEqual(self.hub.users_changed(), ([], []))
        self.lab.state.revoke_certificates("DEFAULT", "alice", other.fingerprint)
        self.assertEqual([s for s, _ in self.hub.users_changed()[0]], [session])

    def test_nothing_revoked_nothing_ended(self):
        session = self.join(self.fp)
        self.assertEqual(self.hub.users_changed(), ([], []))
        self.assertFalse(session.ended)


def issue_files(state_dir: str, out: str, user: str, register: bool = True):
    """What 'sevpn hub user add USER --cert --out OUT' does: the card's files; the certificate registered."""
    cert, key_pem = pki.issue_client_certificate(state_dir, user)
    cert_file, key_file = os.path.join(out, f"{user}-{pki.fingerprint(cert)[:5]}.pem"), None
    key_file = cert_file[:-4] + ".key"
    pki.create_private(cert_file, pki.certificate_pem(cert), 0o644)
    pki.create_private(key_file, key_pem)
    if register:
        state = HubState(state_dir)
        state.add_user("DEFAULT", user, None)
        state.add_certificate("DEFAULT", user, pki.certificate_record(cert))
    return cert_file, key_file, pki.fingerprint(cert)


class CertificateLogins(TestCase):
    """A real hub service on loopback; cards with certificates and passwords over real TLS."""

    timeout = 60

    def setUp(self):
        self.dir = tempdir(self)
        self.files = tempdir(self)
        pki.ensure_pki(self.dir)
        self.alice = issue_files(self.dir, self.files, "alice")
        HubState(self.dir).add_user("DEFAULT", "bob", b"pw")
        self.service = HubService(state_dir=self.dir, listen=["tcp:0:interface=127.0.0.1"])
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.hub = self.service.hub
        self.port = self.service.ports[0].getHost().port
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def card(self, user, n, password=None, identity=None):
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(n), tls_endpoint_for(reactor))
        cert_file, key_file = identity[:2] if identity else (None, None)
        card.connect(Account(name="t", hub=f"127.0.0.1:{self.port}", user=user, password=password,
                             cert_file=cert_file, key_file=key_file, ca_file=os.path.join(self.dir, "ca.pem")))
        self.addCleanup(card.disconnect)
        return card

    def sessions(self):
        return {s["user"]: s for s in self.hub.describe_sessions()}

    @inlineCallbacks
    def test_a_certificate_user_connects_without_a_password_beside_a_password_user(self):
        alice = self.card("alice", 1, identity=self.alice)
        bob = self.card("bob", 2, password="pw")
        yield eventually(lambda: alice.state == "connected" and bob.state == "connected", "both cards to connect")
        sessions = self.sessions()
        self.assertEqual((sessions["alice"]["auth"], sessions["alice"]["certificate"]), ("certificate", self.alice[2]))
        self.assertEqual((sessions["bob"]["auth"], sessions["bob"]["certificate"]), ("password", None))
        self.assertEqual(self.hub.refusals, 0)
        # frames cross between them
        alice.lan.tap.os_sends([b"\xff" * 6 + mac(1) + b"\x08\x00" + b"from alice" * 5])
        yield eventually(lambda: bob.lan.tap.written, "alice's frame at bob's card")
        self.assertIn(b"from alice", bob.lan.tap.written[0])

    @inlineCallbacks
    def test_revoked_ends_the_live_session_and_is_refused(self):
        alice = self.card("alice", 1, identity=self.alice)
        bob = self.card("bob", 2, password="pw")
        yield eventually(lambda: alice.state == "connected" and bob.state == "connected", "both cards to connect")
        HubState(self.dir).revoke_certificates("DEFAULT", "alice")  # as 'sevpn hub user cert revoke alice'
        answer = yield self.service.users_changed()  # and its control command 'users-changed'
        self.assertEqual([(e["user"], e["reason"]) for e in answer["ended"]],
                         [("alice", f"the certificate {self.alice[2]} of user alice was revoked by the operator")])
        # the card is told, tries again with the same certificate, and is refused as with a wrong password
        yield eventually(lambda: alice.state == "refused", "the card to be refused")
        self.assertEqual(alice.last_error, "the hub refused the connection: " +
                         wire.Refusal.MESSAGES[wire.Refusal.AUTH_FAILED] +
                         f" (this card logs in with the certificate {self.alice[0]}: the hub may not have it for "
                         f"user alice, or revoked it)")
        self.assertEqual(self.hub.refusals_by_code, {wire.Refusal.AUTH_FAILED: 1})
        self.assertEqual(list(self.sessions()), ["bob"])
        self.assertEqual(bob.state, "connected")

    @inlineCallbacks
    def test_a_certificate_of_another_ca_is_refused_at_tls(self):
        other = tempdir(self)
        stranger = issue_files(other, self.files, "alice", register=False)
        # even registered under its fingerprint, TLS turns it away before any login
        HubState(self.dir).add_certificate("DEFAULT", "alice", pki.certificate_record(
            pki.load_certificate_file(stranger[0])))
        card = self.card("alice", 1, identity=stranger)
        yield eventually(lambda: card.last_error, "the card to fail")
        # the card says why (and keeps trying: the hub's operator may fix it)
        self.assertEqual(card.last_error, "the hub does not accept this card's certificate: it is not signed by "
                                          "the hub's CA (TLS alert unknown ca)")
        self.assertEqual(card.state, "connecting")
        self.assertEqual(self.hub.sessions, {})
        self.assertEqual(self.hub.refusals, 0)  # no hello was ever read
        # the hub counts it, and says it once
        yield eventually(lambda: self.service.status()["certificates_refused"] >= 1, "the hub to count it")
        self.assertEqual(len([e for e in self.logged if "refused a card's certificate from 127.0.0.1 at TLS" in
                              e.get("log_format", "").format(**e)]), 1)

    @inlineCallbacks
    def test_a_certificate_from_this_ca_not_registered_is_refused_at_login(self):
        unregistered = issue_files(self.dir, self.files, "alice", register=False)
        card = self.card("alice", 1, identity=unregistered)
        yield eventually(lambda: card.state == "refused", "the card to be refused")
        self.assertEqual(self.hub.refusals_by_code, {wire.Refusal.AUTH_FAILED: 1})

    @inlineCallbacks
    def test_another_users_certificate_is_refused_at_login(self):
        card = self.card("bob", 1, identity=self.alice)
        yield eventually(lambda: card.state == "refused", "the card to be refused")
        self.assertEqual(self.hub.refusals_by_code, {wire.Refusal.AUTH_FAILED: 1})
        self.assertEqual(self.hub.sessions, {})

    @inlineCallbacks
    def test_a_disabled_users_certificate_session_ends(self):
        alice = self.card("alice", 1, identity=self.alice)
        yield eventually(lambda: alice.state == "connected", "the card to connect")
        HubState(self.dir).set_user("DEFAULT", "alice", disabled=True)
        self.assertEqual([e["reason"] for e in (yield self.service.users_changed())["ended"]],
                         ["user alice was disabled by the operator"])
        yield eventually(lambda: alice.state == "refused", "the card to be refused")


class CertificateLoginsPlainPath(PlainTLS, CertificateLogins):
    pass


class CommandLine(SynchronousTestCase):
    """The operator's commands, run as a user would (the real 'sevpn' in a process)."""

    def setUp(self):
        from tests.test_cli_operator import sevpn

        self.run = sevpn
        self.dir = tempdir(self)
        os.chmod(self.dir, 0o755)
        self.hub = os.path.join(self.dir, "hub")
        self.out = os.path.join(self.dir, "out")
        os.mkdir(self.out)

    def ok(self, *args):
        r = self.run(*args, "--state-dir", self.hub)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def fails(self, *args):
        r = self.run(*args, "--state-dir", self.hub)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertNotIn("Traceback", r.stderr)
        return r.stderr

    def users(self):
        return {u["user"]: u for u in json.loads(self.ok("hub", "user", "list", "--json"))}

    def test_issue(self):
        out = self.ok("hub", "user", "add", "alice", "--cert", "--out", self.out)
        cert_file, key_file = os.path.join(self.out, "alice.pem"), os.path.join(self.out, "alice.key")
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        cert = pki.load_certificate_file(cert_file)
        fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
        fp = ":".join(fp[i:i + 2] for i in range(0, 64, 2))
        self.assertIn(f"SHA-256 fingerprint:  {fp}\n", out)
        self.assertIn(f"--cert-file {cert_file} --key-file {key_file}", out)
        self.assertEqual(cert.subject.rfc4514_string(), "CN=alice")
        self.assertEqual(self.users()["alice"]["certificates"], [fp])
        self.assertFalse(self.users()["alice"]["password"])
        self.assertRegex(self.ok("hub", "user", "list"), r"alice\s+enabled\s+1 certificate\s")
        # no key is ever written over another: nothing issued, nothing registered
        self.assertIn(f"{cert_file} already exists", self.fails("hub", "user", "add", "alice", "--cert", "--out",
                                                                self.out))
        self.assertEqual(self.users()["alice"]["certificates"], [fp])
        # a second one elsewhere, beside a password
        pw = os.path.join(self.dir, "pw")
        with open(pw, "w") as f:
            f.write("s3cret\n")
        more = os.path.join(self.dir, "more")
        os.mkdir(more)
        issued = json.loads(self.ok("hub", "user", "add", "alice", "--cert", "--out", more, "--password-file", pw,
                                    "--json"))
        self.assertEqual(issued["key_file"], os.path.join(more, "alice.key"))
        self.assertEqual(self.users()["alice"]["certificates"], [fp, issued["sha256"]])
        self.assertTrue(self.users()["alice"]["password"])
        self.assertRegex(self.ok("hub", "user", "list"), r"alice\s+enabled\s+password, 2 certificates\s")

    def test_register_a_given_certificate(self):
        self.ok("hub", "user", "add", "alice", "--cert", "--out", self.out)
        os.rename(os.path.join(self.out, "alice.pem"), os.path.join(self.out, "given.pem"))
        self.ok("hub", "user", "cert", "revoke", "alice")
        # a certificate from this CA that is no one's yet
        cert, _ = pki.issue_client_certificate(self.hub, "bob")
        path = os.path.join(self.out, "bob.pem")
        pki.create_private(path, pki.certificate_pem(cert), 0o644)
        out = self.ok("hub", "user", "add", "bob", "--cert-file", path)
        self.assertIn(f"SHA-256 fingerprint:  {pki.fingerprint(cert)}\n", out)
        self.assertEqual(self.users()["bob"]["certificates"], [pki.fingerprint(cert)])
        # a revoked one is never taken back, and the user it was to make is not left behind
        err = self.fails("hub", "user", "add", "carol", "--cert-file", os.path.join(self.out, "given.pem"))
        self.assertIn("was revoked on", err)
        self.assertNotIn("carol", self.users())

    def test_another_hubs_certificate_is_refused(self):
        pki.ensure_pki(self.hub)  # as the hub's first start
        cert, _ = other_ca_certificate()
        path = os.path.join(self.out, "stranger.pem")
        pki.create_private(path, pki.certificate_pem(cert), 0o644)
        err = self.fails("hub", "user", "add", "alice", "--cert-file", path)
        self.assertIn(f"sevpn: the certificate in {path} is not signed by this hub's CA", err)
        self.assertNotIn("alice", self.users())
        err = self.fails("hub", "user", "add", "alice", "--cert-file", os.path.join(self.out, "none.pem"))
        self.assertIn(f"the certificate file (--cert-file) {self.out}/none.pem does not exist", err)

    def test_list_and_revoke(self):
        self.ok("hub", "user", "add", "alice", "--cert", "--out", self.out)
        [fp] = self.users()["alice"]["certificates"]
        listed = json.loads(self.ok("hub", "user", "cert", "list", "alice", "--json"))
        self.assertEqual([(c["sha256"], c["state"], c["revoked"]) for c in listed], [(fp, "valid", None)])
        self.assertIn("is not a SHA-256 fingerprint", self.fails("hub", "user", "cert", "revoke", "alice", "00" * 31))
        self.assertIn("has no certificate", self.fails("hub", "user", "cert", "revoke", "alice", "00" * 32))
        out = self.ok("hub", "user", "cert", "revoke", "alice", fp.replace(":", "").lower())
        self.assertEqual(out, f"revoked certificate {fp} of user alice on virtual hub DEFAULT\n")
        self.assertEqual(self.users()["alice"]["certificates"], [])
        self.assertRegex(self.ok("hub", "user", "cert", "list"), r"alice\s+revoked \d{4}-\d\d-\d\d\s")
        self.assertRegex(self.ok("hub", "user", "list"), r"alice\s+enabled\s+-\s")


class CardOptions(SynchronousTestCase):
    """What the card is given: twistd sevpn-nic's options and 'sevpn account add', checked before any dial."""

    def setUp(self):
        self.dir = tempdir(self)
        os.chmod(self.dir, 0o755)
        self.hub = os.path.join(self.dir, "hub")
        self.cert_file, self.key_file, self.fp = issue_files(self.hub, self.dir, "alice")
        self.ca = os.path.join(self.hub, "ca.pem")

    def options(self, *args):
        from twisted.python.usage import UsageError

        from sevpn.nictap import Options

        options = Options()
        try:
            options.parseOptions(["--tap", "ce9", "--hub", "127.0.0.1:5555", "--user", "alice", "--ca-file", self.ca,
                                  *args])
        except UsageError as e:
            return str(e)
        return options

    def test_twistd_takes_a_certificate_instead_of_a_password(self):
        account = self.options("--cert-file", self.cert_file, "--key-file", self.key_file)["connect"]
        self.assertEqual((account.password, account.cert_file, account.key_file),
                         (None, self.cert_file, self.key_file))

    def test_twistd_mistakes(self):
        pw = os.path.join(self.dir, "pw")
        with open(pw, "w") as f:
            f.write("x\n")
        self.assertEqual(self.options("--cert-file", self.cert_file, "--key-file", self.key_file, "--password-file", pw),
                         "give either --password-file or --cert-file/--key-file, not both")
        self.assertEqual(self.options("--cert-file", self.cert_file), "to connect at start also give --key-file")
        self.assertEqual(self.options(), "to connect at start also give --password-file (or --cert-file and --key-file)")
        os.chmod(self.key_file, 0o640)
        self.assertIn(f"the key file (--key-file) {self.key_file} may be read by other users (mode 0640)",
                      self.options("--cert-file", self.cert_file, "--key-file", self.key_file))

    def test_account_add(self):
        from tests.test_cli_operator import sevpn

        nic = os.path.join(self.dir, "nic")
        r = sevpn("account", "add", "office", "--state-dir", nic, "--hub", "127.0.0.1:5555", "--user", "alice",
                  "--ca-file", self.ca, "--cert-file", self.cert_file, "--key-file", self.key_file)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"as alice, with a certificate {self.cert_file})", r.stdout)
        with open(os.path.join(nic, "accounts", "office.json")) as f:
            saved = json.load(f)
        self.assertEqual((saved["password"], saved["cert_file"], saved["key_file"]),
                         (None, self.cert_file, self.key_file))
        os.chmod(self.key_file, 0o644)
        r = sevpn("account", "add", "other", "--state-dir", nic, "--hub", "127.0.0.1:5555", "--user", "alice",
                  "--ca-file", self.ca, "--cert-file", self.cert_file, "--key-file", self.key_file)
        self.assertEqual(r.returncode, 1)
        self.assertIn("may be read by other users", r.stderr)
        r = sevpn("account", "add", "other", "--state-dir", nic, "--hub", "127.0.0.1:5555", "--user", "alice",
                  "--ca-file", self.ca, "--cert-file", self.cert_file)
        self.assertEqual(r.returncode, 1)
        self.assertIn("give both --cert-file and --key-file", r.stderr)
