"""The daemon's table transfer (table_transfer.py) between two real router
namespaces over their HA network: r1 serves its kernel table as the primary, r2
loads it into its own kernel, as a warm backup's resync does.

What r2 holds afterwards is r1's table, entry for entry, SNAT mappings, marks and
TCP states included; entries conntrackd would not replicate (the HA network's
own) stay behind; an entry r2 already holds (replicated meanwhile) is kept;
entries r1 destroys while the transfer runs are deleted on r2 at its end. A
daemon that is not the primary sends nothing, and r2's table stays as it was.
"""

import contextlib
import ipaddress
import re
import select
import threading
import time

from snat_sync import ctnetlink
from snat_sync import mapping_sync
from snat_sync import options
from snat_sync import table_service
from snat_sync import table_transfer
from snat_sync.lab import topology as lab_module
from snat_sync.router import RouterSpec

IDLE_ENTRIES = 20_000
ALREADY_REPLICATED = 1_000  # the first idle entries, on r2 before the transfer
# Enough that r1's sender blocks on the TCP stream while r2 waits, in the middle
# of its dump (about 250 bytes an entry; the stream holds a few MB).
LARGE_TABLE = 100_000
PORT = 4781
HA_FLOW = lab_module.SnatEntry("udp", "169.254.192.1", 3780, 3780,
                               server_address="169.254.192.2", server_port=3780)
MARKED_CLIENT = "10.200.0.9"
DESTROYED_CLIENT = "10.200.0.7"
CTA_STATUS, IPS_SRC_NAT, IPS_DST_NAT = 3, 0x10, 0x20
IDLE_NETWORK = ipaddress.ip_network(lab_module.IDLE_CLIENT_NETWORK)
# A listing line without its timeout, which runs on.
TIMEOUT = re.compile(r"^(\S+\s+\d+\s+)\d+\s")


def spec_of(lab, router):
    return RouterSpec.create(lab.router_id, router.namespace, router.ha.device,
                             router.ha_address, [router.peer_ha_address], lab.vrid)


def listing(router, *filters):
    lines = lab_module.run(["conntrack", "-L", *filters],
                           namespace=router.namespace).stdout.splitlines()
    return sorted(TIMEOUT.sub(r"\1", line) for line in lines if line[:1].isalpha())


def mark(router, client, value):
    """Give the client's entries the mark. conntrack -U walks the table as it
    updates it and now and then gives up with EPROTO: then again, for the rest."""
    for _ in range(5):
        if not lab_module.run(["conntrack", "-U", "-s", client, "-m", str(value)],
                              namespace=router.namespace, check=False).returncode:
            return
    raise AssertionError(f"{router.name}: conntrack -U -s {client} kept failing")


def nat_status(router):
    """{original tuple: the entry's IPS_SRC_NAT and IPS_DST_NAT bits} of the idle
    entries (lab_module.idle_entry), from a dump:
    what decides whether the kernel translates the entry's packets, and what no
    listing shows (an entry without them lists the same)."""
    netlink = table_transfer.netlink_socket(router.namespace)
    found = {}
    try:
        netlink.send(ctnetlink.dump_request())
        while True:
            chunk = netlink.recv(1 << 20)
            for offset, length, kind, _flags in ctnetlink.split_messages(chunk):
                if kind == ctnetlink.NLMSG_DONE:
                    return found
                attributes = ctnetlink._attributes(chunk, offset + 20, offset + length)
                low, high = attributes[CTA_STATUS]
                original = ctnetlink.endpoints(chunk, *attributes[ctnetlink.CTA_TUPLE_ORIG])
                if ipaddress.ip_address(original.source) not in IDLE_NETWORK:
                    continue
                found[original] = int.from_bytes(chunk[low:high], "big") & (
                    IPS_SRC_NAT | IPS_DST_NAT)
    finally:
        netlink.close()


