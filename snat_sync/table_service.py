"""The daemon's table service: one TCP listener per router, in the router's
namespace on its HA address at the report port's number (table_transfer.py),
polled in the daemon's selector. A backup's request is accepted in the loop and
answered on the thread pool, beside the router's own jobs: a transition or a
restart never waits for a table to be sent. Only a primary sends its table; it
is the primary whose primary address is on its HA interface or, for a router
without one, whose last transition was to primary and succeeded. Like the peer
channel, the listener follows its namespace.
"""

import logging

from snat_sync import ctnetlink
from snat_sync import namespace
from snat_sync import namespace_sockets
from snat_sync import render
from snat_sync import reports as reports_module
from snat_sync import statedir
from snat_sync import table_transfer
from snat_sync.roles import Role

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


def job_key(router_id, peer):
    """The job queue's key of a table send: apart from the router's transitions,
    and from the sends to its other backups (two returning at once each get the
    table; queued behind each other, the second would give up waiting after
    table_transfer.IDLE_TIMEOUT and fall back to conntrackd's resync)."""
    return f"(table) {router_id} {peer}"


class TableService:
    def __init__(self, conf, selector, submit):
        """submit(key, outcome, function, *arguments) queues a job."""
        self.conf = conf
        self.selector = selector
        self.submit = submit

    def ensure(self, router_id, tracked, spec):
        """Listen in the router's namespace as it is now, if need be."""
        if not table_transfer.in_use(self.conf):
            self.close(tracked)
            return
        port = reports_module.report_port(self.conf.health.base_port, spec.vrid)
        tracked.table_listener, tracked.table_namespace = namespace_sockets.follow_namespace(
            self.selector, "table", router_id, spec.namespace,
            (tracked.table_listener, tracked.table_namespace),
            f"the table listener on {spec.local_address} TCP port {port} in "
            f"namespace {spec.namespace}",
            lambda: table_transfer.TableListener(spec, port))

    def close(self, tracked):
        namespace_sockets.close_registered(self.selector, tracked.table_listener)
        tracked.table_listener = tracked.table_namespace = None

    def on_request(self, router_id, tracked):
        accepted = tracked.table_listener.accept()
        if accepted is None:
            return
        connection, peer = accepted
        LOG.info("router %s: table request from %s", router_id, peer)
        self.submit(job_key(router_id, peer), "served", serve, self.conf, tracked.spec,
                    tracked.files, connection, peer)


def serve(conf, spec, files, connection, peer):
    """Answer one table request (run on the pool: the dump and the send take about
    0.5 s per 200,000 entries)."""
    try:
        selection = selection_for(conf.conntrackd.protocols, spec)
        primary = is_primary(spec, files)
    except Exception:
        connection.close()  # the backup falls back to conntrackd's resync
        raise
    return table_transfer.serve(connection, peer, spec, selection, primary)


def selection_for(protocols, spec):
    """What conntrackd replicates of this router: the protocols ([conntrackd]
    protocols), and neither loopback nor the HA network's own traffic (render.py's
    filter)."""
    return ctnetlink.Selection.of(
        protocols,
        (*render.LOOPBACK_NETWORKS, namespace.ha_link(spec).network))


def is_primary(spec, files):
    if spec.primary_address is not None:
        return bool(namespace.holds_address(spec.namespace, spec.ha_interface,
                                            spec.primary_address))
    return became_primary(files)


def became_primary(files):
    """Whether the router's last transition was to primary and succeeded: read
    from its record, without asking the namespace."""
    record = statedir.read_json(files.last_transition) or {}
    return record.get("role") == Role.PRIMARY.value and record.get("outcome") == "done"
