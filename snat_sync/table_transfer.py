"""Table transfer: a warm backup loads the primary's whole connection table from
the primary's node daemon, batched into its own kernel.

conntrackd's own resync (`-n`: the primary's conntrackd sends its table, the
backup's injects it) creates one entry per ctnetlink request and waits for each
answer, about 96,000 entries a second here: 2.1 s for 200,000 entries against a
link that carries them in 0.4 s (BENCHMARKS.md, "The backup's insertion
ceiling"). Here the primary's daemon dumps its kernel table, turns each entry
into the request that creates it (ctnetlink.py) and streams them; the backup
writes them into its kernel some 230 at a time.

The stream, over TCP on the HA network to [health] base_port + VRID (the
report port's number) in the router's namespace:

    backup  -> primary   "SNAT-SYNC TABLE 1 <router id>\\n"
    primary -> backup    "OK\\n", or "NO <reason>\\n" and the end
    primary -> backup    frames: 4-byte big-endian length, then whole ctnetlink
                         requests; a frame of length 0 ends a complete table

Entries are created with NLM_F_EXCL: one already in the backup's table came
from conntrackd's replication, which runs all along and is newer than the dump.
Entries the primary destroys while the transfer runs are deleted at its end
(the sender listens for destroy events from before the dump), so none outlives
the primary's copy. The receiver takes nothing but conntrack creates and deletes
(ctnetlink.check_requests): the HA network carries conntrackd's
unauthenticated sync traffic already, and this adds no other power.

Anything short of a complete table (no daemon answers, it refuses, the stream
breaks) falls back to conntrackd's resync, so a node without a daemon, or one
of an older release, still gets the table, as before.

The same listener takes the primary's corrections on a backup (mapping_sync.py:
translated ports and expectation classes conntrackd does not replicate):
"SNAT-SYNC MAPPINGS 1 <router id>" answered "OK" by a node that is not the
primary, then frames as above (a delete and a create each) loaded the same way,
and "DONE" once they are in its kernel.
"""

import contextlib
import dataclasses
import errno
import logging
import socket
import struct
import time

from pyroute2 import netns as pyroute2_netns

from snat_sync import ctnetlink
from snat_sync import reports
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError

LOG = logging.getLogger(__name__)

GREETING = "SNAT-SYNC TABLE 1"
MAPPINGS_GREETING = "SNAT-SYNC MAPPINGS 1"
NOT_PRIMARY = "this node is not the primary"
IS_PRIMARY = "this node is the primary"
FRAME = struct.Struct("!I")
# About 230 requests a frame, each frame one send to the kernel.
FRAME_BYTES = 60000
MAX_FRAME_BYTES = 1 << 20
MAX_LINE = 256
CONNECT_TIMEOUT = 1.0
# The primary streams without pause; this long a silence means it is gone.
IDLE_TIMEOUT = 2.0
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
NETLINK_BUFFER = 64 << 20
RECEIVE_CHUNK = 1 << 20


class TransferFailed(SnatSyncError):
    """The table did not arrive whole."""


@dataclasses.dataclass(frozen=True)
class TransferResult:
    peer: str
    created: int
    already_present: int
    deleted: int
    failed: dict  # errno name -> count
    seconds: float

    def describe(self):
        failed = ", ".join(f"{count} {name}" for name, count in sorted(self.failed.items()))
        return (f"{self.created} entries created from {self.peer}'s table in "
                f"{self.seconds:.2f} s ({self.already_present} already replicated, "
                f"{self.deleted} destroyed there meanwhile and deleted"
                f"{', failed: ' + failed if failed else ''})")


# -- the backup's side -------------------------------------------------------------


def in_use(options):
    """Whether the nodes' daemons transfer tables (and so take the primary's
    corrections, mapping_sync.py): warm standby with [failover] table_transfer.
    A cold backup's replica belongs in conntrackd's cache."""
    return options.failover.table_transfer and options.failover.standby_mode == "warm"


