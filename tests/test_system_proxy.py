"""
Cards behind real proxies, in namespaces: one reaches its hub through an
HTTP CONNECT proxy (tinyproxy, with Basic credentials), one through a
SOCKS5 proxy (dante); both connect, carry traffic, and resume after their
connection is cut, TLS and the certificate check end to end.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SkipTest

from scripts.netns import transfer, transfer_result, wait_for
from tests.test_system import SystemTestCase

TINYPROXY = """User nobody
Group nogroup
Port 3128
Listen 127.0.0.1
Timeout 600
Allow 127.0.0.1
ConnectPort 5555
BasicAuth carol s3cret
DisableViaHeader Yes
"""

DANTED = """logoutput: stderr
internal: 127.0.0.1 port = 1080
external: eth0
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }
"""


def _program(name: str) -> str:
    for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise SkipTest(f"{name} is not installed (apt-get install {'dante-server' if name == 'danted' else name})")


class CardsBehindProxies(SystemTestCase):
    @classmethod
    def start(cls, topo):
        tinyproxy, danted = _program("tinyproxy"), _program("danted")
        for name, text in (("tinyproxy.conf", TINYPROXY), ("danted.conf", DANTED)):
            with open(os.path.join(topo.dir, name), "w") as f:
                f.write(text)
        os.chmod(topo.dir, 0o755)  # tinyproxy reads its config as nobody
        topo.spawn(topo.host(1), "tinyproxy", tinyproxy, "-d", "-c", os.path.join(topo.dir, "tinyproxy.conf"))
        topo.spawn(topo.host(2), "danted", danted, "-f", os.path.join(topo.dir, "danted.conf"),
                   "-p", os.path.join(topo.dir, "danted.pid"))
        for i, port in ((1, 3128), (2, 1080)):
            wait_for(lambda i=i, port=port: f":{port}" in topo.run(topo.host(i), "ss", "-ltn"), 20,
                     f"the proxy on host {i}")
        topo.add_user("u1")
        topo.add_user("u2")
        topo.start_hub()
        topo.start_card(1, extra=("--proxy", "http://carol:s3cret@127.0.0.1:3128"))
        topo.start_card(2, extra=("--proxy", "socks5://127.0.0.1:1080"))
        for i in (1, 2):
            topo.wait_connected(i)

    def test_a_connected_through_the_proxies(self):
        topo = self.topo
        topo.ping(1, 2)
        # the hub sees the proxies' connections, not the cards'
        peers = {s["user"]: s["peer"] for s in topo.hub_sessions()}
        self.assertTrue(peers["u1"].startswith(topo.host_addr(1)), peers)
        self.assertIn("through the proxy http://carol@127.0.0.1:3128", topo.log("card1"))
        self.assertNotIn("s3cret", topo.log("card1"))

    def test_b_resumed_after_a_cut(self):
        topo = self.topo
        run = transfer(topo, 1, 2, 20, rate=4 << 20)
        time.sleep(1.5)
        for i, port in ((1, 3128), (2, 1080)):
            # the card's connection to its proxy, and the proxy's to the hub
            topo.run(topo.host(i), "ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port), check=False)
            topo.run(topo.hub_ns, "ss", "-K", "dst", topo.host_addr(i), check=False)
        for i in (1, 2):
            wait_for(lambda i=i: topo.card_status(i)["resumes"] >= 1, 30, f"card {i} to resume")
        result, expected = transfer_result(topo, *run)
        self.assertIsNone(result["error"])
        self.assertEqual(result["sha256"], expected)
        for i in (1, 2):
            status = topo.card_status(i)
            self.assertEqual((status["state"], status["frames_dropped"]), ("connected", 0))
        topo.ping(2, 1)

