"""
The sevpn command and twistd as a new operator meets them: every mistake
(a state dir one may not use, a typo, a damaged file, a junk CA, a bad
endpoint) is one sentence naming the option or path and what to do, with
exit status 1 and never a traceback; state dirs that others could have
planted files in are refused.

The "non-root user" runs the real command in a process that drops to
nobody's uid before it parses anything (the interpreter itself lives
where nobody may not read).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from scripts.netns import BIN, env
from sevpn.defaults import MAX_SESSIONS

NOBODY = 65534

_AS_USER = (
    "import os, sys, sevpn.cli; "
    "os.setgroups([]); os.setgid({uid}); os.setuid({uid}); "
    "sys.exit(sevpn.cli.main(sys.argv[1:]))"
)


def sevpn(*args, input=None, uid=None):
    if uid is None:
        cmd = [sys.executable, "-m", "sevpn.cli", *args]
    else:
        cmd = [sys.executable, "-c", _AS_USER.format(uid=uid), *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=input, env=env(), timeout=60, cwd="/")


def twistd(*args, timeout=30):
    return subprocess.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd="/")


class Case(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="op-cli-")
        os.chmod(self.dir, 0o755)  # as /var/lib: others may look, not write
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.hub = os.path.join(self.dir, "hub")
        self.nic = os.path.join(self.dir, "nic")
        self.pw = os.path.join(self.dir, "pw")
        with open(self.pw, "w") as f:
            f.write("s3cret\n")
        os.chmod(self.pw, 0o644)

    def fails(self, result, *fragments):
        """C{result} is one sentence on stderr (with C{fragments}), exit status 1."""
        self.assertEqual(result.returncode, 1, (result.stdout, result.stderr))
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertTrue(lines and lines[-1].startswith("sevpn"), result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)
        return result.stderr

    def ok(self, result):
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def add_user(self, user="alice"):
        return self.ok(sevpn("hub", "user", "add", user, "--state-dir", self.hub, "--password-file", self.pw))


class NotRoot(Case):
    """The first thing a non-root user tries."""

    def setUp(self):
        if os.geteuid() != 0:
            raise SkipTest("acting as another user needs root")
        super().setUp()

    def test_creating_where_one_may_not(self):
        for args in (("hub", "user", "add", "alice", "--password-file", self.pw), ("hub", "create", "LAB")):
            self.fails(sevpn(*args, "--state-dir", self.hub, uid=NOBODY),
                       f"cannot create the state dir {self.hub}: permission denied; run this as root")
        self.fails(sevpn("account", "add", "office", "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
                         "--password-file", self.pw, "--ca-file", self.ca(), uid=NOBODY),
                   f"cannot create the state dir {self.nic}: permission denied")

    def test_reading_a_state_dir_of_root(self):
        self.add_user()
        for args in (("hub", "user", "list"), ("hub", "list"), ("hub", "user", "add", "bob", "--password-file", self.pw)):
            self.fails(sevpn(*args, "--state-dir", self.hub, uid=NOBODY),
                       f"the state dir {self.hub} belongs to root: run this as root")

    def test_asking_a_hub_that_runs_as_root(self):
        self.add_user()
        os.chmod(self.hub, 0o755)  # even where the socket can be seen
        open(os.path.join(self.hub, "control.sock"), "w").close()
        self.fails(sevpn("hub", "status", "--state-dir", self.hub, uid=NOBODY), "run this as root")

    def ca(self):
        from sevpn.pki import ensure_pki

        ensure_pki(os.path.join(self.dir, "pki"))
        ca = os.path.join(self.dir, "pki", "ca.pem")
        os.chmod(os.path.join(self.dir, "pki"), 0o755)
        return ca


class Mistakes(Case):
    def test_version(self):
        from sevpn import __version__

        self.assertEqual(self.ok(sevpn("--version")).strip(), f"sevpn {__version__}")

    def test_a_state_dir_that_is_a_file(self):
        for args in (("hub", "user", "add", "alice", "--password-file", self.pw), ("hub", "list"),
                     ("hub", "create", "LAB"), ("hub", "ca"), ("hub", "status"), ("hub", "user", "list")):
            self.fails(sevpn(*args, "--state-dir", self.pw), f"the state dir {self.pw} is a file, not a directory")
        for args in (("account", "list"), ("nic", "status")):
            self.fails(sevpn(*args, "--state-dir", self.pw), f"the state dir {self.pw} is a file, not a directory")

    def test_a_state_dir_inside_a_file(self):
        for args in (("hub", "create", "LAB"), ("hub", "list")):
            self.fails(sevpn(*args, "--state-dir", os.path.join(self.pw, "hub")),
                       f"{self.pw} is a file, not a directory, so the state dir {self.pw}/hub cannot be there")

    def test_reading_a_state_dir_that_does_not_exist(self):
        """A typo is an error, not an empty hub."""
        typo = os.path.join(self.dir, "typo")
        for args in (("hub", "list"), ("hub", "user", "list"), ("hub", "sessions"), ("hub", "status"),
                     ("hub", "macs"), ("hub", "ca"), ("account", "list"), ("nic", "status"),
                     ("hub", "user", "delete", "alice"), ("hub", "user", "disable", "alice")):
            self.fails(sevpn(*args, "--state-dir", typo), f"there is no state dir {typo}: pass --state-dir")
        self.assertFalse(os.path.exists(typo))

    def test_a_damaged_users_file(self):
        self.add_user()
        users = os.path.join(self.hub, "hubs", "DEFAULT", "users.json")
        with open(users, "w") as f:
            f.write('{"users": {"alice": ')
        for args in (("hub", "user", "list"), ("hub", "list"), ("hub", "user", "add", "bob", "--password-file", self.pw),
                     ("hub", "user", "disable", "alice")):
            self.fails(sevpn(*args, "--state-dir", self.hub), f"the users file {users} is damaged")
        with open(users) as f:
            self.assertEqual(f.read(), '{"users": {"alice": ')  # nothing written over it

    def test_a_damaged_account_file(self):
        ca = self.ca()
        for name in ("good", "bad"):
            self.ok(sevpn("account", "add", name, "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
                          "--password-file", self.pw, "--ca-file", ca))
        bad = os.path.join(self.nic, "accounts", "bad.json")
        with open(bad, "w") as f:
            f.write('{"name": "bad", "hub": 5}')
        r = sevpn("account", "list", "--state-dir", self.nic)
        self.fails(r, f"the account file {bad} is damaged", "sevpn account delete bad")
        self.assertIn("good", r.stdout)

    def test_junk_ca_files(self):
        from sevpn.pki import ensure_pki

        ensure_pki(os.path.join(self.dir, "pki"))
        junk = os.path.join(self.dir, "junk.pem")
        with open(junk, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        empty = os.path.join(self.dir, "empty.pem")
        open(empty, "w").close()
        cases = [
            (junk, "holds no PEM certificate"),
            (empty, "holds no PEM certificate"),
            (os.path.join(self.dir, "pki", "server.pem"), "is not a CA certificate"),
            (self.dir, "is a directory"),
            (os.path.join(self.dir, "missing.pem"), "does not exist"),
        ]
        for path, why in cases:
            self.fails(sevpn("account", "add", "office", "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
                             "--password-file", self.pw, "--ca-file", path), f"the CA file {path}", why)
        self.assertFalse(os.path.exists(os.path.join(self.nic, "accounts", "office.json")))

    def test_the_pinned_fingerprint_is_the_hubs(self):
        from sevpn.pki import ensure_pki

        ensure_pki(self.hub)
        ca = json.loads(self.ok(sevpn("hub", "ca", "--json", "--state-dir", self.hub)))
        self.assertEqual(ca["path"], os.path.join(self.hub, "ca.pem"))
        self.assertEqual(len(ca["sha256"].split(":")), 32)
        self.assertGreater(ca["days_left"], 3000)
        text = self.ok(sevpn("hub", "ca", "--state-dir", self.hub))
        self.assertIn(f"SHA-256 fingerprint:  {ca['sha256']}", text)
        out = self.ok(sevpn("account", "add", "office", "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
                            "--password-file", self.pw, "--ca-file", ca["path"]))
        self.assertIn(f"SHA-256 fingerprint {ca['sha256']}", out)
        with open(os.path.join(self.nic, "accounts", "office.json")) as f:
            self.assertEqual(json.load(f)["ca_sha256"], ca["sha256"])

    def test_a_replaced_ca_file_is_refused_at_connect(self):
        from sevpn.accounts import AccountStore
        from sevpn.cardservice import tls_endpoint_for
        from sevpn.files import StateError
        from sevpn.pki import ensure_pki

        ensure_pki(self.hub)
        ca = os.path.join(self.dir, "ca.pem")
        shutil.copy(os.path.join(self.hub, "ca.pem"), ca)
        self.ok(sevpn("account", "add", "office", "--state-dir", self.nic, "--hub", "h:1", "--user", "u",
                      "--password-file", self.pw, "--ca-file", ca))
        account = AccountStore(self.nic).get("office")
        tls_endpoint_for(None)(account)  # as pinned: usable
        ensure_pki(os.path.join(self.dir, "impostor"))
        shutil.copy(os.path.join(self.dir, "impostor", "ca.pem"), ca)
        with self.assertRaises(StateError) as caught:
            tls_endpoint_for(None)(account)
        self.assertIn(f"the CA file {ca} changed since account office was saved", str(caught.exception))

    def test_policy_values(self):
        self.add_user()
        cases = [
            (("--rate-in", "10X"), "argument --rate-in: '10X' is not a rate"),
            (("--rate-out", "2T"), "argument --rate-out: '2T' is more than 1 Tbit/s"),
            (("--max-sessions", "-1"), f"argument --max-sessions: give a whole number from 0 (the default) to {MAX_SESSIONS}"),
            (("--max-macs", "lots"), "argument --max-macs"),
            ((), "nothing to set"),
        ]
        for args, why in cases:
            self.fails(sevpn("hub", "user", "set", "alice", "--state-dir", self.hub, *args), why)
        self.fails(sevpn("hub", "user", "set", "carol", "--rate-in", "1M", "--state-dir", self.hub),
                   "there is no user carol on virtual hub DEFAULT")

    def test_policy_is_stored_and_shown(self):
        self.add_user()
        self.add_user("bob")
        out = self.ok(sevpn("hub", "user", "set", "alice", "--state-dir", self.hub, "--rate-in", "10M",
                            "--rate-out", "500k", "--max-sessions", "2", "--max-macs", "4", "--broadcast-pps", "100"))
        self.assertIn("rate in 10 Mbit/s", out)
        self.ok(sevpn("hub", "user", "disable", "bob", "--state-dir", self.hub))
        with open(os.path.join(self.hub, "hubs", "DEFAULT", "users.json")) as f:
            users = json.load(f)["users"]
        self.assertEqual({k: v for k, v in users["alice"].items() if k != "password"},
                         {"policy": {"rate_in": 10_000_000, "rate_out": 500_000, "max_sessions": 2, "max_macs": 4,
                                     "broadcast_pps": 100}})
        self.assertEqual(users["bob"]["disabled"], True)
        text = self.ok(sevpn("hub", "user", "list", "--state-dir", self.hub)).splitlines()
        self.assertEqual(text[0].split(), ["HUB", "USER", "STATE", "LOGIN", "SESSIONS", "MACS", "RATE", "IN", "RATE",
                                           "OUT", "BCAST", "PPS"])
        self.assertEqual(text[1].split(), ["DEFAULT", "alice", "enabled", "password", "2", "4", "10", "Mbit/s", "500",
                                           "kbit/s", "100"])
        self.assertEqual(text[2].split(), ["DEFAULT", "bob", "disabled", "password", "-", "-", "-", "-", "-"])
        # a new password keeps the policy; 0 lifts a limit
        self.ok(sevpn("hub", "user", "add", "alice", "--state-dir", self.hub, "--password-file", self.pw))
        self.ok(sevpn("hub", "user", "set", "alice", "--state-dir", self.hub, "--rate-in", "0"))
        [alice] = [u for u in json.loads(self.ok(sevpn("hub", "user", "list", "--json", "--state-dir", self.hub)))
                   if u["user"] == "alice"]
        self.assertEqual((alice["rate_in"], alice["rate_out"], alice["disabled"]), (0, 500_000, False))
        self.ok(sevpn("hub", "user", "enable", "bob", "--state-dir", self.hub))
        self.assertNotIn("disabled", self.ok(sevpn("hub", "user", "list", "--state-dir", self.hub)))

    def test_no_hub_running_is_no_error_for_edits(self):
        """Edits work before the hub's first start, and beside a stale control socket."""
        self.add_user()
        os.symlink("/nonexistent", os.path.join(self.hub, "control.sock"))
        out = self.ok(sevpn("hub", "user", "disable", "alice", "--state-dir", self.hub))
        self.assertEqual(out.strip(), "user alice disabled on virtual hub DEFAULT")

    def test_world_writable_state_dir_is_refused(self):
        self.add_user()
        os.chmod(self.hub, 0o777)
        self.fails(sevpn("hub", "user", "add", "mallory", "--state-dir", self.hub, "--password-file", self.pw),
                   f"the state dir {self.hub} is writable by other users (mode 0777)", f"chmod 700 {self.hub}")

    def test_the_tap_picks_the_cards_state_dir(self):
        from sevpn.cli import build_parser
        from sevpn.cli.common import resolve_state_dir

        def state_dir(*argv):
            args = build_parser().parse_args(list(argv))
            resolve_state_dir(args)
            return args.state_dir

        self.assertEqual(state_dir("nic", "status"), "/var/lib/sevpn/nic-sevpn0")
        self.assertEqual(state_dir("nic", "status", "--tap", "sevpn1"), "/var/lib/sevpn/nic-sevpn1")
        self.assertEqual(state_dir("account", "list", "-i", "office0"), "/var/lib/sevpn/nic-office0")
        self.assertEqual(state_dir("nic", "connect", "x", "-i", "a", "--state-dir", "/s"), "/s")
        self.assertEqual(state_dir("hub", "list"), "/var/lib/sevpn/hub")
        self.fails(sevpn("nic", "status", "--tap", "../etc"), "TAP name '../etc' may not contain")
        self.fails(sevpn("nic", "status", "--tap", "sevpn0\n"), "may not contain '/', ':' or white space")

    def test_usage_errors_exit_1(self):
        self.fails(sevpn("hub", "frobnicate"), "invalid choice")
        self.fails(sevpn("nic", "connect", "x", "--timeout", "5"), "--timeout goes with --wait")
        self.fails(sevpn("nic", "connect", "x", "--wait", "--timeout", "soon"), "argument --timeout")

    def ca(self):
        from sevpn.pki import ensure_pki

        ensure_pki(os.path.join(self.dir, "pki"))
        return os.path.join(self.dir, "pki", "ca.pem")


