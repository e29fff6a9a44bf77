"""The daemon's report channels: a multicast one follows its HA interface."""

import ipaddress
import selectors

from snat_sync import namespace
from snat_sync import peer_channels
from snat_sync import reports
from snat_sync.errors import InvalidInput
from snat_sync.router import RouterSpec
from snat_sync.tracking import Tracked

NETWORK = ipaddress.ip_network("169.254.192.0/18")


class FakeChannel:
    def __init__(self, spec, port, audience, ifindex=None):
        self.spec, self.port, self.audience = spec, port, audience
        self.ifindex = ifindex
        self.closed = False

    def fileno(self):
        return 0

    def close(self):
        self.closed = True


class FakeSelector:
    def __init__(self):
        self.registered = []

    def register(self, fd, events, data):
        self.registered.append(data)

    def unregister(self, fd):
        pass


def neutron_spec():
    return RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                             [], 7, "169.254.0.7/24")


def opened(conf, monkeypatch, spec, links):
    """A channel opened through PeerChannels.ensure; links: the HA interface's
    index at each netlink read (None: the interface is gone)."""
    reads = iter(links)

    def ha_link(spec):
        index = next(reads)
        if index is None:
            raise InvalidInput("HA interface", spec.ha_interface, "no such interface")
        return namespace.HaLink(index, NETWORK)

    monkeypatch.setattr(namespace, "namespace_inode", lambda name: 4026532000)
    monkeypatch.setattr(namespace, "ha_link", ha_link)
    monkeypatch.setattr(reports, "ReportChannel", FakeChannel)
    channels = peer_channels.PeerChannels(conf, FakeSelector())
    tracked = Tracked(spec, None)
    channels.ensure("r1", tracked, spec)
    return channels, tracked


def test_a_router_without_peers_gets_a_multicast_channel_on_its_ha_interface(
        conf, monkeypatch):
    _channels, tracked = opened(conf, monkeypatch, neutron_spec(), [5])
    assert tracked.channel.audience.group == ipaddress.ip_address("225.0.0.50")
    assert tracked.channel.audience.network == NETWORK
    assert (tracked.channel.ifindex, tracked.channel.port) == (5, 4787)


def test_a_multicast_channel_is_reopened_when_its_interface_is_re_created(
        conf, monkeypatch):
    channels, tracked = opened(conf, monkeypatch, neutron_spec(), [5, 5, 9, 9])
    first = tracked.channel
    channels.ensure("r1", tracked, tracked.spec)  # same interface: kept
    assert tracked.channel is first
    channels.ensure("r1", tracked, tracked.spec)  # index 9 now: reopened on it
    assert first.closed and tracked.channel.ifindex == 9


def test_a_multicast_channel_whose_interface_is_gone_is_closed(conf, monkeypatch):
    channels, tracked = opened(conf, monkeypatch, neutron_spec(), [5, None, None])
    first = tracked.channel
    channels.ensure("r1", tracked, tracked.spec)
    assert first.closed and tracked.channel is None


def test_a_unicast_channel_reads_no_interface(conf, spec, monkeypatch):
    _channels, tracked = opened(conf, monkeypatch, spec, [])  # any read fails
    assert tracked.channel.audience.peers == spec.peer_addresses
    assert tracked.channel.ifindex is None