class ListeningDaemon:
    """A router's daemon for one request on its table listener, on a thread:
    listen, accept, answer (table_transfer.serve) as the primary or not."""

    def __init__(self, lab, router, is_primary):
        self.spec = spec_of(lab, router)
        self.selection = table_service.selection_for(options.SYNCED_PROTOCOLS,
                                                     self.spec)
        self.listener = table_transfer.TableListener(self.spec, PORT)
        self.is_primary = is_primary
        self.answered = "never asked"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        ready, _, _ = select.select([self.listener], [], [], 10)
        accepted = self.listener.accept() if ready else None
        if accepted is not None:
            connection, peer = accepted
            self.answered = table_transfer.serve(connection, peer, self.spec,
                                                 self.selection, self.is_primary)

    def finish(self):
        """What serve returned: entries sent, or taken."""
        self.thread.join(15)
        self.listener.close()
        assert not self.thread.is_alive(), f"{self.spec.namespace} still answering"
        return self.answered


def primary_daemon(lab, is_primary=True):
    """r1's daemon, asked for its table."""
    return ListeningDaemon(lab, lab.routers[0], is_primary)


def test_the_backup_loads_the_primarys_table_as_it_is(lab):
    r1, r2 = lab.routers[:2]
    assert lab_module.load_idle_entries(r1, IDLE_ENTRIES, lab.workdir) == IDLE_ENTRIES
    lab_module.insert_entry(r1, HA_FLOW)
    assert lab_module.load_idle_entries(r2, ALREADY_REPLICATED, lab.workdir) == (
        ALREADY_REPLICATED)
    for router in (r1, r2):  # r2's replicated copies are r1's entries as they are
        mark(router, MARKED_CLIENT, 7)
    primary = primary_daemon(lab)
    try:
        result = table_transfer.fetch(spec_of(lab, r2), r1.ha_address, PORT)
    finally:
        sent = primary.finish()

    assert sent == IDLE_ENTRIES
    assert (result.created, result.already_present, result.deleted, result.failed) == (
        IDLE_ENTRIES - ALREADY_REPLICATED, ALREADY_REPLICATED, 0, {})
    idle = ("-s", lab_module.IDLE_CLIENT_NETWORK)
    assert listing(r2, *idle) == listing(r1, *idle)
    primary_nat, backup_nat = nat_status(r1), nat_status(r2)
    assert len(backup_nat) == IDLE_ENTRIES
    assert set(backup_nat.values()) == {IPS_SRC_NAT}
    assert backup_nat == {entry: primary_nat[entry] for entry in backup_nat}
    marked = listing(r2, "-s", MARKED_CLIENT, "-m", "7")
    assert len(marked) == IDLE_ENTRIES // lab_module.IDLE_CLIENTS
    assert not [line for line in listing(r2) if HA_FLOW.matches_original(line)]


def test_entries_destroyed_during_the_transfer_are_deleted_on_the_backup(lab):
    r1, r2 = lab.routers[:2]
    # An entry reports its end only if it was created while someone listened for
    # events (nf_conntrack_events' default, 2), as the primary's conntrackd always
    # does; none runs here.
    lab_module.sysctl(r1.namespace, "net.netfilter.nf_conntrack_events=1")
    assert lab_module.load_idle_entries(r1, LARGE_TABLE, lab.workdir) == LARGE_TABLE
    destroyed = listing(r1, "-s", DESTROYED_CLIENT)
    primary = primary_daemon(lab)
    try:
        with table_transfer.open_stream(spec_of(lab, r2), r1.ha_address,
                                        PORT) as stream:
            time.sleep(0.5)  # r1 has filled the stream and waits in its dump
            lab_module.run(["conntrack", "-D", "-s", DESTROYED_CLIENT],
                           namespace=r1.namespace)
            created, present, deleted, failed = table_transfer.load_stream(
                stream, r2.namespace)
    finally:
        sent = primary.finish()

    # Some were dumped before they were destroyed: sent, then deleted again.
    assert 0 < deleted <= len(destroyed) == LARGE_TABLE // lab_module.IDLE_CLIENTS
    assert (created, present, failed) == (sent, 0, {})
    assert sent < LARGE_TABLE
    assert listing(r2, "-s", DESTROYED_CLIENT) == []
    idle = ("-s", lab_module.IDLE_CLIENT_NETWORK)
    assert listing(r2, *idle) == listing(r1, *idle)
    assert lab_module.idle_entry_count(r2) == LARGE_TABLE - len(destroyed)


