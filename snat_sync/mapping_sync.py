"""Mapping sync: what conntrackd 1.4.7 replicates wrongly, sent by the primary's
daemon to its backups' daemons, as the primary's kernel holds it.

- Translated ports of protocols other than TCP and UDP: conntrackd's sync
  messages carry a NAT'ed entry's translated port for those two only
  (ctnetlink.NAT_PORTS_REPLICATED). A ping session whose ICMP identifier source
  NAT changed (two inside hosts pinging with the same identifier through one
  address), or an SCTP association whose port it changed, is injected on the
  backup with whatever mapping the backup's kernel picks; after a failover its
  packets leave with an identifier or port the far end has never seen.
- Expectations: conntrackd injects every expectation in class 0, while a SIP
  call's media expectations are of the helper's audio class (the backup's
  kernel keeps one expectation of class 0 per call: one of the call's four),
  and an active-mode FTP data connection did not get through its copy of the
  expectation on the new primary (measured; the primary's version works).
- Sequence adjustments: the ftp helper's rewrite of PORT with SNAT changes the
  segment's length, so the kernel shifts the control connection's sequence
  numbers from then on, and raises no event for it; a copy without the shift
  forwards the next segments unshifted, and the session stalls.

The primary's daemon listens for new-entry events of the protocols concerned
only, and for new expectations (a BPF filter on the event socket,
ctnetlink.event_filter: TCP and UDP never wake it). It notes each entry whose
port or identifier was translated, and each expectation of the helpers
[conntrackd] expectation_helpers names together with its master entry. It then
sends each backup's daemon these as its kernel holds them at the time of
sending (read again by their tuple: state moves on, and what ended is not
sent): an entry or expectation as a delete and a create
(ctnetlink.replace_requests), a master as an update of its sequence adjustment
(ctnetlink.sequence_update_request), over the table listener's stream
(table_transfer.py). Each is sent twice, at once and again RESEND_AFTER later:
the backup's conntrackd replaces what exists when its own copy of the event
arrives (external_inject.c: EEXIST, delete, create), and that copy can come
after the first send.
"""

import ctypes
import errno
import logging
import socket
import struct

from snat_sync import ctnetlink
from snat_sync import table_transfer

LOG = logging.getLogger(__name__)

RESEND_AFTER = 1.0
SO_ATTACH_FILTER = 26
RECEIVE_CHUNK = 1 << 16


def protocols_to_follow(protocol_names):
    """The protocol numbers of [conntrackd] protocols whose translated port
    conntrackd does not replicate."""
    return (frozenset(ctnetlink.PROTOCOL_NUMBERS[name] for name in protocol_names)
            - ctnetlink.NAT_PORTS_REPLICATED)


def helper_chosen(helper, helpers):
    """Whether [conntrackd] expectation_helpers covers the helper, as conntrackd
    matches them: 'all', or a name that begins the helper's."""
    return helper is not None and any(
        chosen == "all" or helper.startswith(chosen) for chosen in helpers)


class MappingListener:
    """The new-entry and new-expectation event socket in a router's namespace,
    filtered in the kernel to the protocols followed and expectations."""

    def __init__(self, namespace, selection, helpers):
        self.selection = selection
        self.helpers = tuple(helpers)
        groups = 1 << (ctnetlink.NFNLGRP_CONNTRACK_NEW - 1)
        if self.helpers:
            groups |= 1 << (ctnetlink.NFNLGRP_CONNTRACK_EXP_NEW - 1)
        self.socket = table_transfer.netlink_socket(namespace, groups)
        try:
            _attach_filter(self.socket, ctnetlink.event_filter(
                self.selection.protocols - ctnetlink.NAT_PORTS_REPLICATED))
            self.socket.setblocking(False)
        except (OSError, ValueError):
            self.socket.close()
            raise

    def fileno(self):
        return self.socket.fileno()

    def read(self, wanted=True):
        """The read requests of the new entries waiting whose translated port
        conntrackd does not carry, and of the new expectations. Lost events (the
        socket overran) are logged: those keep what conntrackd gives the
        backups. Not wanted (this node is not the primary, and the events are of
        what its conntrackd injected), they are drained unread."""
        requests = []
        while True:
            try:
                chunk = self.socket.recv(RECEIVE_CHUNK)
            except BlockingIOError:
                return requests
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                if wanted:
                    LOG.warning("new-entry events were lost (the event socket "
                                "overran): some entries and expectations keep what "
                                "conntrackd gave the backups")
                continue
            if not wanted:
                continue
            for offset, length, kind, _flags in ctnetlink.split_messages(chunk):
                requests += reads_for_event(chunk, offset, length, kind,
                                            self.selection, self.helpers)

    def close(self):
        self.socket.close()


def reads_for_event(data, offset, length, kind, selection, helpers):
    """The read requests an event data[offset:offset+length] calls for: a new
    entry whose translated port conntrackd does not carry, read again; a new
    expectation of a chosen helper, its master (for the sequence shift of the
    segment that announced it) then itself; nothing for the rest."""
    if kind == ctnetlink.CT_NEW:
        original = ctnetlink.remapped_original(data, offset, length)
        if original is not None and selection.accepts(original):
            return [ctnetlink.get_request(data, offset, length)]
    elif kind == ctnetlink.EXP_NEW and helper_chosen(
            ctnetlink.expectation_helper(data, offset, length), helpers):
        return [ctnetlink.master_get_request(data, offset, length),
                ctnetlink.expectation_get_request(data, offset, length)]
    return []


def correction_for(data, offset, length, kind, selection):
    """What a backup is sent for the kernel's answer data[offset:offset+length] to
    a read: an entry with a translated port, or an expectation, replaced whole;
    an expectation's master, its sequence shift (None if it has none, or the
    entry or expectation has ended: the answer is then an error)."""
    if kind == ctnetlink.CT_NEW:
        if not ctnetlink.port_remapped(data, offset, length):
            return ctnetlink.sequence_update_request(data, offset, length)
        create = ctnetlink.create_request(data, offset, length, selection)
    elif kind == ctnetlink.EXP_NEW:
        create = ctnetlink.expectation_create_request(data, offset, length)
    else:
        return None
    return None if create is None else ctnetlink.replace_requests(create)


def _attach_filter(netlink, program):
    """SO_ATTACH_FILTER takes a struct sock_fprog: the instruction count and a
    pointer to the instructions, which must stay alive for the call."""
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // ctnetlink.SOCK_FILTER.size,
                        ctypes.addressof(instructions))
    netlink.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def current_corrections(namespace, reads, selection):
    """The corrections (correction_for) of the entries and expectations reads
    name, as the namespace's kernel holds them now; those that have ended are
    left out."""
    netlink = table_transfer.netlink_socket(namespace)
    corrections = []
    try:
        for read in dict.fromkeys(reads):
            netlink.send(read)
            answer = netlink.recv(RECEIVE_CHUNK)
            for offset, length, kind, _flags in ctnetlink.split_messages(answer):
                correction = correction_for(answer, offset, length, kind, selection)
                if correction is not None:
                    corrections.append(correction)
    finally:
        netlink.close()
    return corrections


def send(spec, peer, port, requests):
    """Put the entries of requests in place on the backup whose daemon is at
    peer:port; TransferFailed if it refused or did not confirm."""
    with table_transfer.open_session(spec, peer, port,
                                     table_transfer.MAPPINGS_GREETING) as reader:
        table_transfer.send_frames(reader.stream, requests)
        reader.stream.sendall(table_transfer.FRAME.pack(0))
        answer = reader.line()
        if answer != "DONE":
            raise table_transfer.TransferFailed(f"not confirmed: {answer}")