def request_table(daemon, options, resync_request):
    """A warm backup's resync: the primary's table loaded from its daemon, or, when
    none delivers it whole, conntrackd's resync request (resync_request, -n)."""
    if not in_use(options):
        daemon.control(*resync_request, timeout=options.conntrackd.control_timeout)
        return None
    router_id = daemon.files.directory.name
    failures = []
    try:
        spec = statedir.load_spec_file(daemon.files.spec)
        reason = None if spec is not None else f"no router spec at {daemon.files.spec}"
    except InvalidInput as error:
        spec, reason = None, f"{daemon.files.spec}: {error}"
    if spec is not None:
        port = reports.report_port(options.health.base_port, spec.vrid)
        for peer in primary_candidates(spec, statedir.read_json(daemon.files.health)):
            try:
                result = fetch(spec, peer, port)
            except (TransferFailed, OSError) as error:
                failures.append(f"{peer}: {error}")
                continue
            LOG.info("router %s: %s", router_id, result.describe())
            return result
        reason = "; ".join(failures) or "no peer address is known"
    # Every peer's daemon saying it is not the primary is an election still
    # running (a router's first start), not a fault.
    no_primary_yet = bool(failures) and all(NOT_PRIMARY in each for each in failures)
    LOG.log(logging.INFO if no_primary_yet else logging.WARNING,
            "router %s: the primary's table did not arrive from its daemon (%s); "
            "asking conntrackd for a resync instead", router_id, reason)
    daemon.control(*resync_request, timeout=options.conntrackd.control_timeout)
    return None


def primary_candidates(spec, health):
    """The addresses to ask, in order: peers whose last report said primary, then
    the rest of those listed in the spec and reported (learned peers)."""
    reported = [(peer.get("address"), peer.get("role"))
                for peer in (health or {}).get("peers", ()) if isinstance(peer, dict)]
    ordered = [address for address, role in reported if role == "primary"]
    ordered += [str(address) for address in spec.peer_addresses]
    ordered += [address for address, _role in reported]
    seen = set()
    return tuple(address for address in ordered
                 if isinstance(address, str) and not (address in seen or seen.add(address)))


def fetch(spec, peer, port):
    """Load the table the daemon at peer:port serves into the namespace's kernel."""
    started = time.monotonic()
    with open_stream(spec, peer, port) as reader:
        created, present, deleted, failures = load_stream(reader, spec.namespace)
    return TransferResult(peer, created, present, deleted, failures,
                          round(time.monotonic() - started, 3))


def open_stream(spec, peer, port):
    """The table stream from the daemon at peer:port, once it said OK, as a
    Reader; TransferFailed if it refused."""
    return open_session(spec, peer, port, GREETING)


@contextlib.contextmanager
def open_session(spec, peer, port, greeting):
    """A stream to the daemon at peer:port that answered OK to greeting (for this
    router), as a Reader (its socket: .stream); TransferFailed if it refused."""
    stream = stream_socket(spec)
    try:
        stream.settimeout(CONNECT_TIMEOUT)
        stream.bind((str(spec.local_address), 0))
        stream.connect((peer, port))
        stream.settimeout(IDLE_TIMEOUT)
        stream.sendall(f"{greeting} {spec.router_id}\n".encode())
        reader = Reader(stream)
        answer = reader.line()
        if answer != "OK":
            raise TransferFailed(f"refused: {answer}")
        yield reader
    finally:
        stream.close()


