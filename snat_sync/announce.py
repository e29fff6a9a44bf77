"""Gratuitous ARPs for the primary's IPv4 addresses: the thin edge that makes the
switches and the neighbours find the router on this node again.

keepalived sends them when it becomes primary, and again when, as primary, it hears
an advert of lower priority. After a partition of the HA link both nodes are
primary for a while; when it heals, the node of lower priority yields as soon as it
hears the other's advert, and if it hears it first, the survivor never hears one
of lower priority and sends nothing. The switches still forward the router ports'
MAC (Neutron's HA ports carry the same MAC on every node) to the node that yielded
and now drops what it gets: a black hole until the switch or a neighbour's ARP
entry runs out (about 13 s in the lab). The survivor's repair
(repair.SURVIVOR_RESYNC) announces its addresses again.

Only IPv4: the ARPs leave from every port with an IPv4 address, and with the MACs
shared that is what the switches learn from; an IPv6-only port is not announced.
`announcements` is pure; `send` runs arping (iputils) inside the namespace.
"""

import dataclasses
import ipaddress
import subprocess

from snat_sync import namespace as netns
from snat_sync.errors import SnatSyncError

ARPING = "arping"
ENVIRONMENT = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
LOOPBACK = "lo"
TIMEOUT = 5  # arping sends at once and exits a second later


class AnnounceError(SnatSyncError):
    pass


@dataclasses.dataclass(frozen=True)
class Announcement:
    device: str
    address: ipaddress.IPv4Address

    def command(self):
        """One unsolicited ARP (-U: an ARP request for the address from the
        address), no reply awaited; arping exits a second after it sent it."""
        return [ARPING, "-q", "-U", "-c", "1", "-I", self.device, str(self.address)]


def announcements(addresses):
    """What to announce, from the namespace's addresses [(device, address, scope)]:
    every global IPv4 address, loopback's aside, once per device."""
    chosen = []
    for device, address, scope in addresses:
        address = ipaddress.ip_address(address)
        if device == LOOPBACK or scope != "global" or address.version != 4:
            continue
        announcement = Announcement(device, address)
        if announcement not in chosen:
            chosen.append(announcement)
    return tuple(chosen)


def send(namespace, chosen, timeout):
    """Send every announcement at once; AnnounceError naming those that failed.

    The arpings run side by side: each waits a second after its ARP before it
    exits, so one after another would hold the router's lock a second an address.
    """
    started = []
    failures = []
    for announcement in chosen:
        argv = netns.command_inside(namespace, *announcement.command())
        try:
            started.append((announcement, subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env=ENVIRONMENT)))
        except OSError as failure:
            failures.append(f"cannot run {argv[0]}: {failure}")
            break
    for announcement, process in started:
        try:
            _, error = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failures.append(f"{announcement.address} on {announcement.device}: arping "
                            f"did not finish within {timeout} s")
            continue
        if process.returncode != 0:
            failures.append(f"{announcement.address} on {announcement.device}: "
                            + (error.strip() or f"arping exit status "
                               f"{process.returncode}"))
    if failures:
        raise AnnounceError(f"gratuitous ARP in namespace {namespace}: "
                            + "; ".join(failures))


def announce_addresses(namespace, timeout=TIMEOUT):
    """Announce every IPv4 address of the namespace; the announcements sent."""
    chosen = announcements(netns.addresses(namespace))
    send(namespace, chosen, timeout)
    return chosen
