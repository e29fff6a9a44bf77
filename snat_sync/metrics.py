"""Prometheus metrics: what `snat-sync status` and the counters know, for scraping.

Three ways out, all from one Snapshot (the routers' status and their counters):
    render         the text exposition, for `snat-sync metrics`
    write_textfile the same, atomically, for node_exporter's textfile collector
    serve          an HTTP endpoint (/metrics) the node daemon runs on
                   [metrics] listen_address:listen_port

A figure snat-sync does not know (conntrackd down, no health check yet) is left
out, never reported as 0: a 0 would read as "the cache is empty" on a dashboard.
conntrackd's sync counters count from its start and reset when it restarts, which
Prometheus' rate() handles; snat_sync_conntrackd_start_time_seconds tells when.
"""

import dataclasses
import pathlib

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from snat_sync import history
from snat_sync import manager
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError

VERDICTS = ("in-sync", "degraded", "broken")
TEXTFILE_MODE = 0o644  # node_exporter usually runs as its own user

# (field of ReplicationStats, metric name, type, help)
REPLICATION = (
    ("packets_sent", "snat_sync_sync_packets_sent", CounterMetricFamily,
     "Sync packets the router's conntrackd sent to its peers since it started."),
    ("packets_received", "snat_sync_sync_packets_received", CounterMetricFamily,
     "Sync packets the router's conntrackd received from its peers since it "
     "started."),
    ("messages_lost", "snat_sync_sync_messages_lost", CounterMetricFamily,
     "Sync messages the router's conntrackd found missing (sequence gaps) since "
     "it started. With FTFW the peer sends them again (measured: a 10 s outage of "
     "the sync link, 20,012 lost, all recovered within 1 s); with notrack they "
     "are gone until a resync."),
    ("messages_malformed", "snat_sync_sync_messages_malformed", CounterMetricFamily,
     "Sync messages the router's conntrackd received and could not parse since it "
     "started: a peer with another conntrackd version or another sync port user."),
    ("resend_queue", "snat_sync_resend_queue_entries", GaugeMetricFamily,
     "Messages in conntrackd's FTFW resend queue waiting for a peer's "
     "acknowledgement; a queue that keeps growing means a peer does not answer."),
    ("cache_full_drops", "snat_sync_cache_full_drops", CounterMetricFamily,
     "Entries the router's conntrackd dropped since it started because a cache was "
     "full; they will not survive a failover. Raise [conntrackd] hash_limit."),
)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the metrics show at one moment.

    statuses: manager.RouterStatus of each router (or anything of that shape);
    counters: {router id: history.read_counters(...)} for the routers that have
    counters.
    """

    statuses: tuple
    counters: dict

    def __post_init__(self):
        object.__setattr__(self, "statuses", tuple(self.statuses))


class SnapshotCollector:
    """A prometheus_client collector that asks source() for a Snapshot per scrape."""

    def __init__(self, source):
        self._source = source

    def collect(self):
        return families(self._source())


def families(snapshot):
    """Every metric family of the snapshot, in a stable order. Pure."""
    statuses = snapshot.statuses
    return [
        *_router_families(statuses),
        *_conntrackd_families(statuses),
        *_replica_families(statuses),
        *_replication_families(statuses),
        *_peer_families(statuses),
        *_counter_families(statuses, snapshot.counters),
        *_transition_families(statuses),
    ]


def _router_families(statuses):
    info = GaugeMetricFamily(
        "snat_sync_router_info",
        "A router this node runs, with its namespace and this node's VRRP role for "
        "it (primary, backup or unknown); always 1.",
        labels=["router", "namespace", "role"])
    verdict = GaugeMetricFamily(
        "snat_sync_router_verdict",
        "Replication health of the router as the node daemon judges it: 1 for the "
        "current verdict, 0 for the others. in-sync: flows survive a failover; "
        "degraded: some may not; broken: they will not (see snat-sync status).",
        labels=["router", "verdict"])
    checked = GaugeMetricFamily(
        "snat_sync_health_check_timestamp_seconds",
        "When the node daemon last recorded a check of the router's replication "
        "(health.json: at once when a role or problem changes, else at least every "
        "10 s), seconds since the epoch; the verdict is only as fresh as this.",
        labels=["router"])
    for each in statuses:
        info.add_metric([each.router, each.namespace, each.role], 1)
        for name in VERDICTS:
            verdict.add_metric([each.router, name], 1 if each.verdict == name else 0)
        _add(checked, [each.router], each.checked)
    return [info, verdict, checked]


def _conntrackd_families(statuses):
    up = GaugeMetricFamily(
        "snat_sync_conntrackd_up",
        "1 while the router's conntrackd runs, 0 while it is down: with it down "
        "nothing replicates and the router's flows do not survive a failover.",
        labels=["router"])
    started = GaugeMetricFamily(
        "snat_sync_conntrackd_start_time_seconds",
        "When the router's conntrackd started, seconds since the epoch; its sync "
        "counters count from then.",
        labels=["router"])
    kernel = GaugeMetricFamily(
        "snat_sync_kernel_entries",
        "Connection tracking entries in the kernel table of the router's namespace.",
        labels=["router"])
    caches = GaugeMetricFamily(
        "snat_sync_cache_entries",
        "Entries in the router's conntrackd caches: internal holds this node's own "
        "connections (sent to the peers), external the peers' connections "
        "(committed into the kernel when this node becomes primary).",
        labels=["router", "cache"])
    for each in statuses:
        up.add_metric([each.router], 1 if each.conntrackd_alive else 0)
        _add(started, [each.router], each.conntrackd_started)
        _add(kernel, [each.router], each.kernel_entries)
        _add(caches, [each.router, "internal"], each.internal_cache)
        _add(caches, [each.router, "external"], each.external_cache)
    return [up, started, kernel, caches]


def _replica_families(statuses):
    replica = GaugeMetricFamily(
        "snat_sync_replica_entries",
        "Entries of the replica a failover now would start from: on a backup its "
        "own (warm standby: its kernel table; cold: its external cache), on a "
        "primary the fullest fresh peer replica. Left out while unknown or stale.",
        labels=["router"])
    primary = GaugeMetricFamily(
        "snat_sync_replica_primary_entries",
        "Entries of the primary's table the replica copies: on a backup as the "
        "primary last reported it (fresh reports only), on a primary its own.",
        labels=["router"])
    missing = GaugeMetricFamily(
        "snat_sync_replica_missing_entries",
        "Entries a failover now would lose: the primary's table minus the "
        "replica, at least 0. Grows from 0 while a returning backup resyncs.",
        labels=["router"])
    for each in statuses:
        _add(replica, [each.router], each.replica_entries)
        _add(primary, [each.router], each.primary_entries)
        _add(missing, [each.router], each.missing_entries)
    return [replica, primary, missing]


def _replication_families(statuses):
    found = []
    for field, name, kind, text in REPLICATION:
        family = kind(name, text, labels=["router"])
        for each in statuses:
            if each.replication is not None:
                _add(family, [each.router], getattr(each.replication, field))
        found.append(family)
    return found


def _peer_families(statuses):
    info = GaugeMetricFamily(
        "snat_sync_peer_info",
        "A peer node of the router, by its HA address, with the role its daemon "
        "last reported (primary, backup or unknown); always 1. Two primaries for "
        "one router is a split brain.",
        labels=["router", "peer", "role"])
    seen = GaugeMetricFamily(
        "snat_sync_peer_last_seen_timestamp_seconds",
        "When the peer's daemon last sent this node a health report, seconds since "
        "the epoch.",
        labels=["router", "peer"])
    caches = GaugeMetricFamily(
        "snat_sync_peer_cache_entries",
        "Entries in the peer's conntrackd caches as the peer last reported them; a "
        "backup's external cache should match its primary's internal cache.",
        labels=["router", "peer", "cache"])
    for each in statuses:
        for peer in each.peers:
            info.add_metric([each.router, peer.address, peer.role], 1)
            _add(seen, [each.router, peer.address], peer.last_seen)
            _add(caches, [each.router, peer.address, "internal"], peer.internal_cache)
            _add(caches, [each.router, peer.address, "external"], peer.external_cache)
    return [info, seen, caches]


def _counter_families(statuses, counters):
    transitions = CounterMetricFamily(
        "snat_sync_transitions",
        "VRRP transitions this node ran for the router, by the role it went to and "
        "how the transition ended.",
        labels=["router", "role", "outcome"])
    repairs = CounterMetricFamily(
        "snat_sync_repairs",
        "Repairs of replication faults the node daemon ran for the router, by "
        "repair and how it ended.",
        labels=["router", "repair", "outcome"])
    commit = HistogramMetricFamily(
        "snat_sync_commit_duration_seconds",
        "Time this node took to commit the router's replicated table into the "
        "kernel on becoming primary; new connections wait for it.",
        labels=["router"])
    for router in [each.router for each in statuses]:
        figures = counters.get(router)
        if not figures:
            continue
        for role, outcomes in sorted(figures.get("transitions", {}).items()):
            for outcome, count in sorted(outcomes.items()):
                transitions.add_metric([router, role, outcome], count)
        for repair, outcomes in sorted(figures.get("repairs", {}).items()):
            for outcome, count in sorted(outcomes.items()):
                repairs.add_metric([router, repair, outcome], count)
        histogram = figures.get("commit_seconds")
        if histogram:
            commit.add_metric([router], _buckets(histogram["buckets"]),
                              histogram["sum"])
    return [transitions, repairs, commit]


def _buckets(buckets):
    """The cumulative buckets by rising bound, +Inf last, bounds as Prometheus
    writes them ("60.0", "+Inf"); the histogram's _count is the +Inf bucket."""
    return [(floatToGoString(float(bound)), buckets[bound])
            for bound in sorted(buckets, key=float)]


