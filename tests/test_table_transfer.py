"""table_transfer.py without sockets in namespaces: whom a backup asks, when it
falls back to conntrackd's resync, and what a daemon that must not send answers."""

import logging
import socket
import types

import pytest

from snat_sync import failover
from snat_sync import statedir
from snat_sync import table_transfer
from snat_sync.router import RouterSpec


RESYNC = failover.REQUEST_RESYNC.arguments


class FakeDaemon:
    def __init__(self, files):
        self.files = files
        self.controls = []

    def control(self, *arguments, timeout=None):
        self.controls.append(arguments)


def transfer_options(table_transfer=True, standby_mode="warm"):
    return types.SimpleNamespace(
        failover=types.SimpleNamespace(table_transfer=table_transfer,
                                       standby_mode=standby_mode),
        conntrackd=types.SimpleNamespace(control_timeout=10),
        health=types.SimpleNamespace(base_port=4780))


def three_node_spec():
    return RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                             ["169.254.192.2", "169.254.192.3"], 7)


@pytest.fixture
def router(tmp_path):
    files = statedir.RouterFiles(tmp_path / "routers" / "r1")
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, three_node_spec().to_dict())
    return FakeDaemon(files)


def health_with(*peers):
    return {"peers": [{"address": address, "role": role} for address, role in peers]}


def test_the_reported_primary_is_asked_first_then_the_listed_peers():
    health = health_with(("169.254.192.2", "backup"), ("169.254.192.3", "primary"))
    assert table_transfer.primary_candidates(three_node_spec(), health) == (
        "169.254.192.3", "169.254.192.2")


def test_a_neutron_router_asks_the_peers_its_reports_came_from():
    spec = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                             [], 7, primary_address="169.254.0.7/24")
    health = health_with(("169.254.192.9", "backup"), ("169.254.192.4", "primary"))
    assert table_transfer.primary_candidates(spec, health) == (
        "169.254.192.4", "169.254.192.9")
    assert table_transfer.primary_candidates(spec, None) == ()


@pytest.mark.parametrize("options", [transfer_options(table_transfer=False),
                                     transfer_options(standby_mode="cold")])
def test_without_the_transfer_or_with_cold_standby_conntrackd_resyncs(
        router, options, monkeypatch):
    monkeypatch.setattr(table_transfer, "fetch", pytest.fail)
    assert table_transfer.request_table(router, options, RESYNC) is None
    assert router.controls == [("-n",)]


def test_the_first_peer_that_sends_the_whole_table_ends_the_request(router, monkeypatch):
    asked = []

    def fetch(spec, peer, port):
        asked.append((peer, port))
        if peer == "169.254.192.2":
            raise table_transfer.TransferFailed("refused: NO this node is not the primary")
        return table_transfer.TransferResult(peer, 5, 0, 0, {}, 0.1)

    monkeypatch.setattr(table_transfer, "fetch", fetch)
    result = table_transfer.request_table(router, transfer_options(), RESYNC)
    assert result.peer == "169.254.192.3"
    assert asked == [("169.254.192.2", 4787), ("169.254.192.3", 4787)]
    assert router.controls == []


def test_when_no_peer_sends_it_conntrackd_resyncs_and_the_log_says_why(
        router, no_table_server, caplog):
    caplog.set_level(logging.WARNING)
    assert table_transfer.request_table(router, transfer_options(), RESYNC) is None
    assert router.controls == [("-n",)]
    assert len(no_table_server) == 2
    assert "169.254.192.3: [Errno 111] Connection refused" in caplog.text
    assert "asking conntrackd for a resync instead" in caplog.text


def test_a_router_without_a_readable_spec_falls_back_naming_the_file(
        router, caplog, monkeypatch):
    monkeypatch.setattr(table_transfer, "fetch", pytest.fail)
    router.files.spec.write_text("{not json")
    assert table_transfer.request_table(router, transfer_options(), RESYNC) is None
    assert router.controls == [("-n",)]
    assert str(router.files.spec) in caplog.text


def test_a_transfer_result_describes_itself():
    result = table_transfer.TransferResult("169.254.192.2", 199_990, 10, 3,
                                           {"ENOMEM": 2}, 0.71)
    assert result.describe() == (
        "199990 entries created from 169.254.192.2's table in 0.71 s (10 already "
        "replicated, 3 destroyed there meanwhile and deleted, failed: 2 ENOMEM)")


@pytest.mark.parametrize("greeting, is_primary, answer", [
    (f"{table_transfer.GREETING} r1\n", False, b"NO this node is not the primary\n"),
    (f"{table_transfer.GREETING} r2\n", True, b"NO not a table request for this router\n"),
    ("GET / HTTP/1.0\n", True, b"NO not a table request for this router\n"),
])
def test_a_daemon_sends_nothing_unless_asked_for_this_router_as_its_primary(
        greeting, is_primary, answer):
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(greeting.encode())
        sent = table_transfer.serve(ours, "169.254.192.2", three_node_spec(), None,
                                    is_primary)
        assert sent is None
        assert theirs.recv(4096) == answer
        assert theirs.recv(4096) == b""  # and it hung up


def test_a_backup_that_says_nothing_is_hung_up_on(monkeypatch):
    monkeypatch.setattr(table_transfer, "IDLE_TIMEOUT", 0.05)
    ours, theirs = socket.socketpair()
    with theirs:
        assert table_transfer.serve(ours, "169.254.192.2", three_node_spec(), None,
                                    True) is None
        assert theirs.recv(4096) == b""


def test_no_primary_yet_is_logged_as_information_not_as_a_fault(router, monkeypatch,
                                                                 caplog):
    def refuse(spec, peer, port):
        raise table_transfer.TransferFailed(f"refused: NO {table_transfer.NOT_PRIMARY}")

    monkeypatch.setattr(table_transfer, "fetch", refuse)
    caplog.set_level(logging.INFO)
    table_transfer.request_table(router, transfer_options(), RESYNC)
    assert router.controls == [("-n",)]
    assert [record.levelno for record in caplog.records] == [logging.INFO]


def test_a_primary_takes_no_translated_ports_from_a_peer():
    """Two primaries for a moment (a partition): neither overwrites the other."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(f"{table_transfer.MAPPINGS_GREETING} r1\n".encode())
        assert table_transfer.serve(ours, "169.254.192.2", three_node_spec(), None,
                                    True) is None
        assert theirs.recv(4096) == f"NO {table_transfer.IS_PRIMARY}\n".encode()
        assert theirs.recv(4096) == b""


def test_a_backup_loads_the_translated_ports_and_confirms(monkeypatch):
    loaded = []

    def load(reader, namespace):
        length = table_transfer.FRAME.unpack(reader.exactly(4))[0]
        loaded.append((namespace, reader.exactly(length)))
        assert reader.exactly(4) == table_transfer.FRAME.pack(0)
        return 1, 0, 1, {}

    monkeypatch.setattr(table_transfer, "load_stream", load)
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(f"{table_transfer.MAPPINGS_GREETING} r1\n".encode()
                       + table_transfer.FRAME.pack(3) + b"abc"
                       + table_transfer.FRAME.pack(0))
        assert table_transfer.serve(ours, "169.254.192.2", three_node_spec(), None,
                                    False) == 1
        assert theirs.recv(4096) == b"OK\nDONE\n"
    assert loaded == [("qrouter-r1", b"abc")]
