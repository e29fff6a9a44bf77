"""Health reports between the nodes' daemons: only well-formed reports from peers."""

import errno
import ipaddress
import json
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snat_sync import reports
from snat_sync.router import RouterSpec

ROUTER = "router-1"
PEERS = reports.Audience(peers=(ipaddress.ip_address("169.254.192.2"),))


def valid(**changes):
    message = {"v": 1, "router": ROUTER, "role": "primary", "changed": 100.5,
               "internal": 20000, "external": 0, "kernel": 20010, "sent": 200.25}
    message.update(changes)
    return json.dumps(message).encode()


def test_a_report_round_trips():
    data = reports.encode_report(ROUTER, "backup", 100.5, 3, 20000, None, 200.25)
    report = reports.decode_report(data, "169.254.192.2", ROUTER, PEERS, 201.0)
    assert report == reports.PeerReport("169.254.192.2", "backup", 100.5, 3, 20000,
                                        None, 200.25, 201.0, 200.25, None)
    assert len(data) < reports.MAX_REPORT_SIZE


def test_a_report_carries_when_its_figures_were_taken_and_null_caches():
    """conntrackd too busy to answer: the kernel count goes out alone, with the
    time it was read; the receiver learns how old the figures were when sent."""
    data = reports.encode_report(ROUTER, "primary", None, None, None, 1000000,
                                 200.25, taken=199.5, standby="warm")
    report = reports.decode_report(data, "169.254.192.2", ROUTER, PEERS, 201.0)
    assert (report.internal, report.external, report.kernel) == (None, None, 1000000)
    assert (report.taken, report.standby) == (199.5, "warm")
    assert report.figures_age == pytest.approx(0.75)
    assert json.loads(data)["v"] == 2
    assert len(data) < reports.MAX_REPORT_SIZE


def test_a_version_1_report_is_still_accepted():
    """A peer not upgraded yet: its figures count as taken when sent."""
    report = reports.decode_report(valid(), "169.254.192.2", ROUTER, PEERS, 201.0)
    assert report.internal == 20000 and report.kernel == 20010
    assert (report.taken, report.standby, report.figures_age) == (200.25, None, 0.0)


def test_version_2_needs_its_taken_time():
    assert reports.decode_report(valid(v=2), "169.254.192.2", ROUTER, PEERS,
                                 1.0) is None
    assert reports.decode_report(valid(v=2, taken=200.0), "169.254.192.2", ROUTER,
                                 PEERS, 1.0) is not None


@pytest.mark.parametrize("data, source", [
    (valid(), "169.254.192.9"),                  # not a peer of this router
    (valid(), "not an address"),
    (valid(router="router-2"), "169.254.192.2"),  # another router's report
    (valid(v=3), "169.254.192.2"),
    (valid(v=True), "169.254.192.2"),
    (valid(internal=None), "169.254.192.2"),  # version 1 always had the caches
    (valid(v=2, taken=200.0, internal="5"), "169.254.192.2"),
    (valid(v=2, taken="then"), "169.254.192.2"),
    (valid(v=2, taken=200.0, standby="hot"), "169.254.192.2"),
    (valid(role="leader"), "169.254.192.2"),
    (valid(internal=-1), "169.254.192.2"),
    (valid(internal=True), "169.254.192.2"),
    (valid(internal="5"), "169.254.192.2"),
    (valid(external=2**41), "169.254.192.2"),
    (valid(kernel=1.5), "169.254.192.2"),
    (valid(sent="now"), "169.254.192.2"),
    (b'{"v": 1, "sent": NaN}', "169.254.192.2"),
    (valid(changed=float("inf")), "169.254.192.2"),
    (b"[1, 2]", "169.254.192.2"),
    (b"\xff\xfe", "169.254.192.2"),
    (b"[" * 100000, "169.254.192.2"),
    (valid(padding="x" * 2000), "169.254.192.2"),
])
def test_anything_but_a_valid_report_from_a_peer_is_dropped(data, source):
    assert reports.decode_report(data, source, ROUTER, PEERS, 1.0) is None


@given(st.binary(max_size=2048))
def test_no_datagram_makes_decoding_fail(data):
    result = reports.decode_report(data, "169.254.192.2", ROUTER, PEERS, 1.0)
    assert result is None or isinstance(result, reports.PeerReport)


def test_the_report_port_follows_the_vrid():
    assert reports.report_port(4780, 7) == 4787


def spec(peers=(), local="169.254.192.1", primary="169.254.0.7/24"):
    return RouterSpec.create(ROUTER, "qrouter-1", "ha-1", local, list(peers), 7,
                             primary)


HA_NETWORK = ipaddress.ip_network("169.254.192.0/18")
GROUPS = ("225.0.0.50", "ff12::3780")


def test_a_router_with_peers_reports_to_them_and_believes_only_them():
    audience = reports.audience_for(spec(["169.254.192.2", "169.254.192.3"]),
                                    HA_NETWORK, *GROUPS)
    assert not audience.learned
    assert audience.destinations == (ipaddress.ip_address("169.254.192.2"),
                                     ipaddress.ip_address("169.254.192.3"))
    assert audience.accepts(ipaddress.ip_address("169.254.192.3"))
    assert not audience.accepts(ipaddress.ip_address("169.254.192.4"))


