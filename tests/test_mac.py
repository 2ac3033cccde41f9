"""The card's own virtual MAC: random, unicast, locally administered, kept."""

import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from sevpn.mac import InvalidMAC, format_mac, generate_mac, load_or_create_mac, parse_mac


class Generation(SynchronousTestCase):
    def test_unicast_locally_administered(self):
        for _ in range(2000):
            m = generate_mac()
            self.assertEqual(m[0] & 0x01, 0, format_mac(m))
            self.assertEqual(m[0] & 0x02, 0x02, format_mac(m))
            self.assertEqual(len(m), 6)

    def test_no_collisions_over_many_draws(self):
        draws = {generate_mac() for _ in range(100000)}
        self.assertEqual(len(draws), 100000)

    def test_bits_forced_whatever_the_source(self):
        self.assertEqual(generate_mac(lambda n: b"\xff" * n)[0], 0xFE)
        self.assertEqual(generate_mac(lambda n: b"\x00" * n), b"\x02\x00\x00\x00\x00\x01")


class Parsing(SynchronousTestCase):
    def test_roundtrip(self):
        self.assertEqual(format_mac(parse_mac("02:AB:cd:00:11:22")), "02:ab:cd:00:11:22")
        self.assertEqual(parse_mac("02-ab-cd-00-11-22"), bytes.fromhex("02abcd001122"))

    def test_refused(self):
        for bad in ("01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "02:00:00:00:00",
                    "zz:00:00:00:00:00", "0200.0000.0001", "02:00-00:00:00:01", ""):
            self.assertRaises(InvalidMAC, parse_mac, bad)

    def test_messages_say_why(self):
        self.assertIn("multicast", str(self.assertRaises(InvalidMAC, parse_mac, "01:00:00:00:00:01")))


class Persistence(SynchronousTestCase):
    def test_same_mac_after_restart(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        first = load_or_create_mac(d)
        self.assertEqual(load_or_create_mac(d), first)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "mac")).st_mode), 0o644)