def load_stream(reader, namespace):
    """Write the frames of a table stream into the namespace's kernel until the end
    frame: (created, already present, deleted, {errno name: count} of the rest)."""
    netlink = netlink_socket(namespace)
    creates = deletes = 0
    failures = {}
    try:
        while True:
            length = FRAME.unpack(reader.exactly(FRAME.size))[0]
            if length == 0:
                break
            if length > MAX_FRAME_BYTES:
                raise TransferFailed(f"a frame of {length} bytes (at most "
                                     f"{MAX_FRAME_BYTES})")
            frame = reader.exactly(length)
            try:
                created, deleted = ctnetlink.check_requests(frame)
            except ctnetlink.MalformedMessage as error:
                raise TransferFailed(f"bad frame: {error}") from None
            creates, deletes = creates + created, deletes + deleted
            netlink.send(frame)
            _count_errors(netlink, failures)
        _count_errors(netlink, failures)
    finally:
        netlink.close()
    present = failures.pop("EEXIST", 0)
    missing = failures.pop("ENOENT", 0)
    return (creates - present - sum(failures.values()), present, deletes - missing,
            failures)


class Reader:
    """Lines and exact byte counts from a stream, through one buffer."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = bytearray()

    def _more(self):
        try:
            data = self.stream.recv(RECEIVE_CHUNK)
        except socket.timeout:
            raise TransferFailed(f"nothing for {IDLE_TIMEOUT} s") from None
        if not data:
            raise TransferFailed("the stream ended before the table did")
        self.buffer += data

    def line(self):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise TransferFailed("an answer line too long")
            self._more()
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.decode(errors="replace")

    def exactly(self, count):
        while len(self.buffer) < count:
            self._more()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data


def stream_socket(spec):
    """A TCP socket in the router's namespace, of its HA addresses' family
    (flags=0: never create a namespace that is missing)."""
    family = socket.AF_INET6 if spec.local_address.version == 6 else socket.AF_INET
    return pyroute2_netns.create_socket(spec.namespace, family, socket.SOCK_STREAM,
                                        flags=0)


def netlink_socket(namespace, groups=0):
    netlink = pyroute2_netns.create_socket(namespace, socket.AF_NETLINK, socket.SOCK_RAW,
                                           ctnetlink.NETLINK_NETFILTER, flags=0)
    try:
        netlink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, NETLINK_BUFFER)
        netlink.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * MAX_FRAME_BYTES)
        # A failure's answer carries only the header, not the whole request back.
        netlink.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        netlink.bind((0, groups))
    except OSError:
        netlink.close()
        raise
    return netlink


def _count_errors(netlink, failures):
    """Add the failures the kernel answered so far (errno name -> count). ctnetlink
    handles a request within the send, so every answer is queued by now."""
    netlink.setblocking(False)
    try:
        while True:
            for code in ctnetlink.errors(netlink.recv(RECEIVE_CHUNK)):
                name = errno.errorcode.get(code, str(code))
                failures[name] = failures.get(name, 0) + 1
    except BlockingIOError:
        pass
    finally:
        netlink.setblocking(True)


# -- the primary's side ------------------------------------------------------------


class TableListener:
    """The TCP socket in a router's namespace that backups ask for the table on."""

    def __init__(self, spec, port):
        self.socket = stream_socket(spec)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((str(spec.local_address), port))
            self.socket.listen(8)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise

    def fileno(self):
        return self.socket.fileno()

    def accept(self):
        """(connection, peer address), or None if the backup gave up meanwhile."""
        try:
            connection, address = self.socket.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        connection.setblocking(True)
        return connection, address[0]

    def close(self):
        self.socket.close()


