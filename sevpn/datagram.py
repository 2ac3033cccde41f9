"""
The UDP channel's datagrams: sealing, opening, and what fits in one.

Pure code: no reactor, no sockets.  A datagram is::

    channel_id:u64  counter:u64  AEAD(plaintext)

The 16-byte header is the associated data; the nonce is four zero bytes
and the counter.  The AEAD is AES-256-GCM from C{cryptography} (measured
beside ChaCha20-Poly1305 on the bench machine, see docs/udp.md).  Keys
are per TCP link and per direction, taken from that link's TLS session
(RFC 5705 exporter, L{sevpn.tls.keying_material}); nothing here makes up
crypto of its own.

A counter is never used twice with one key: L{Sealer} counts from 1 and
refuses to go past the last counter.  AES-GCM should not seal much more
than 2^28 full-size datagrams under one key, so every L{EPOCH} datagrams
(2^24) the key changes: the key of epoch I{e} > 0 is exported with the
channel id and I{e} as the context (epoch 0 uses the channel id alone).
Both ends derive an epoch's key from the counter they see, so nothing is
negotiated and nothing can get out of step.

L{Opener} checks what arrives: the right channel, a counter inside the
replay window (a sliding bitmap, L{WINDOW} wide, as in WireGuard and
IPsec), then the tag; only an authentic datagram moves the window.  What
fails is dropped and counted by reason, never raised.
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEADER = struct.Struct("!QQ")
HEADER_SIZE = HEADER.size
TAG_SIZE = 16
#: What sealing adds to a plaintext.
OVERHEAD = HEADER_SIZE + TAG_SIZE
#: Replay window: counters this far behind the newest are still taken once.
WINDOW = 2048
#: Datagrams sealed under one key (2^24) before the next epoch's key.
EPOCH = 1 << 24
#: The largest counter: a sealer stops there.
MAX_COUNTER = (1 << 64) - 1
#: The exporter label (RFC 5705) of the channel's keys.
LABEL = b"EXPORTER-sevpn-udp-v1"
KEY_SIZE = 32
#: The largest UDP payload (IPv4: 65535 - 20 - 8).
MAX_UDP_PAYLOAD = 65507
#: Bytes of IP and UDP header for each family: a datagram must fit the
#: path MTU with them.
IP_UDP_HEADER = {4: 28, 6: 48}
#: The underlay MTU assumed (Ethernet, the common internet path).
PATH_MTU = 1500

_U64 = struct.Struct("!Q")
_LEN = struct.Struct("!I")

#: C{derive(epoch) -> (card_to_hub_key, hub_to_card_key)}.
Derive = Callable[[int], Tuple[bytes, bytes]]


def context(channel_id: int, epoch: int) -> bytes:
    """The exporter context of an epoch's keys."""
    ctx = _U64.pack(channel_id)
    return ctx if epoch == 0 else ctx + struct.pack("!I", epoch)


def split_keys(material: bytes) -> Tuple[bytes, bytes]:
    """Exported bytes as the two keys: card to hub, hub to card."""
    if len(material) != 2 * KEY_SIZE:
        raise ValueError(f"{len(material)} bytes of keying material, not {2 * KEY_SIZE}")
    return material[:KEY_SIZE], material[KEY_SIZE:]


def channel_of(datagram) -> Optional[int]:
    """The channel id a datagram names, or None if it is too short to be one."""
    if len(datagram) < OVERHEAD:
        return None
    return _U64.unpack_from(datagram)[0]


def room(family: int, mtu: int = PATH_MTU) -> int:
    """The plaintext bytes one datagram carries without IP fragmentation."""
    return mtu - IP_UDP_HEADER[family] - OVERHEAD


#: The buffer datagrams are sealed into, shared by every sealer of the
#: process: the reactor runs one call at a time, and a sealed datagram is
#: sent before the next is sealed.
_scratch = bytearray(OVERHEAD + MAX_UDP_PAYLOAD)


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + _U64.pack(counter)


class _Keys:
    """One direction's AEADs by epoch, made when first needed (at most two kept)."""

    def __init__(self, derive: Derive, direction: int) -> None:
        self.derive = derive
        self.direction = direction
        self._aeads: Dict[int, AESGCM] = {}

    def aead(self, epoch: int) -> AESGCM:
        aead = self._aeads.get(epoch)
        if aead is None:
            aead = self._aeads[epoch] = AESGCM(self.derive(epoch)[self.direction])
            for old in [e for e in self._aeads if e < epoch - 1]:
                del self._aeads[old]
        return aead


class KeysUnavailable(Exception):
    """An epoch's keys cannot be derived (the TLS session is gone)."""


class SealerExhausted(Exception):
    """The channel sealed its last counter: it must not seal again."""


