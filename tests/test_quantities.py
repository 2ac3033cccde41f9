"""Quantities in text output, and the rates an operator types."""

from twisted.trial.unittest import SynchronousTestCase

from sevpn.quantities import format_duration, format_rate, format_size, parse_rate


class Units(SynchronousTestCase):
    def test_durations(self):
        cases = {0: "0s", 0.4: "0s", 42.6: "43s", 60: "1m", 303: "5m 3s", 3600: "1h", 11520: "3h 12m",
                 86400: "1d", 187200: "2d 4h", None: "-"}
        for seconds, text in cases.items():
            self.assertEqual(format_duration(seconds), text, seconds)

    def test_sizes(self):
        cases = {0: "0 B", 512: "512 B", 1536: "1.5 KiB", 12 * 2**20: "12 MiB", int(3.2 * 2**30): "3.2 GiB",
                 None: "-"}
        for size, text in cases.items():
            self.assertEqual(format_size(size), text, size)

    def test_rates(self):
        self.assertEqual(format_rate(10_000_000), "10 Mbit/s")
        self.assertEqual(format_rate(500_000), "500 kbit/s")
        self.assertEqual(format_rate(1_500_000_000), "1.5 Gbit/s")
        self.assertEqual(format_rate(0), "-")

    def test_parse_rate(self):
        cases = {"1500": 1500, "500k": 500_000, "10M": 10_000_000, "10m": 10_000_000, "1.5G": 1_500_000_000,
                 "10Mbit/s": 10_000_000, " 2 k ": 2000, "0": 0}
        for text, bits in cases.items():
            self.assertEqual(parse_rate(text), bits, text)

    def test_parse_rate_refuses_with_a_sentence(self):
        for text in ("10X", "", "-5M", "M", "1e6", "2T", "0.5"):
            with self.assertRaises(ValueError) as caught:
                parse_rate(text)
            self.assertIn(repr(text), str(caught.exception))