class Startup(Case):
    """twistd's options and a hub's start."""

    def test_listen_is_checked_when_options_are_parsed(self):
        cases = [
            ("tcp:abc", "--listen 'tcp:abc' is not an endpoint the hub can listen on (a port or number in it is not a number)"),
            ("tcp:99999", "--listen 'tcp:99999': the port must be a number from 0 to 65535"),
            ("tcp:port=70000:interface=127.0.0.1", "the port must be a number from 0 to 65535"),
            ("nonsense:1", "--listen 'nonsense:1' is not an endpoint the hub can listen on (Unknown endpoint type"),
            ("ssl:443", "--listen 'ssl:443': the hub wraps connections in TLS itself"),
            ("tcp:5555:bogus=1", "--listen 'tcp:5555:bogus=1' is not an endpoint"),
        ]
        for listen, sentence in cases:
            r = twistd("sevpn-hub", "--state-dir", os.path.join(self.dir, "never"), "--listen", listen)
            out = r.stdout + r.stderr
            self.assertNotEqual(r.returncode, 0, listen)
            self.assertIn(sentence, out, listen)
            self.assertNotIn("Traceback", out)
            self.assertNotIn("invalid literal", out)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))  # refused before anything started

    def test_numbers_name_their_option(self):
        for option, value, sentence in [("--mac-age", "abc", "--mac-age must be a number, not 'abc'"),
                                        ("--resume-window", "-1", "--resume-window must not be negative"),
                                        ("--resume-buffer", "1.5", "--resume-buffer must be a whole number"),
                                        ("--keepalive-timeout", "nan", "--keepalive-timeout must be a finite number")]:
            r = twistd("sevpn-hub", "--state-dir", os.path.join(self.dir, "never"), option, value)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(sentence, r.stdout + r.stderr)

    def test_card_ca_file_is_checked_when_options_are_parsed(self):
        r = twistd("sevpn-nic", "--state-dir", os.path.join(self.dir, "never"), "--tap", "opnever0", "--hub", "h:1",
                   "--user", "u", "--password-file", self.pw, "--ca-file", self.pw)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(f"the CA file {self.pw} holds no PEM certificate", r.stdout + r.stderr)
        self.assertNotIn("Traceback", r.stdout + r.stderr)

    def start_hub(self, state_dir, expect_ok):
        proc = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-hub", "--state-dir", state_dir,
             "--listen", "tcp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd="/", start_new_session=True,
        )
        self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
        if not expect_ok:
            out, _ = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 1, out)
            self.assertNotIn("Traceback", out)
            return out
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = sevpn("hub", "status", "--json", "--state-dir", state_dir)
            if r.returncode == 0:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.communicate(timeout=30)
                return json.loads(r.stdout)
            if proc.poll() is not None:
                self.fail(f"the hub exited: {proc.communicate()[0][-2000:]}")
            time.sleep(0.2)
        self.fail("the hub did not answer")

    def test_the_hub_refuses_a_state_dir_others_may_write(self):
        self.add_user()
        os.chmod(os.path.join(self.hub, "hubs"), 0o777)
        out = self.start_hub(self.hub, expect_ok=False)
        self.assertIn(f"sevpn-hub: {self.hub}/hubs is writable by other users (mode 0777)", out)
        self.assertFalse(os.path.exists(os.path.join(self.hub, "ca.pem")))

    def test_the_hub_refuses_a_planted_users_file(self):
        if os.geteuid() != 0:
            raise SkipTest("planting as another user needs root")
        self.add_user()
        users = os.path.join(self.hub, "hubs", "DEFAULT", "users.json")
        os.chown(users, NOBODY, NOBODY)
        out = self.start_hub(self.hub, expect_ok=False)
        self.assertIn(f"{users} belongs to nobody, not to root who owns the state dir", out)

    def test_the_hub_says_its_users_file_is_damaged(self):
        self.add_user()
        users = os.path.join(self.hub, "hubs", "DEFAULT", "users.json")
        with open(users, "w") as f:
            f.write("{")
        out = self.start_hub(self.hub, expect_ok=False)
        self.assertIn(f"sevpn-hub: the users file {users} is damaged", out)

    def test_the_hub_refuses_a_state_dir_of_another_user(self):
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        self.add_user()
        for directory, dirs, files in os.walk(self.hub):
            for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
                os.chown(name, NOBODY, NOBODY)
        out = self.start_hub(self.hub, expect_ok=False)
        self.assertIn(f"the state dir {self.hub} belongs to nobody, but this runs as root", out)

    def test_a_dangling_control_socket_link_does_not_stop_the_hub(self):
        self.add_user()
        os.symlink(os.path.join(self.dir, "gone"), os.path.join(self.hub, "control.sock"))
        status = self.start_hub(self.hub, expect_ok=True)
        self.assertEqual(status["virtual_hubs"], ["DEFAULT"])

    def test_the_card_refuses_a_state_dir_others_may_write(self):
        """Checked before its TAP is made (in a network namespace of its own, should it get that far)."""
        if shutil.which("unshare") is None or os.geteuid() != 0:
            raise SkipTest("needs root and unshare (util-linux) for a namespace of its own")
        os.makedirs(os.path.join(self.nic, "accounts"), 0o700)
        os.chmod(os.path.join(self.nic, "accounts"), 0o777)
        r = subprocess.run(["unshare", "-n", os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic",
                            "--state-dir", self.nic, "--tap", "op0"],
                           capture_output=True, text=True, env=env(), timeout=30, cwd="/")
        self.assertEqual(r.returncode, 1, r.stdout[-2000:])
        self.assertIn(f"sevpn-nic: {self.nic}/accounts is writable by other users (mode 0777)", r.stdout + r.stderr)
        self.assertNotIn("Traceback", r.stdout + r.stderr)

    def test_the_hub_says_why_it_cannot_create_its_state_dir(self):
        out = self.start_hub(os.path.join(self.pw, "hub"), expect_ok=False)
        self.assertIn(f"sevpn-hub: {self.pw} is a file, not a directory", out)
        self.assertNotIn("[Errno", out)
