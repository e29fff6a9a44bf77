"""The routers the daemon runs, as its loop's selector sees them: each one's
conntrackd pidfd (readable the moment that process exits, which restarts it),
its role watcher (role_watchers.py), its peer channel (peer_channels.py), its
table listener (table_service.py) and its new-entry event socket
(mapping_service.py).
"""

import dataclasses
import logging
import os
import pathlib
import selectors

from snat_sync import health_check
from snat_sync import jobs
from snat_sync import reports as reports_module
from snat_sync import statedir
from snat_sync.mapping_service import MappingService
from snat_sync.peer_channels import PeerChannels
from snat_sync.role_watchers import RoleWatchers
from snat_sync.table_service import TableService
from snat_sync.router import RouterSpec

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


@dataclasses.dataclass
class Tracked:
    """What the daemon holds for one router it runs."""

    spec: RouterSpec
    files: statedir.RouterFiles
    pid: int | None = None
    pidfd: int | None = None
    watcher: object = None
    channel: reports_module.ReportChannel | None = None
    channel_namespace: int | None = None
    table_listener: object = None
    table_namespace: int | None = None
    mapping_listener: object = None
    mapping_namespace: int | None = None
    # (when, [read requests]): the mapping service's sends still to come
    mapping_sends: list = dataclasses.field(default_factory=list)
    peer_reports: dict = dataclasses.field(default_factory=dict)
    health: health_check.HealthState = health_check.HealthState()


class RouterTracker:
    def __init__(self, conf, selector, router_jobs):
        """router_jobs: the daemon's jobqueue.RouterJobs, where restarts go."""
        self.conf = conf
        self.selector = selector
        self.jobs = router_jobs
        self.tracked = {}
        self.watchers = RoleWatchers(conf, selector, router_jobs.submit)
        self.channels = PeerChannels(conf, selector)
        self.tables = TableService(conf, selector, router_jobs.submit)
        self.mappings = MappingService(conf, selector, router_jobs.submit)

    def on_event(self, kind, router_id):
        """A selector event of one of the router's descriptors."""
        if kind == "exit":
            self._on_exit(router_id)
        elif kind == "watch":
            self.watchers.on_event(router_id, self.tracked[router_id])
        elif kind == "report":
            self.channels.read(router_id, self.tracked[router_id])
        elif kind == "table":
            self.tables.on_request(router_id, self.tracked[router_id])
        elif kind == "mapping":
            self.mappings.on_event(router_id, self.tracked[router_id])

    def send_due_mappings(self, now):
        for router_id, tracked in self.tracked.items():
            self.mappings.send_due(router_id, tracked, now)

    def track(self, router_id, spec, pid):
        tracked = self.tracked.get(router_id)
        if tracked is not None and tracked.spec != spec:
            self.untrack(router_id)
            tracked = None
        if tracked is None:
            # The router's directory was checked when it was configured.
            files = statedir.RouterFiles(
                pathlib.Path(self.conf.state_path).absolute() / "routers" / router_id)
            tracked = self.tracked[router_id] = Tracked(spec, files)
        if tracked.pid == pid:
            return
        self._forget_pid(tracked)
        try:
            tracked.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._restart(router_id, spec)
            return
        tracked.pid = pid
        self.selector.register(tracked.pidfd, selectors.EVENT_READ, ("exit", router_id))

    def _forget_pid(self, tracked):
        if tracked.pidfd is not None:
            self.selector.unregister(tracked.pidfd)
            os.close(tracked.pidfd)
        tracked.pid = tracked.pidfd = None

    def untrack(self, router_id):
        tracked = self.tracked.pop(router_id, None)
        if tracked is None:
            return
        self._forget_pid(tracked)
        self.watchers.close(tracked)
        self.channels.close(tracked)
        self.tables.close(tracked)
        self.mappings.close(tracked)

    def _on_exit(self, router_id):
        tracked = self.tracked.get(router_id)
        if tracked is None or tracked.pid is None:
            return
        LOG.warning("router %s: conntrackd pid %d exited", router_id, tracked.pid)
        self._forget_pid(tracked)
        if router_id not in self.jobs.busy_routers():
            # A job that stops conntrackd reports the new pid itself.
            self._restart(router_id, tracked.spec)

    def _restart(self, router_id, spec):
        # The daemon saw it exit: the router's record describes the node now.
        self.jobs.submit(router_id, "started", jobs.start, self.conf, spec, True)

    def ensure_namespace_sockets(self, router_id, spec):
        tracked = self.tracked.get(router_id)
        if tracked is None:
            return
        self.watchers.ensure(router_id, tracked, spec)
        self.channels.ensure(router_id, tracked, spec)
        self.tables.ensure(router_id, tracked, spec)
        self.mappings.ensure(router_id, tracked, spec)
