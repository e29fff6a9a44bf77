"""The daemon's metrics: served on [metrics] listen_address:listen_port and, if asked,
written to a textfile for node_exporter; what the figures are is metrics.py's.

Each gathering asks every router's conntrackd again, so the figures are reused
for METRICS_PERIOD seconds (or the health check interval, if longer): Prometheus
scrapes every 15 s or more.
"""

import logging
import threading
import time

from snat_sync import metrics
from snat_sync.errors import SnatSyncError

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")

# Seconds the metrics' figures are reused for scrapes and the textfile.
METRICS_PERIOD = 15.0


class MetricsService:
    def __init__(self, conf):
        self.conf = conf
        self.server = None
        self.lock = threading.Lock()
        self.cache = (float("-inf"), None)

    def serve(self):
        port = self.conf.metrics.listen_port
        if not port:
            return
        try:
            self.server = metrics.serve(self.conf.metrics.listen_address, port,
                                        self.snapshot)
        except SnatSyncError as error:
            LOG.error("metrics not served: %s", error)
            return
        LOG.info("serving metrics on %s port %d", self.conf.metrics.listen_address,
                 port)

    def snapshot(self):
        """The metrics' figures, gathered at most every METRICS_PERIOD seconds (or
        health check interval, if longer)."""
        with self.lock:
            gathered_at, snapshot = self.cache
            period = max(self.conf.health.check_interval, METRICS_PERIOD)
            if time.monotonic() - gathered_at >= period:
                try:
                    snapshot = metrics.gather(self.conf, read_addresses=False)
                except (SnatSyncError, OSError) as error:
                    LOG.error("gathering the metrics failed: %s", error)
                    if snapshot is None:
                        raise
                    return snapshot
                self.cache = (time.monotonic(), snapshot)
            return snapshot

    def shutdown(self):
        if self.server is not None:
            self.server.shutdown()


def write_metrics_textfile(path, snapshot_source):
    """The textfile job, run on the daemon's pool."""
    metrics.write_textfile(path, snapshot_source())
