"""
Certificate users on real programs: a real twistd hub and two real cards
(TAP devices, TLS) in network namespaces this test makes, one card logging
in with the certificate 'sevpn hub user add --cert' issued
(C{--cert-file/--key-file}, no password), the other with a password;
they ping each other, and revoking the certificate ends its session at
once.  Skipped, with the reason, when not root or without /dev/net/tun.
"""

from __future__ import annotations

import os
import stat

from scripts.netns import BIN, Topology, sevpn, wait_for
from tests.test_system import SystemTestCase

TAP = "ce0"


class CertTopology(Topology):
    prefix = "ce"


class CertificateCard(SystemTestCase):
    """Card 1 (alice, certificate) and card 2 (u2, password), each on TAP ce0 in its own host namespace."""

    hosts = 2

    @classmethod
    def make_topology(cls):
        return CertTopology(cls.hosts)

    @classmethod
    def start(cls, topo):
        topo.add_user("u2")
        cls.issued = sevpn("hub", "user", "add", "alice", "--cert", "--out", topo.dir,
                           "--state-dir", topo.hub_state).stdout
        cls.cert_file, cls.key_file = os.path.join(topo.dir, "alice.pem"), os.path.join(topo.dir, "alice.key")
        topo.start_hub()
        ca = os.path.join(topo.hub_state, "ca.pem")
        credentials = {1: ("alice", "--cert-file", cls.cert_file, "--key-file", cls.key_file),
                       2: ("u2", "--password-file", os.path.join(topo.dir, "password"))}
        for i, (user, *login) in credentials.items():
            state = topo.card_state(i)
            proc = topo.cards[i] = topo.spawn(
                topo.host(i), f"card{i}", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic",
                "--state-dir", state, "--tap", TAP, "--hub", f"{topo.hub_addr(i)}:5555", "--user", user,
                "--ca-file", ca, *login,
            )
            wait_for(lambda: os.path.exists(os.path.join(state, "control.sock")) or proc.poll() is not None, 30,
                     f"card {i} to start")
            if proc.poll() is not None:
                raise AssertionError(f"card {i} exited: {topo.log(f'card{i}')[-2000:]}")
            topo.run(topo.host(i), "ip", "addr", "replace", f"{topo.tap_addr(i)}/24", "dev", TAP)

    def ping(self, src, dst):
        topo = self.topo
        return topo.run(topo.host(src), "ping", "-c", "3", "-i", "0.2", "-W", "2", topo.tap_addr(dst), check=False)

    def test_a_certificate_card_connects_and_pings(self):
        topo = self.topo
        self.assertIn("SHA-256 fingerprint:", self.issued)
        self.assertEqual(stat.S_IMODE(os.stat(self.key_file).st_mode), 0o600)
        for i in (1, 2):
            topo.wait_connected(i)
        sessions = {s["user"]: s for s in topo.hub_sessions()}
        fingerprint = self.issued.split("SHA-256 fingerprint:")[1].split()[0]
        self.assertEqual((sessions["alice"]["auth"], sessions["alice"]["certificate"]), ("certificate", fingerprint))
        self.assertEqual(sessions["u2"]["auth"], "password")
        self.assertIn(f"alice joined virtual hub DEFAULT from {topo.host_addr(1)}", topo.log("hub"))
        self.assertIn(f"with certificate {fingerprint}", topo.log("hub"))
        for src, dst in ((1, 2), (2, 1)):
            out = self.ping(src, dst)
            self.assertIn(" 0% packet loss", out, f"ping {src}->{dst}: {out}\nhub: {topo.log('hub')[-1500:]}")

    def test_revoking_ends_its_session_at_once(self):
        topo = self.topo
        session = topo.wait_connected(1)["session"]
        fingerprint = self.issued.split("SHA-256 fingerprint:")[1].split()[0]
        out = sevpn("hub", "user", "cert", "revoke", "alice", "--state-dir", topo.hub_state).stdout
        why = f"the certificate {fingerprint} of user alice was revoked by the operator"
        self.assertIn(f"ended session {session} of alice on virtual hub DEFAULT: {why}", out)
        self.assertNotIn("alice", [s["user"] for s in topo.hub_sessions()])
        wait_for(lambda: f"closed the session ({why})" in topo.log("card1"), 10, "the card to log the hub's reason")
        status = wait_for(lambda: (lambda s: s if s["state"] == "refused" else None)(topo.card_status(1)), 15,
                          "the card to be refused")
        self.assertIn("the user name or password is wrong", status["last_error"])
        self.assertEqual(topo.card_status(2)["state"], "connected")  # the password user stays