def _transition_families(statuses):
    arrived = GaugeMetricFamily(
        "snat_sync_last_transition_timestamp_seconds",
        "When the router's latest VRRP transition reached this node, seconds since "
        "the epoch.",
        labels=["router"])
    took = GaugeMetricFamily(
        "snat_sync_last_transition_duration_seconds",
        "How long the router's latest VRRP transition on this node took, from its "
        "arrival to its end.",
        labels=["router"])
    for each in statuses:
        record = each.last_transition
        if not record:
            continue
        _add(arrived, [each.router], record.get("arrived"))
        if record.get("arrived") is not None and record.get("finished") is not None:
            took.add_metric([each.router], record["finished"] - record["arrived"])
    return [arrived, took]


def _add(family, labels, value):
    """Add a sample unless the figure is unknown (None)."""
    if value is not None:
        family.add_metric(labels, value)


def registry_for(source):
    """A fresh registry holding only snat-sync's collector over source()."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(source))
    return registry


def render(snapshot):
    """The snapshot in Prometheus' text exposition format (bytes)."""
    return generate_latest(registry_for(lambda: snapshot))


def textfile_path(text):
    """The textfile path, if node_exporter's textfile collector would read it."""
    path = pathlib.Path(text)
    if not path.is_absolute() or path.suffix != ".prom":
        raise InvalidInput("--textfile", text,
                           "must be an absolute path ending in .prom "
                           "(node_exporter's textfile collector reads only *.prom)")
    return path