def serve(connection, peer, spec, selection, is_primary):
    """Answer a request on the table listener: send the namespace's whole table
    to the backup on connection if this node is the router's primary
    (is_primary), or, if it is not, take the primary's corrections; returns
    how many entries went either way, for the log."""
    router_id = spec.router_id
    try:
        connection.settimeout(IDLE_TIMEOUT)
        reader = Reader(connection)
        greeting = reader.line()
        if greeting == f"{MAPPINGS_GREETING} {router_id}":
            return _take_mappings(connection, reader, peer, spec, is_primary)
        if greeting != f"{GREETING} {router_id}":
            connection.sendall(b"NO not a table request for this router\n")
            LOG.warning("router %s: table request from %s refused: %r", router_id,
                        peer, greeting[:80])
            return None
        if not is_primary:
            connection.sendall(f"NO {NOT_PRIMARY}\n".encode())
            LOG.info("router %s: table request from %s refused: not the primary",
                     router_id, peer)
            return None
        connection.sendall(b"OK\n")
        started = time.monotonic()
        entries, deletes = _send_table(connection, spec.namespace, selection)
        LOG.info("router %s: sent %d entries of the table to %s in %.2f s, and %d "
                 "destroyed meanwhile", router_id, entries, peer,
                 time.monotonic() - started, deletes)
        return entries
    except (OSError, TransferFailed, ctnetlink.MalformedMessage) as error:
        LOG.warning("router %s: sending the table to %s failed: %s", router_id, peer,
                    error)
        return None
    finally:
        connection.close()


def _take_mappings(connection, reader, peer, spec, is_primary):
    """A backup's side of mapping_sync: the primary's version of entries and
    expectations conntrackd replicates wrongly, put in place of ours."""
    if is_primary:
        connection.sendall(f"NO {IS_PRIMARY}\n".encode())
        LOG.warning("router %s: corrections from %s refused: this node is the "
                    "primary", spec.router_id, peer)
        return None
    connection.sendall(b"OK\n")
    created, _present, _deleted, failures = load_stream(reader, spec.namespace)
    connection.sendall(b"DONE\n")
    failed = ", ".join(f"{count} {name}" for name, count in sorted(failures.items()))
    LOG.log(logging.WARNING if failures else logging.INFO,
            "router %s: %d entries or expectations from %s put in place of "
            "conntrackd's copies%s",
            spec.router_id, created, peer, f", failed: {failed}" if failed else "")
    return created


def _send_table(connection, namespace, selection):
    destroyed = netlink_socket(namespace, 1 << (ctnetlink.NFNLGRP_CONNTRACK_DESTROY - 1))
    try:
        dump = netlink_socket(namespace)
        try:
            dump.send(ctnetlink.dump_request())
            entries = send_frames(connection, _created(dump, selection))
        finally:
            dump.close()
        deletes = send_frames(connection, _deleted(destroyed))
    finally:
        destroyed.close()
    connection.sendall(FRAME.pack(0))
    return entries, deletes


def _created(dump, selection):
    """The create request of every entry the dump brings, as it comes."""
    buffer = bytearray(RECEIVE_CHUNK)
    while True:
        size = dump.recv_into(buffer)
        chunk = bytes(buffer[:size])
        for offset, length, kind, _flags in ctnetlink.split_messages(chunk):
            if kind == ctnetlink.NLMSG_DONE:
                return
            if kind == ctnetlink.NLMSG_ERROR:
                code = -struct.unpack_from("=i", chunk, offset + 16)[0]
                raise TransferFailed(f"the table dump failed: {errno.errorcode.get(code, code)}")
            request = ctnetlink.create_request(chunk, offset, length, selection)
            if request is not None:
                yield request


def _deleted(destroyed):
    """A delete request per destroy event queued since the dump began."""
    destroyed.setblocking(False)
    while True:
        try:
            chunk = destroyed.recv(RECEIVE_CHUNK)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                raise TransferFailed("destroy events were lost while the table was "
                                     "sent") from None
            raise
        for offset, length, kind, _flags in ctnetlink.split_messages(chunk):
            if kind == ctnetlink.CT_DELETE:
                yield ctnetlink.delete_request(chunk, offset, length)


def send_frames(connection, requests):
    """Send requests in frames of about FRAME_BYTES; how many were sent."""
    count, pending, size = 0, [], 0
    for request in requests:
        pending.append(request)
        size += len(request)
        count += 1
        if size >= FRAME_BYTES:
            connection.sendall(FRAME.pack(size) + b"".join(pending))
            pending, size = [], 0
    if pending:
        connection.sendall(FRAME.pack(size) + b"".join(pending))
    return count