def test_a_daemon_that_is_not_the_primary_sends_nothing(lab):
    r1, r2 = lab.routers[:2]
    assert lab_module.load_idle_entries(r1, 100, lab.workdir) == 100
    primary = primary_daemon(lab, is_primary=False)
    try:
        try:
            table_transfer.fetch(spec_of(lab, r2), r1.ha_address, PORT)
        except table_transfer.TransferFailed as error:
            refusal = str(error)
        else:
            refusal = None
    finally:
        sent = primary.finish()
    assert refusal == "refused: NO this node is not the primary"
    assert sent is None
    assert lab_module.idle_entry_count(r2) == 0


# -- translated ports conntrackd does not carry (mapping_sync.py) -------------------

PING_CLIENT, PING_SERVER = "10.200.1.5", lab_module.SERVER_ADDRESS
CTA_TIMEOUT = 7
# The ICMP id (or a port) as conntrack lists the reply direction.
REPLY_ID = re.compile(r"type=0 code=0 id=(\d+)")


def create_entry(router, protocol, client_port, public_port, server_port=0):
    """Create an entry source-NAT'ed to the gateway in the router's kernel, as the
    kernel makes one: ICMP echo (ports are identifiers) or a TCP flow, its client
    port (ICMP: identifier) translated to public_port. The creation raises the
    new-entry event a real flow would."""
    def one_tuple(kind, source, destination, source_port, destination_port, icmp_type):
        if protocol == 1:
            ports = [ctnetlink.attribute(ctnetlink.CTA_PROTO_ICMP_ID,
                                         source_port.to_bytes(2, "big")),
                     ctnetlink.attribute(5, bytes([icmp_type])),
                     ctnetlink.attribute(6, b"\0")]
        else:
            ports = [ctnetlink.attribute(ctnetlink.CTA_PROTO_SRC_PORT,
                                         source_port.to_bytes(2, "big")),
                     ctnetlink.attribute(ctnetlink.CTA_PROTO_DST_PORT,
                                         destination_port.to_bytes(2, "big"))]
        return ctnetlink.nested(kind, ctnetlink.nested(
            ctnetlink.CTA_TUPLE_IP,
            ctnetlink.attribute(ctnetlink.CTA_IP_V4_SRC, ipaddress.ip_address(source).packed),
            ctnetlink.attribute(ctnetlink.CTA_IP_V4_DST,
                                ipaddress.ip_address(destination).packed)),
            ctnetlink.nested(ctnetlink.CTA_TUPLE_PROTO,
                             ctnetlink.attribute(ctnetlink.CTA_PROTO_NUM, bytes([protocol])),
                             *ports))

    reply_port = client_port if protocol == 1 else server_port
    payload = (b"\x02\0\0\0"
               + one_tuple(ctnetlink.CTA_TUPLE_ORIG, PING_CLIENT, PING_SERVER,
                           client_port, server_port, 8)
               + one_tuple(ctnetlink.CTA_TUPLE_REPLY, PING_SERVER, PING_CLIENT,
                           reply_port, client_port, 0)
               + ctnetlink.attribute(CTA_TIMEOUT, (120).to_bytes(4, "big"))
               + ctnetlink.nat_attribute(
                   ctnetlink.CTA_NAT_SRC,
                   ipaddress.ip_address(lab_module.GATEWAY_ADDRESS).packed,
                   public_port.to_bytes(2, "big")))
    netlink = table_transfer.netlink_socket(router.namespace)
    try:
        netlink.send(ctnetlink.message(ctnetlink.CT_NEW,
                                       ctnetlink.CREATE_FLAGS | 0x4, payload))  # ACK
        assert ctnetlink.errors(netlink.recv(4096)) == []
    finally:
        netlink.close()


