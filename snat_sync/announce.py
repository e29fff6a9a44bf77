"""Gratuitous ARPs and unsolicited neighbour advertisements for the primary's
addresses: the thin edge that makes the switches and the neighbours find the router
on this node again.

keepalived sends them when it becomes primary, and again when, as primary, it hears
an advert of lower priority. After a partition of the HA link both nodes are
primary for a while; when it heals, the node of lower priority yields as soon as it
hears the other's advert, and if it hears it first, the survivor never hears one
of lower priority and sends nothing. The switches still forward the router ports'
MAC (Neutron's HA ports carry the same MAC on every node) to the node that yielded
and now drops what it gets: a black hole until the switch or a neighbour's ARP
entry runs out (about 13 s in the lab). The survivor's repair
(repair.SURVIVOR_RESYNC) announces its addresses again.

Every global address of every port is announced: IPv4 by a gratuitous ARP (iputils
arping), IPv6 by an unsolicited neighbour advertisement
(snat_sync.neighbour_advertisement), so an IPv6-only port is announced too.
`announcements` is pure; `send` runs the senders inside the namespace.
"""

import dataclasses
import ipaddress
import pathlib
import subprocess
import sys

from snat_sync import namespace as netns
from snat_sync import neighbour_advertisement
from snat_sync.errors import SnatSyncError

ARPING = "arping"
# The advertisement sender is this package's module, started by the interpreter
# running us, so it must find this package whether installed or not.
ENVIRONMENT = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
LOOPBACK = "lo"
TIMEOUT = 5  # arping sends at once and exits a second later


class AnnounceError(SnatSyncError):
    pass


@dataclasses.dataclass(frozen=True)
class Announcement:
    device: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    @property
    def sender(self):
        """What sends it, as its errors name it."""
        return ARPING if self.address.version == 4 else "neighbour advertisement"

    def command(self):
        """IPv4: one unsolicited ARP (-U: an ARP request for the address from the
        address), no reply awaited; arping exits a second after it sent it.
        IPv6: one unsolicited neighbour advertisement, sent by this package."""
        if self.address.version == 4:
            return [ARPING, "-q", "-U", "-c", "1", "-I", self.device,
                    str(self.address)]
        return [sys.executable, "-m", neighbour_advertisement.__name__, self.device,
                str(self.address)]


def announcements(addresses):
    """What to announce, from the namespace's addresses [(device, address, scope)]:
    every global address, loopback's aside, once per device and address."""
    chosen = []
    for device, address, scope in addresses:
        address = ipaddress.ip_address(address)
        if device == LOOPBACK or scope != "global":
            continue
        announcement = Announcement(device, address)
        if announcement not in chosen:
            chosen.append(announcement)
    return tuple(chosen)


def send(namespace, chosen, timeout):
    """Send every announcement at once; AnnounceError naming those that failed.

    The senders run side by side: each arping waits a second after its ARP before
    it exits, so one after another would hold the router's lock a second an
    address.
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
            failures.append(f"{announcement.address} on {announcement.device}: "
                            f"{announcement.sender} did not finish within "
                            f"{timeout} s")
            continue
        if process.returncode != 0:
            failures.append(f"{announcement.address} on {announcement.device}: "
                            + (error.strip() or f"{announcement.sender} exit "
                               f"status {process.returncode}"))
    if failures:
        raise AnnounceError(f"announcing addresses in namespace {namespace}: "
                            + "; ".join(failures))


def announce_addresses(namespace, timeout=TIMEOUT):
    """Announce every global address of the namespace; the announcements sent."""
    chosen = announcements(netns.addresses(namespace))
    send(namespace, chosen, timeout)
    return chosen