def test_a_router_without_peers_reports_to_its_familys_multicast_group():
    audience = reports.audience_for(spec(), HA_NETWORK, *GROUPS)
    assert audience.learned
    assert audience.destinations == (ipaddress.ip_address("225.0.0.50"),)
    v6 = reports.audience_for(spec(local="fd00:a::1", primary="fd00:b::7/64"),
                              ipaddress.ip_network("fd00:a::/64"), *GROUPS)
    assert v6.destinations == (ipaddress.ip_address("ff12::3780"),)


@pytest.mark.parametrize("source, accepted", [
    ("169.254.192.2", True),        # another agent's HA port
    ("169.254.255.254", True),      # anywhere on the HA network
    ("169.254.192.1", False),       # our own (multicast looped back)
    ("169.254.0.7", False),         # the primary address
    ("169.254.64.2", False),        # outside the HA network
    ("10.0.0.2", False),
    ("fd00:a::2", False),           # the other family
])
def test_without_peers_a_report_is_believed_from_the_ha_network_but_not_ourselves(
        source, accepted):
    audience = reports.audience_for(spec(), HA_NETWORK, *GROUPS)
    data = reports.encode_report(ROUTER, "backup", None, 1, 2, 3, 200.0)
    report = reports.decode_report(data, source, ROUTER, audience, 201.0)
    assert (report is not None) is accepted


def test_without_peers_another_routers_report_on_the_group_is_dropped():
    audience = reports.audience_for(spec(), HA_NETWORK, *GROUPS)
    data = reports.encode_report("router-2", "backup", None, 1, 2, 3, 200.0)
    assert reports.decode_report(data, "169.254.192.2", ROUTER, audience,
                                 201.0) is None


def heard(address, received):
    return reports.PeerReport(address, "backup", None, 1, 0, 1, received - 0.1,
                              received, received - 0.1, "warm")


def test_learned_peers_are_those_heard_and_a_long_silent_one_is_forgotten():
    kept = {"169.254.192.2": heard("169.254.192.2", 1000.0),
            "169.254.192.3": heard("169.254.192.3", 990.0)}
    # peer_timeout 10: silent for 10 s counts as silent (repair.assess) but is
    # kept, and so counted; forgotten after 6 timeouts.
    now = 1000.0 + reports.FORGET_AFTER_TIMEOUTS * 10.0
    current = reports.current_reports(kept, (), now, 10.0)
    assert set(current) == {"169.254.192.2"}
    assert reports.expected_peers((), current) == (
        ipaddress.ip_address("169.254.192.2"),)
    assert reports.expected_peers((), reports.current_reports(kept, (), 1005.0,
                                                              10.0)) == (
        ipaddress.ip_address("169.254.192.2"), ipaddress.ip_address("169.254.192.3"))


def test_listed_peers_stay_expected_and_their_reports_are_kept():
    listed = (ipaddress.ip_address("169.254.192.2"),)
    kept = {"169.254.192.2": heard("169.254.192.2", 0.0)}
    assert reports.current_reports(kept, listed, 1e6, 10.0) == kept
    assert reports.expected_peers(listed, {}) == listed


def test_no_more_learned_peers_are_kept_than_the_cap():
    many = {f"169.254.193.{n}": heard(f"169.254.193.{n}", 1000.0 + n)
            for n in range(1, 41)}
    current = reports.current_reports(many, (), 1041.0, 10.0)
    assert len(current) == reports.MAX_LEARNED_PEERS
    assert "169.254.193.40" in current and "169.254.193.1" not in current


class RefusingSocket:
    """A report socket whose every send fails with one errno."""

    def __init__(self, number):
        self.number = number
        self.tried = []

    def sendto(self, payload, destination):
        self.tried.append(destination)
        raise OSError(self.number, os.strerror(self.number))


def refusing_channel(number):
    channel = object.__new__(reports.ReportChannel)
    channel.audience = reports.audience_for(
        spec(["169.254.192.2", "169.254.192.3"]), HA_NETWORK, *GROUPS)
    channel.family, channel.port = socket.AF_INET, 4781
    channel.socket = RefusingSocket(number)
    return channel


def test_a_firewall_dropping_the_report_does_not_fail_the_check():
    """Found by the soak: with the HA link cut by iptables in the namespace,
    sendto fails with EPERM, and the whole health check of the partitioned node
    failed ("health check failed: [Errno 1] Operation not permitted") for as
    long as the partition lasted."""
    channel = refusing_channel(errno.EPERM)
    channel.send(b"report")
    assert channel.socket.tried == [("169.254.192.2", 4781), ("169.254.192.3", 4781)]


def test_a_broken_report_socket_still_fails_the_check():
    with pytest.raises(OSError):
        refusing_channel(errno.EBADF).send(b"report")