@contextlib.contextmanager
def mapping_listener(router, selection):
    """The router's daemon's new-entry event socket (mapping_sync), closed after."""
    listener = mapping_sync.MappingListener(router.namespace, selection, ["all"])
    try:
        yield listener
    finally:
        listener.close()


def read_soon(listener):
    """What the listener reports once the events of what was just created are in."""
    time.sleep(0.2)
    return listener.read()


def ping_reply_ids(router):
    """{echo identifier: the identifier replies come to} of the client's pings."""
    found = {}
    for line in listing(router, "-p", "icmp", "-s", PING_CLIENT):
        original, reply = re.findall(r"id=(\d+)", line)[:2]
        found[int(original)] = int(reply)
    return found


def test_a_remapped_ping_replaces_the_backups_copy_with_the_primarys_mapping(lab):
    """r1 remaps identifier 77 to 1077 (another client pings with 77 too); r2
    holds the copy conntrackd's injection leaves, mapped to 555. r1's listener
    reports that entry alone (not an unremapped ping, nor a TCP flow whose
    translated port conntrackd carries: the kernel does not even wake the
    listener for it), and r2 ends up with r1's mapping."""
    r1, r2 = lab.routers[:2]
    spec = spec_of(lab, r1)
    selection = table_service.selection_for(options.SYNCED_PROTOCOLS, spec)
    with mapping_listener(r1, selection) as listener:
        create_entry(r1, 6, 5555, 40001, server_port=443)
        # The kernel's filter keeps TCP's event off the socket: nothing to read.
        assert select.select([listener], [], [], 0.2)[0] == []
        create_entry(r2, 1, 77, 555)
        create_entry(r1, 1, 77, 1077)
        create_entry(r1, 1, 78, 78)
        reads = read_soon(listener)
    assert len(reads) == 1
    replacements = mapping_sync.current_corrections(r1.namespace, reads, selection)
    assert len(replacements) == 1
    backup = ListeningDaemon(lab, r2, is_primary=False)
    try:
        mapping_sync.send(spec, r2.ha_address, PORT, replacements)
    finally:
        taken = backup.finish()
    assert taken == 1
    assert ping_reply_ids(r1) == {77: 1077, 78: 78}
    assert ping_reply_ids(r2) == {77: 1077}
    assert listing(r2, "-p", "icmp") == listing(r1, "-p", "icmp", "--icmp-id", "77")


def test_an_entry_that_ended_before_the_send_is_not_sent(lab):
    r1 = lab.routers[0]
    selection = table_service.selection_for(options.SYNCED_PROTOCOLS, spec_of(lab, r1))
    with mapping_listener(r1, selection) as listener:
        create_entry(r1, 1, 77, 1077)
        reads = read_soon(listener)
    assert len(reads) == 1
    lab_module.run(["conntrack", "-D", "-p", "icmp", "-s", PING_CLIENT],
                   namespace=r1.namespace)
    assert mapping_sync.current_corrections(r1.namespace, reads, selection) == []


def test_the_table_transfer_carries_a_remapped_ping_identifier(lab):
    r1, r2 = lab.routers[:2]
    create_entry(r1, 1, 77, 1077)
    primary = primary_daemon(lab)
    try:
        result = table_transfer.fetch(spec_of(lab, r2), r1.ha_address, PORT)
    finally:
        primary.finish()
    assert result.created >= 1 and result.failed == {}
    assert ping_reply_ids(r2) == {77: 1077}
