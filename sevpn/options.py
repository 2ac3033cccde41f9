"""
What C{twistd sevpn-hub} and C{twistd sevpn-nic} share on their command
lines: the resume window and buffer, the keepalive.  Each role's own
options and service making live in its C{tap} module (L{sevpn.hubtap},
L{sevpn.nictap}), as in C{twisted.names.tap}.
"""

from __future__ import annotations

from typing import Callable

from twisted.python import usage

from sevpn import busypoll, defaults
from sevpn.timing import KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Keepalive


def non_negative(kind: Callable, option: str) -> Callable:
    """An option coercer: C{kind(text)}, refusing other text and negative numbers with a sentence naming C{--option}."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{option} must be {what}, not {text!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"--{option} must be a finite number, not {text!r}")
        if value < 0:
            raise ValueError(f"--{option} must not be negative, not {text}")
        return value

    convert.coerceDoc = "Must not be negative."
    return convert


class CommonOptions(usage.Options):
    """Options both roles take."""

    optParameters = [
        ["resume-window", None, defaults.RESUME_WINDOW,
         "Seconds a broken session is held for resumption (0: never).", non_negative(float, "resume-window")],
        ["resume-buffer", None, defaults.RESUME_BUFFER >> 20,
         "MiB of frames held per session and direction for resumption.", non_negative(int, "resume-buffer")],
        ["keepalive-min", None, KEEPALIVE_INTERVAL[0], "Least seconds of silence before a NULL packet.",
         non_negative(float, "keepalive-min")],
        ["keepalive-max", None, KEEPALIVE_INTERVAL[1], "Most seconds of silence before a NULL packet.",
         non_negative(float, "keepalive-max")],
        ["keepalive-timeout", None, KEEPALIVE_TIMEOUT, "Seconds without a word from the peer before it is gone.",
         non_negative(float, "keepalive-timeout")],
        ["busy-poll", None, int(busypoll.WINDOW * 1e6),
         "Microseconds to stay awake after traffic, so a reply finds the process hot (0: sleep at once).",
         non_negative(int, "busy-poll")],
    ]

    def postOptions(self) -> None:
        try:
            self["keepalive"] = Keepalive(
                (self["keepalive-min"], self["keepalive-max"]), timeout=self["keepalive-timeout"]
            )
        except ValueError as e:
            raise usage.UsageError(str(e))
        self["resume-buffer-bytes"] = self["resume-buffer"] * 1024 * 1024
