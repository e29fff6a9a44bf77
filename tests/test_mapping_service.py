"""mapping_service.py and mapping_sync.py without namespaces: where the listener
runs, when the entries it reports are sent and to whom, and what a sender does
that is not the primary."""

import struct

import pytest
from test_ctnetlink import echo_entry, entry_with_sequence_shift, expectation_event
from test_ctnetlink import snat_entry

from snat_sync import ctnetlink
from snat_sync import mapping_service
from snat_sync import namespace
from snat_sync import mapping_sync
from snat_sync import table_service
from snat_sync import tracking
from snat_sync import statedir
from snat_sync.router import RouterSpec

SPEC = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                         ["169.254.192.2"], 7)


class FakeListener:
    selection = "the selection"

    def __init__(self, batches):
        self.batches = list(batches)
        self.unread = 0

    def read(self, wanted=True):
        batch = self.batches.pop(0)
        if wanted:
            return batch
        self.unread += len(batch)
        return []

    def fileno(self):
        return 99

    def close(self):
        pass


@pytest.fixture
def service(conf):
    submitted = []
    service = mapping_service.MappingService(
        conf, None, lambda *job: submitted.append(job))
    service.submitted = submitted
    return service


@pytest.fixture
def tracked(tmp_path):
    files = statedir.RouterFiles(tmp_path / "r1")
    tracked = tracking.Tracked(SPEC, files)
    return tracked


def test_protocols_followed_are_those_whose_port_conntrackd_drops():
    assert mapping_sync.protocols_to_follow(["TCP", "UDP", "ICMP", "SCTP"]) == {1, 132}
    assert mapping_sync.protocols_to_follow(["TCP", "UDP"]) == frozenset()


@pytest.mark.parametrize("overrides", [
    [("standby_mode", "cold", "failover")],
    [("table_transfer", False, "failover")],
    [("protocols", ["TCP", "UDP"], "conntrackd"),
     ("expectation_helpers", [], "conntrackd")],
])
def test_no_listener_where_no_backup_could_take_the_mappings(
        make_conf, tracked, monkeypatch, overrides):
    conf = make_conf()
    for name, value, group in overrides:
        conf.set_override(name, value, group)
    opened = []
    monkeypatch.setattr(mapping_service.namespace_sockets, "open_registered",
                        lambda *arguments: opened.append(arguments))
    monkeypatch.setattr(namespace, "namespace_inode", lambda name: 1)
    mapping_service.MappingService(conf, None, None).ensure("r1", tracked, SPEC)
    assert opened == [] and tracked.mapping_listener is None


@pytest.mark.parametrize("helper, helpers, chosen", [
    ("sip", ["all"], True), ("sip-5061", ["sip"], True), ("sip", ["ftp"], False),
    ("sip", [], False), (None, ["all"], False),
])
def test_expectations_follow_the_helpers_conntrackd_syncs(helper, helpers, chosen):
    assert mapping_sync.helper_chosen(helper, helpers) is chosen


def test_with_the_defaults_the_listener_is_opened(conf, tracked, monkeypatch):
    opened = []
    monkeypatch.setattr(mapping_service.namespace_sockets, "open_registered",
                        lambda *arguments: opened.append(arguments) or "listener")
    monkeypatch.setattr(namespace, "namespace_inode", lambda name: 1)
    mapping_service.MappingService(conf, None, None).ensure("r1", tracked, SPEC)
    assert [arguments[1:3] for arguments in opened] == [("mapping", "r1")]
    assert (tracked.mapping_listener, tracked.mapping_namespace) == ("listener", 1)


def test_a_backups_events_are_drained_unread(service, tracked, monkeypatch):
    monkeypatch.setattr(table_service, "became_primary", lambda files: False)
    tracked.mapping_listener = FakeListener([[b"read-a"]])
    service.on_event("r1", tracked)
    assert tracked.mapping_listener.unread == 1
    assert tracked.mapping_sends == []


def test_each_entry_is_sent_at_once_and_again_later(service, tracked, conf,
                                                    monkeypatch):
    monkeypatch.setattr(table_service, "became_primary", lambda files: True)
    tracked.mapping_listener = FakeListener([[b"read-a", b"read-b"], []])
    service.on_event("r1", tracked)
    service.on_event("r1", tracked)  # nothing new
    now = tracked.mapping_sends[0][0]
    service.send_due("r1", tracked, now)
    job = ("(mappings) r1", "mappings sent", mapping_service.send_to_peers, SPEC,
           tracked.files, ("169.254.192.2",), conf.health.base_port + 7,
           "the selection", [b"read-a", b"read-b"])
    assert service.submitted == [job]
    service.send_due("r1", tracked, now + mapping_sync.RESEND_AFTER - 0.1)
    assert service.submitted == [job]
    service.send_due("r1", tracked, now + mapping_sync.RESEND_AFTER)
    assert service.submitted == [job, job]
    service.send_due("r1", tracked, now + 1000)
    assert service.submitted == [job, job]


