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
                                        None, 200.25, 201.0)
    assert len(data) < reports.MAX_REPORT_SIZE


@pytest.mark.parametrize("data, source", [
    (valid(), "169.254.192.9"),                  # not a peer of this router
    (valid(), "not an address"),
    (valid(router="router-2"), "169.254.192.2"),  # another router's report
    (valid(v=2), "169.254.192.2"),
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
