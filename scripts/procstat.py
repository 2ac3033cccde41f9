"""
What a process has cost the machine, read from /proc: CPU time (user +
system, all threads) and context switches, for the benchmarks' "why"
columns and the idle-cost measurement.
"""

from __future__ import annotations

import os
import subprocess
from typing import Dict, Optional

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid}, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        # the command name (field 2) may hold spaces: split after its ")"
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of C{pid}'s threads so far (wakeups, roughly)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return total


def find_pid(namespace: str, needle: bytes) -> Optional[int]:
    """The process in network namespace C{namespace} whose command line holds C{needle}."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    return int(pid)
        except FileNotFoundError:
            continue
    return None


def snapshot(pids: Dict[str, int]) -> Dict[str, float]:
    """CPU seconds per named process; a process that has gone reads as NaN."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            out[name] = float("nan")
    return out
