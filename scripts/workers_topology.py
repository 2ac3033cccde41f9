"""
Test hosts for C{--workers}: a topology whose card hosts have addresses
the hub's BPF program hands to chosen workers (L{sevpn.reuseport.worker_for},
the function the kernel agrees with), so a test or benchmark decides
which cards share a worker and which meet only through the node's bridge.
"""

from __future__ import annotations

import json
from typing import Dict

from scripts.netns import Topology, sevpn, wait_for
from sevpn.reuseport import worker_for


class PlacedTopology(Topology):
    """
    L{Topology} with card host I{i}'s address picked so that its card
    lands on worker C{placement[i]} of C{workers}.
    """

    prefix = "wk"

    def __init__(self, hosts: int, workers: int, placement: Dict[int, int]) -> None:
        self.workers = workers
        self.placement = dict(placement)
        super().__init__(hosts)

    def host_addr(self, i: int) -> str:
        for last in range(2, 255):
            address = f"10.{self.subnet}.{i}.{last}"
            if i not in self.placement or worker_for(address, self.workers) == self.placement[i]:
                return address
        raise ValueError(f"no address of 10.{self.subnet}.{i}.0/24 goes to worker {self.placement[i]}")

    def mac(self, i: int) -> str:
        """The MAC of card host C{i}'s TAP."""
        return json.loads(self.run(self.host(i), "ip", "-j", "link", "show", "sv0"))[0]["address"]

    def hub_status(self) -> dict:
        return json.loads(sevpn("hub", "status", "--json", "--state-dir", self.hub_state).stdout)

    def start_workers(self, *extra: str) -> None:
        """The hub with C{--workers}, once every worker runs."""
        self.start_hub("--workers", str(self.workers), *extra)
        if self.workers > 1:
            wait_for(lambda: [w["state"] for w in self.hub_status().get("workers", [])] == ["running"] * self.workers,
                     30, f"{self.workers} workers (hub log: {self.log('hub')[-2000:]})")
