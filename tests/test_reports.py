"""Health reports between the nodes' daemons: only well-formed reports from peers."""

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snat_sync import reports

ROUTER = "router-1"
PEERS = (ipaddress.ip_address("169.254.192.2"),)


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