def test_peers_are_the_listed_ones_then_the_learned_ones():
    assert mapping_service.peers_of(SPEC, {"169.254.192.3": None,
                                           "169.254.192.2": None}) == (
        "169.254.192.2", "169.254.192.3")


def test_a_node_that_is_not_the_primary_sends_nothing(tracked, monkeypatch):
    monkeypatch.setattr(table_service, "is_primary", lambda spec, files: False)
    monkeypatch.setattr(mapping_sync, "current_corrections",
                        lambda *arguments: pytest.fail("read the table"))
    assert mapping_service.send_to_peers(SPEC, tracked.files, ("169.254.192.2",),
                                         4787, None, [b"read"]) == 0


def test_a_peer_that_refuses_is_logged_and_the_others_still_get_them(
        tracked, monkeypatch, caplog):
    monkeypatch.setattr(table_service, "is_primary", lambda spec, files: True)
    monkeypatch.setattr(mapping_sync, "current_corrections",
                        lambda namespace, reads, selection: [b"replace"])
    sent = []

    def send(spec, peer, port, requests):
        if peer == "169.254.192.2":
            raise mapping_sync.table_transfer.TransferFailed("refused: NO this node "
                                                             "is the primary")
        sent.append((peer, port, requests))

    monkeypatch.setattr(mapping_sync, "send", send)
    assert mapping_service.send_to_peers(
        SPEC, tracked.files, ("169.254.192.2", "169.254.192.3"), 4787, None,
        [b"read"]) == 1
    assert sent == [("169.254.192.3", 4787, [b"replace"])]
    assert "wrongly not sent to 169.254.192.2: refused" in caplog.text


# -- what an event calls for, and what a backup is sent (mapping_sync) --------------

SELECTION = ctnetlink.Selection.of(["TCP", "UDP", "ICMP", "SCTP"], ["127.0.0.0/8"])


def answer(message):
    """A message as the kernel's answer to a read (no NLM_F_MULTI)."""
    return message[:6] + b"\0\0" + message[8:]


def test_a_remapped_ping_is_read_again_and_an_unremapped_one_is_not():
    remapped, plain = echo_entry(77, 1077), echo_entry(78, 78)
    assert mapping_sync.reads_for_event(remapped, 0, len(remapped), ctnetlink.CT_NEW,
                                        SELECTION, ["all"]) == [
        ctnetlink.get_request(remapped, 0, len(remapped))]
    assert mapping_sync.reads_for_event(plain, 0, len(plain), ctnetlink.CT_NEW,
                                        SELECTION, ["all"]) == []


def test_an_expectation_calls_for_its_master_then_itself_if_its_helper_is_synced():
    event = expectation_event(b"ftp", 0)
    assert mapping_sync.reads_for_event(event, 0, len(event), ctnetlink.EXP_NEW,
                                        SELECTION, ["all"]) == [
        ctnetlink.master_get_request(event, 0, len(event)),
        ctnetlink.expectation_get_request(event, 0, len(event))]
    assert mapping_sync.reads_for_event(event, 0, len(event), ctnetlink.EXP_NEW,
                                        SELECTION, ["sip"]) == []


def test_the_backup_gets_replacements_and_sequence_shifts_and_nothing_else():
    remapped = answer(echo_entry(77, 1077))
    master = answer(entry_with_sequence_shift())
    unshifted = answer(snat_entry())
    expectation = answer(expectation_event())

    def correction(data):
        kind = struct.unpack_from("=H", data, 4)[0]
        return mapping_sync.correction_for(data, 0, len(data), kind, SELECTION)

    assert ctnetlink.check_requests(correction(remapped)) == (1, 1)
    assert correction(master) == ctnetlink.sequence_update_request(master, 0,
                                                                   len(master))
    assert correction(unshifted) is None
    assert ctnetlink.check_requests(correction(expectation)) == (1, 1)
    ended = ctnetlink.message(ctnetlink.NLMSG_ERROR, 0, struct.pack("=i", -2) + b"\0" * 16)
    assert correction(ended) is None
