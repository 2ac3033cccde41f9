"""
What the hub's and the card's services share: the reactor they run on,
and how a fatal error reaches the user.
"""

from __future__ import annotations

from twisted.logger import Logger


def reactor_or_global(reactor):
    """C{reactor}, or the global one when none was given."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def fatal(what: str, message: str) -> SystemExit:
    """An error a user must fix: one sentence on stderr, exit status 1."""
    Logger().critical("{message}", message=message)
    return SystemExit(f"{what}: {message}")
