"""
Defaults, defined once: what a hub or a card does when nobody says
otherwise.  Options, services, the C{sevpn} command and the docs take
them from here.
"""

#: Where the state dirs of a machine's hub and cards are.
STATE_ROOT = "/var/lib/sevpn"
#: Where a hub keeps its CA, certificates, virtual hubs and users.
HUB_STATE_DIR = "/var/lib/sevpn/hub"
#: Where the cards of a machine keep their MACs and accounts: one state dir
#: per TAP device, C{/var/lib/sevpn/nic-TAP} (L{card_state_dir}), as the
#: systemd unit C{sevpn-nic@TAP} has it.
CARD_STATE_ROOT = "/var/lib/sevpn"


def card_state_dir(tap: str) -> str:
    """The state dir of the card whose TAP device is C{tap}."""
    return f"{CARD_STATE_ROOT}/nic-{tap}"

#: The hub's TCP port, and the port a card dials when an address has none.
PORT = 5555
#: What a hub listens on: IPv6 and IPv4 on one dual-stack socket (where the
#: host has no IPv6, or keeps IPv6 sockets IPv6-only, the hub says so and
#: listens on IPv4 too; see L{sevpn.hubservice.listen_descriptions}).
LISTEN = ("tcp6:5555",)
#: The TAP device a card creates.
TAP_NAME = "sevpn0"
#: The default card's state dir.
CARD_STATE_DIR = card_state_dir(TAP_NAME)
#: How long a session whose link broke without a goodbye is kept, on both
#: ends (SoftEther's "about 60 seconds").
RESUME_WINDOW = 60.0
#: A card must finish TLS and its hello, and the hub must answer it, within
#: this: a connection that has not logged in holds little for long.
HANDSHAKE_TIMEOUT = 10.0
#: At most this many sessions per hub (``--max-sessions``), connected or
#: held: an idle session costs the hub ~30 KiB, so 16,384 stay within ~500 MiB.
MAX_SESSIONS = 16384
#: At most this many sessions per user of a virtual hub, connected or held
#: (SoftEther's multiple-logins policy); a user's own policy may say otherwise.
MAX_SESSIONS_PER_USER = 4
#: What the send logs of all a hub's sessions may hold together.
RESUME_MEMORY = 256 * 1024 * 1024
#: Seconds before an unused MAC table entry is forgotten.
MAC_AGE = 300.0
#: Bytes of frames held per session and direction for resumption.  During
#: an outage the TCP flows inside the tunnel stop at their window (a few
#: MiB each), so this holds a 60-second outage of a busy card.
RESUME_BUFFER = 64 * 1024 * 1024
#: The virtual hub that always exists, and that cards join by default.
VIRTUAL_HUB = "DEFAULT"

# -- users shared between hub nodes (PostgreSQL, sevpn.pgusers) ---------------
#: A hub waits this long for the user database to answer (connecting
#: included; libpq connects in whole seconds, at least 2).
USERS_TIMEOUT = 2.0
#: After the user database failed to answer, logins use the node's copy of
#: the users without asking it again for this long.
USERS_RETRY = 5.0
#: A hub checks the user database for changes this often (and at once when
#: the database notifies it of one).
USERS_POLL = 10.0
#: While the user database does not answer, a user in the node's copy
#: still logs in if the copy was checked against the database at most this
#: long ago; users the copy does not hold are refused.
USERS_GRACE = 3600.0