class Sealer:
    """
    Seals plaintexts for one direction of one channel, each under a new
    counter.

    @param derive: the epoch keys (see L{Derive}).
    @param direction: 0 to seal card to hub, 1 hub to card.
    """

    def __init__(self, channel_id: int, derive: Derive, direction: int, epoch_size: int = EPOCH) -> None:
        self.channel_id = channel_id
        self.epoch_size = epoch_size
        self._keys = _Keys(derive, direction)
        #: The last counter used.
        self.counter = 0

    def seal(self, plaintext) -> memoryview:
        """
        The datagram for C{plaintext}: a view of a buffer all sealers
        reuse, valid until the next call (send it at once).  Raises
        L{SealerExhausted} past the last counter (or without the next
        epoch's key), and ValueError for a
        plaintext larger than a UDP datagram can carry.
        """
        if len(plaintext) > MAX_UDP_PAYLOAD - OVERHEAD:
            raise ValueError(f"a plaintext of {len(plaintext)} bytes does not fit a datagram")
        counter = self.counter + 1
        if counter > MAX_COUNTER:
            raise SealerExhausted("the channel used its last counter")
        try:
            aead = self._keys.aead(counter // self.epoch_size)
        except KeysUnavailable as e:
            raise SealerExhausted(str(e))
        self.counter = counter
        buf = _scratch
        HEADER.pack_into(buf, 0, self.channel_id, counter)
        end = HEADER_SIZE + len(plaintext) + TAG_SIZE
        view = memoryview(buf)
        aead.encrypt_into(_nonce(counter), plaintext, view[:HEADER_SIZE], view[HEADER_SIZE:end])
        return view[:end]


class Opener:
    """
    Opens one direction's datagrams of one channel: authenticates them and
    takes each counter at most once.  Counts what it drops: C{bad} (not
    authentic: wrong channel, too short, a bad tag), C{replayed} (a counter
    already taken), C{too_old} (behind the window).
    """

    def __init__(self, channel_id: int, derive: Derive, direction: int, epoch_size: int = EPOCH,
                 window: int = WINDOW) -> None:
        if epoch_size < window:
            raise ValueError("an epoch must be at least as long as the replay window")
        self.channel_id = channel_id
        self.epoch_size = epoch_size
        self.window = window
        self._keys = _Keys(derive, direction)
        #: The newest counter taken (0: none yet) and the bitmap behind it
        #: (bit i set: counter newest - i was taken).
        self.newest = 0
        self._seen = 0
        self._mask = (1 << window) - 1
        self.opened = 0
        self.bad = 0
        self.replayed = 0
        self.too_old = 0

    def open(self, datagram) -> Optional[bytes]:
        """The plaintext of an authentic, new datagram; else None (counted)."""
        if len(datagram) < OVERHEAD:
            self.bad += 1
            return None
        channel_id, counter = HEADER.unpack_from(datagram)
        if channel_id != self.channel_id or counter == 0:
            self.bad += 1
            return None
        newest = self.newest
        if counter <= newest:
            behind = newest - counter
            if behind >= self.window:
                self.too_old += 1
                return None
            if self._seen >> behind & 1:
                self.replayed += 1
                return None
        epoch = counter // self.epoch_size
        if epoch > newest // self.epoch_size + 1:
            # An honest sender cannot skip an epoch (2^24 datagrams lost in
            # a row); refusing it spares a key derivation for every forgery.
            self.bad += 1
            return None
        view = memoryview(datagram)
        try:
            plaintext = self._keys.aead(epoch).decrypt(_nonce(counter), view[HEADER_SIZE:], view[:HEADER_SIZE])
        except (InvalidTag, KeysUnavailable):
            self.bad += 1
            return None
        if counter > newest:
            shift = counter - newest
            self._seen = ((self._seen << shift) | 1) & self._mask if shift < self.window else 1
            self.newest = counter
        else:
            self._seen |= 1 << (newest - counter)
        self.opened += 1
        return plaintext


def data_runs(payload, limit: int) -> List[Tuple[int, int, int]]:
    """
    Cut a DATA payload (C{len:u32 frame} records, as L{sevpn.wire.encode_frames}
    makes them) into runs of whole records of at most C{limit} bytes each;
    a record larger than C{limit} makes a run of its own.  Returns
    C{(index of the run's first frame, start, stop)} per run.  The payload
    is the sender's own, so it is not validated here.
    """
    runs = []
    unpack = _LEN.unpack_from
    end = len(payload)
    pos = start = 0
    index = count = 0
    while pos < end:
        size = unpack(payload, pos)[0] + 4
        if count and pos + size - start > limit:
            runs.append((index, start, pos))
            index += count
            start, count = pos, 0
        pos += size
        count += 1
    if count:
        runs.append((index, start, pos))
    return runs