def write_textfile(path, snapshot):
    """Replace path with the exposition atomically, readable by node_exporter.

    The temporary file is a dot file in the same directory whose name does not end
    in .prom, so the textfile collector never reads it half-written.
    """
    try:
        statedir.write_atomically(path, render(snapshot).decode("utf-8"),
                                  TEXTFILE_MODE)
    except OSError as error:
        raise SnatSyncError(f"cannot write the metrics to {path}: "
                            f"{error.strerror or error}") from None


class MetricsServer:
    """The HTTP endpoint serve() started; stop it with shutdown() or close()."""

    def __init__(self, address, httpd, thread):
        self.address = address
        self.port = httpd.server_port
        self._httpd = httpd
        self._thread = thread

    @property
    def url(self):
        return f"http://{_host_port(self.address, self.port)}/metrics"

    def shutdown(self):
        """Stop serving, free the port and wait for the serving thread. Idempotent."""
        if self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._thread = None

    close = shutdown


def serve(address, port, snapshot_source):
    """Serve the metrics of snapshot_source() on http://address:port/metrics.

    snapshot_source is called once per scrape. Port 0 takes a free port (see the
    returned server's port). Serving runs in a daemon thread.
    """
    try:
        httpd, thread = start_http_server(port, str(address),
                                          registry_for(snapshot_source))
    except OSError as error:
        raise SnatSyncError(f"cannot serve metrics on {_host_port(address, port)}: "
                            f"{error.strerror or error}") from None
    return MetricsServer(str(address), httpd, thread)


def _host_port(address, port):
    address = str(address)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def gather(conf, read_addresses=True):
    """The snapshot of every router under the state path: status and counters.

    read_addresses: see manager.status.
    """
    statuses = manager.status(conf, read_addresses=read_addresses)
    counters = {
        each.router: history.read_counters(manager.router_files(conf, each.router))
        for each in statuses
    }
    return Snapshot(statuses, counters)

