"""table_service.py: which node sends its table, and that a request the daemon
cannot answer is hung up on (the backup then falls back to conntrackd's resync)."""

import socket

import pytest

from snat_sync import namespace
from snat_sync import statedir
from snat_sync import table_service
from snat_sync.router import RouterSpec

PEERS_SPEC = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                               ["169.254.192.2"], 7)
NEUTRON_SPEC = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                                 [], 7, primary_address="169.254.0.7/24")


@pytest.fixture
def files(tmp_path):
    files = statedir.RouterFiles(tmp_path / "r1")
    statedir.ensure_directory(files.directory)
    return files


@pytest.mark.parametrize("record, expected", [
    ({"role": "primary", "outcome": "done"}, True),
    ({"role": "primary", "outcome": "failed"}, False),  # perhaps half-way
    ({"role": "backup", "outcome": "done"}, False),
    (None, False),
])
def test_without_a_primary_address_the_last_transition_decides(files, record, expected):
    if record is not None:
        statedir.write_json(files.last_transition, record)
    assert table_service.is_primary(PEERS_SPEC, files) is expected


@pytest.mark.parametrize("holds, expected", [(True, True), (False, False),
                                              (None, False)])
def test_with_a_primary_address_the_address_decides(files, monkeypatch, holds,
                                                    expected):
    statedir.write_json(files.last_transition, {"role": "primary", "outcome": "done"})
    asked = []
    monkeypatch.setattr(namespace, "holds_address",
                        lambda *arguments: asked.append(arguments) or holds)
    assert table_service.is_primary(NEUTRON_SPEC, files) is expected
    assert asked == [("qrouter-r1", "ha-1a2b3c4d-5e", NEUTRON_SPEC.primary_address)]


def test_a_request_that_cannot_be_answered_is_hung_up_on(files, monkeypatch, conf):
    def no_interface(spec):
        raise namespace.InvalidInput("HA interface", spec.ha_interface, "not found")

    monkeypatch.setattr(namespace, "ha_link", no_interface)
    ours, theirs = socket.socketpair()
    with theirs:
        with pytest.raises(namespace.InvalidInput):
            table_service.serve(conf, PEERS_SPEC, files, ours, "169.254.192.2")
        assert theirs.recv(16) == b""
    assert ours.fileno() == -1
