"""
The commands C{sevpn-hub} and C{sevpn-nic}: C{twistd --nodaemon --pidfile=
sevpn-hub ARGS...} (and C{sevpn-nic}), run in this process, so that systemd
units and people need not know about twistd.

Every argument belongs to the plugin; twistd's own options (C{--logfile},
C{--reactor}, ...) stay reachable through C{twistd -n sevpn-hub ...}.  The
process stays in the foreground (systemd, a terminal or a supervisor holds
it) and writes no pid file: nothing would read it, and under
C{ProtectSystem=strict} there is nowhere to write one.

The plugin is imported directly instead of being looked up with
L{twisted.plugin.getPlugins}, which scans every plugin and rewrites
C{dropin.cache} next to them: a read-only installation would warn about
that at each start.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from twisted.python import usage
from twisted.scripts import twistd

#: What every launch puts before the plugin's name.
TWISTD_ARGS = ("--nodaemon", "--pidfile=")


class LaunchOptions(twistd.ServerOptions):
    """
    twistd's options with one sub-command: the plugin this command runs.
    Its usage reads C{Usage: sevpn-hub [options]}: a sub-command's synopsis
    is the parent's, the sub-command's name and its own.
    """

    synopsis = "Usage:"

    def __init__(self, maker) -> None:
        super().__init__()
        self.maker = maker

    @property
    def subCommands(self):
        maker = self.maker
        self.loadedPlugins = {maker.tapname: maker}
        yield (maker.tapname, None, lambda: maker.options(), maker.description)


def launch(maker, argv: Sequence[str]) -> None:
    """
    Run the twistd plugin C{maker} with C{argv} as its options, in the
    foreground, until it stops.

    @raise SystemExit: a sentence naming the bad option, for a usage error
        (exit status 1, no traceback); twistd's exit status otherwise.
    """
    command = maker.tapname
    options = LaunchOptions(maker)
    try:
        options.parseOptions([*TWISTD_ARGS, command, *argv])
    except usage.UsageError as e:
        raise SystemExit(f"{command}: {e} (see {command} --help)")
    twistd.runApp(options)


def hub(argv: Optional[Sequence[str]] = None) -> None:
    """The C{sevpn-hub} command."""
    from twisted.plugins.sevpn_plugins import hub as maker

    launch(maker, sys.argv[1:] if argv is None else argv)


def nic(argv: Optional[Sequence[str]] = None) -> None:
    """The C{sevpn-nic} command."""
    from twisted.plugins.sevpn_plugins import nic as maker

    launch(maker, sys.argv[1:] if argv is None else argv)
