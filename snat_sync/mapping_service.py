"""The daemon's mapping service (mapping_sync.py): one filtered new-entry event
socket per router, in the router's namespace, polled in the daemon's selector.
On the primary (table_service.is_primary) the entries it reports are read again
and sent to the router's peers on the thread pool, once at once and once
RESEND_AFTER later; on a backup its events (of what its conntrackd injects) are
drained unread. Like the table listener, the socket follows its
namespace, and it runs only where the table listener does: a warm standby with
table transfer, whose backups take the mappings on that listener.
"""

import logging
import time

from snat_sync import mapping_sync
from snat_sync import namespace_sockets
from snat_sync import reports as reports_module
from snat_sync import table_service
from snat_sync import table_transfer

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


def job_key(router_id):
    return f"(mappings) {router_id}"


class MappingService:
    def __init__(self, conf, selector, submit):
        """submit(key, outcome, function, *arguments) queues a job."""
        self.conf = conf
        self.selector = selector
        self.submit = submit

    def ensure(self, router_id, tracked, spec):
        """Listen in the router's namespace as it is now, if need be."""
        conntrackd = self.conf.conntrackd
        followed = mapping_sync.protocols_to_follow(conntrackd.protocols)
        if not (table_transfer.in_use(self.conf)
                and (followed or conntrackd.expectation_helpers)):
            self.close(tracked)
            return
        held = (tracked.mapping_listener, tracked.mapping_namespace)
        tracked.mapping_listener, tracked.mapping_namespace = (
            namespace_sockets.follow_namespace(
                self.selector, "mapping", router_id, spec.namespace, held,
                f"the new-entry event socket in namespace {spec.namespace}",
                lambda: mapping_sync.MappingListener(
                    spec.namespace, table_service.selection_for(conntrackd.protocols, spec),
                    conntrackd.expectation_helpers)))

    def close(self, tracked):
        namespace_sockets.close_registered(self.selector, tracked.mapping_listener)
        tracked.mapping_listener = tracked.mapping_namespace = None
        tracked.mapping_sends = []

    def on_event(self, router_id, tracked):
        """Note what the events call for, on the primary; a backup's events are
        of the entries its own conntrackd injects (many, on a busy router), and
        are drained without being parsed. This runs in the daemon's loop, so the
        role comes from the last transition's record, not from a netlink request
        in the namespace; the send (send_to_peers, on the pool) asks the
        namespace before anything leaves."""
        try:
            primary = table_service.became_primary(tracked.files)
            reads = tracked.mapping_listener.read(wanted=primary)
        except Exception as error:  # netlink errors, or a message we cannot read
            LOG.error("router %s: reading new-entry events failed: %s", router_id,
                      error)
            self.close(tracked)
            return
        if reads:
            now = time.monotonic()
            tracked.mapping_sends += [(now, reads),
                                      (now + mapping_sync.RESEND_AFTER, reads)]

    def send_due(self, router_id, tracked, now):
        """Submit the sends that are due, all of them as one job."""
        due = [reads for when, reads in tracked.mapping_sends if when <= now]
        if not due:
            return
        tracked.mapping_sends = [(when, reads) for when, reads
                                 in tracked.mapping_sends if when > now]
        peers = peers_of(tracked.spec, tracked.peer_reports)
        port = reports_module.report_port(self.conf.health.base_port,
                                          tracked.spec.vrid)
        self.submit(job_key(router_id), "mappings sent", send_to_peers, tracked.spec,
                    tracked.files, peers, port, tracked.mapping_listener.selection,
                    [read for reads in due for read in reads])


def peers_of(spec, peer_reports):
    """The listed peers, then those learned from their reports."""
    listed = [str(address) for address in spec.peer_addresses]
    return tuple(listed + [address for address in peer_reports if address not in listed])


def send_to_peers(spec, files, peers, port, selection, reads):
    """Send the entries reads name, as they are now, to every peer, if this node
    is the primary (run on the pool); how many peers took them."""
    if not table_service.is_primary(spec, files):
        return 0
    requests = mapping_sync.current_corrections(spec.namespace, reads, selection)
    if not requests:
        return 0
    taken = 0
    for peer in peers:
        try:
            mapping_sync.send(spec, peer, port, requests)
        except (table_transfer.TransferFailed, OSError) as error:
            LOG.warning("router %s: %d entries or expectations that conntrackd "
                        "replicates wrongly not sent to %s: %s", spec.router_id,
                        len(requests), peer, error)
            continue
        taken += 1
    LOG.info("router %s: %d entries or expectations that conntrackd replicates "
             "wrongly sent, as this node holds them, to %d of %d peers",
             spec.router_id, len(requests), taken, len(peers))
    return taken
