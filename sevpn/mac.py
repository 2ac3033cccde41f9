"""
Ethernet MAC addresses: parsing, formatting, and the card's own virtual MAC.

Every card has a MAC of its own that must not collide with another
computer's.  L{generate_mac} draws 46 random bits from the OS's strong
source and marks the address unicast and locally administered (the
IEEE-reserved space for addresses no vendor hands out).
"""

from __future__ import annotations

import os
import re
from typing import Callable

from sevpn.files import StateError, read_private, write_private

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")

BROADCAST = b"\xff" * 6


class InvalidMAC(ValueError):
    """A MAC address a card cannot use; the message says why."""


def format_mac(mac: bytes) -> str:
    """C{mac} as six lower-case hex bytes with colons, the form Linux tools print."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """
    Parse a unicast MAC for a card, refusing what would break the segment.
    """
    text = text.strip()
    if not _MAC_RE.fullmatch(text):
        raise InvalidMAC(f"{text!r} is not a MAC address (expected six hex bytes like 02:00:5e:10:00:01)")
    mac = bytes(int(part, 16) for part in re.split("[:-]", text))
    if mac[0] & 1:
        raise InvalidMAC(f"{text} is a multicast or broadcast address, a card needs a unicast one")
    if mac == b"\x00" * 6:
        raise InvalidMAC("00:00:00:00:00:00 is not a usable MAC address")
    return mac


def generate_mac(randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """A random unicast, locally administered MAC."""
    mac = bytearray(randbytes(6))
    mac[0] = (mac[0] & 0xFC) | 0x02
    if mac[1:] == b"\x00" * 5:  # keep clear of the all-zero host part
        mac[5] = 1
    return bytes(mac)


def load_or_create_mac(state_dir: str) -> bytes:
    """
    The card's MAC, kept in C{state_dir/mac} so that it survives restarts.
    """
    path = os.path.join(state_dir, "mac")
    data = read_private(path, "MAC")
    if data is None:
        mac = generate_mac()
        write_private(path, (format_mac(mac) + "\n").encode(), mode=0o644)
        return mac
    try:
        return parse_mac(data.decode("ascii", "replace"))
    except InvalidMAC as e:
        raise StateError(f"the card's MAC file {path} is damaged ({e}): remove it to get a new MAC, or pass --mac")
