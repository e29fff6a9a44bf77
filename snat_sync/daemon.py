"""The node daemon's loop: one long-running process that keeps this node's routers
running. It owns the selector and the thread pool; the rooms it calls on are

    inventory.py, reconcile.py  what should run (read, then decided purely)
    jobs.py, jobqueue.py        the jobs that change a router, one at a time each
    health_check.py             the periodic health check and its repairs
    role_watchers.py            netlink watchers of each router's primary address
    peer_channels.py            the sockets the peers' health reports arrive on
    metrics_service.py          the Prometheus endpoint and textfile

Nothing is polled per router. Each conntrackd's pidfd sits in the selector and
becomes readable the moment that process exits: a crashed conntrackd is
restarted and its state restored at once (reconcile.restore_steps). The role
watchers' and peer channels' sockets sit in the same selector. Once a second
the daemon stats three directories to notice new or removed specs and
namespaces; every `full_interval` seconds it re-reads everything as a safety
net. SIGHUP re-reads the configuration files too and adds every router again,
which rewrites only what changed and restarts only the conntrackd whose
configuration did. Every [health] check_interval it submits the health check
of the routers that have no job running.

Stopping the daemon leaves the conntrackd instances running: they keep replicating
while it is away, and the next daemon adopts them. `stop_routers` stops them too.
"""

import concurrent.futures
import logging
import os
import resource
import selectors
import signal
import time

from snat_sync import health_check
from snat_sync import inventory
from snat_sync import jobs
from snat_sync import manager
from snat_sync import metrics_service
from snat_sync import namespace
from snat_sync import options
from snat_sync import reconcile
from snat_sync import statedir
from snat_sync.errors import InvalidInput
from snat_sync.jobqueue import RouterJobs
from snat_sync.tracking import RouterTracker

LOG = logging.getLogger(__name__)

# pidfds, netlink sockets (each with its event loop's descriptors) and children's
# pipes of hundreds of routers outgrow the usual 1024.
OPEN_FILES = 65536
# The pool's job keys of the health checks and of the metrics textfile; no router
# id looks like them.
HEALTH_JOB = "(health)"
METRICS_JOB = "(metrics)"


class Daemon:
    def __init__(self, conf, snat_sync_command, workers=8, full_interval=300.0,
                 stop_routers=False):
        self.conf = conf
        self.snat_sync_command = snat_sync_command
        self.full_interval = full_interval
        self.stop_routers = stop_routers
        self.selector = selectors.DefaultSelector()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="router")
        self.jobs = RouterJobs(self.pool, self._wake)
        self.routers = RouterTracker(conf, self.selector, self.jobs)
        self.tracked = self.routers.tracked
        self.metrics = metrics_service.MetricsService(conf)
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_read, selectors.EVENT_READ, ("wake", None))
        self.reload_requested = False
        self.stop_requested = False
        self.spec_stamp = None
        self.namespace_stamp = None
        self.last_full = 0.0
        self.next_check = 0.0

    # -- main loop ---------------------------------------------------------------

    def run(self):
        _raise_open_files_limit()
        previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_signal),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal),
                    signal.SIGINT: signal.signal(signal.SIGINT, self._on_signal)}
        LOG.info("snat-sync daemon started, state path %s", self.conf.state_path)
        try:
            self.metrics.serve()
            while not self.stop_requested:
                self.run_once(timeout=1.0)
        finally:
            for signal_number, handler in previous.items():
                signal.signal(signal_number, handler)
            self.shutdown()
        return 0

    def run_once(self, timeout):
        """Reconcile when due, then wait up to timeout for events and handle them."""
        self._reconcile_if_due()
        self._check_if_due()
        for key, _events in self.selector.select(timeout):
            kind, router_id = key.data
            if kind == "wake":
                _drain(self.wake_read)
            else:
                self.routers.on_event(kind, router_id)
        self.routers.send_due_mappings(time.monotonic())
        self._collect_results()

    def _reconcile_if_due(self):
        spec_stamp = _stamp(os.path.join(self.conf.state_path, "routers"),
                            os.path.join(self.conf.state_path,
                                         inventory.NEUTRON_DIRECTORY))
        namespace_stamp = _stamp(namespace.NETNS_RUN_DIR)
        reload = self.reload_requested
        if (reload or spec_stamp != self.spec_stamp
                or time.monotonic() - self.last_full >= self.full_interval):
            self.reload_requested = False
            self.spec_stamp, self.namespace_stamp = spec_stamp, namespace_stamp
            if reload:
                self._reload_options()
            self.reconcile(rerender=reload)
        elif namespace_stamp != self.namespace_stamp:
            # A namespace came or went (maybe one of ours, re-created): a watcher
            # or report socket in a deleted namespace would never hear again.
            self.namespace_stamp = namespace_stamp
            for router_id, tracked in list(self.tracked.items()):
                self.routers.ensure_namespace_sockets(router_id, tracked.spec)

    def _reload_options(self):
        """Re-read the configuration files; keep the running options if one is bad."""
        LOG.info("reloading: re-reading the configuration and every router")
        if not self.conf.reload_config_files():
            LOG.error("reloading failed; the previous options stay in force")
            return
        try:
            options.validate(self.conf)
        except InvalidInput as error:
            LOG.error("reloaded options are invalid (%s); fix and reload again",
                      error)

    def _on_signal(self, signal_number, frame):
        if signal_number == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True
        self._wake()

    def _wake(self):
        try:
            os.write(self.wake_write, b"\0")
        except BlockingIOError:  # the pipe is full: the loop wakes anyway
            pass

    # -- reconciliation ------------------------------------------------------------

    def reconcile(self, rerender=False):
        self.last_full = time.monotonic()
        configured, neutron_owned = inventory.read_configured(self.conf.state_path)
        neutron_specs = inventory.read_neutron_specs(self.conf.state_path)
        desired = reconcile.desired_routers(configured, neutron_owned, neutron_specs)
        running = inventory.running_daemons(self.conf, configured)
        busy = self.jobs.busy_routers()
        for router_id, pid in running.items():
            if router_id not in busy:
                self.routers.track(router_id, configured[router_id], pid)
        for action in reconcile.reconcile_plan(desired, configured, running,
                                               rerender):
            if action.router_id in busy:
                continue
            LOG.info("router %s: %s", action.router_id, action.kind)
            if action.kind == "add":
                self.jobs.submit(action.router_id, "started", jobs.add, self.conf,
                                 action.spec, self.snat_sync_command,
                                 action.router_id in neutron_specs)
            elif action.kind == "start":
                self.jobs.submit(action.router_id, "started", jobs.start, self.conf,
                                 action.spec)
            else:
                self.routers.untrack(action.router_id)
                self.jobs.submit(action.router_id, "removed", manager.remove_router,
                                 self.conf, action.router_id)
        for router_id in set(self.tracked) - desired.keys() - configured.keys():
            self.routers.untrack(router_id)
        for router_id, spec in desired.items():
            if configured.get(router_id) == spec:
                self.routers.ensure_namespace_sockets(router_id, spec)

    def _collect_results(self):
        started = {}
        for router_id, outcome, result in self.jobs.results():
            if outcome == "checked":
                for checked, state in result.items():
                    if checked in self.tracked:
                        self.tracked[checked].health = state
            if outcome in ("started", "transition") and result:
                spec = self._spec_of(router_id)
                if spec is not None:
                    started[router_id] = spec
        if not started:
            return
        running = inventory.running_daemons(self.conf, started)
        for router_id, spec in started.items():
            if router_id not in running:
                LOG.warning("router %s: conntrackd exited right after its start; "
                            "trying again at the next full reconciliation",
                            router_id)
                continue
            self.routers.track(router_id, spec, running[router_id])
            self.routers.ensure_namespace_sockets(router_id, spec)

    def _spec_of(self, router_id):
        try:
            return statedir.load_spec_file(
                manager.router_files(self.conf, router_id).spec)
        except InvalidInput:
            return None

    # -- health checks and the metrics textfile --------------------------------------

    def _check_if_due(self):
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.conf.health.check_interval
        busy = self.jobs.busy_routers()
        if HEALTH_JOB not in busy:
            checks = [(router_id, (tracked.spec, tracked.files, tracked.pid,
                                   dict(tracked.peer_reports), tracked.health,
                                   tracked.channel))
                      for router_id, tracked in self.tracked.items()
                      if router_id not in busy and tracked.pid is not None]
            if checks:
                self.jobs.submit(HEALTH_JOB, "checked", health_check.check_all,
                                 self.conf, checks)
        if self.conf.metrics.textfile and METRICS_JOB not in busy:
            self.jobs.submit(METRICS_JOB, "metrics",
                             metrics_service.write_metrics_textfile,
                             self.conf.metrics.textfile, self.metrics.snapshot)

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self):
        self.metrics.shutdown()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for router_id in list(self.tracked):
            spec = self.tracked[router_id].spec
            self.routers.untrack(router_id)
            if self.stop_routers:
                files = manager.router_files(self.conf, router_id)
                manager.daemon_for(self.conf, spec, files).stop()
        self.selector.close()
        os.close(self.wake_read)
        os.close(self.wake_write)
        LOG.info("snat-sync daemon stopped; conntrackd instances %s",
                 "stopped" if self.stop_routers else "left running")


def _stamp(*directories):
    """What changes when an entry is added to or removed from the directories."""
    stamps = []
    for directory in directories:
        try:
            status = os.stat(directory)
            stamps.append((status.st_ino, status.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def _drain(descriptor):
    try:
        while os.read(descriptor, 4096):
            pass
    except BlockingIOError:
        pass


def _raise_open_files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < OPEN_FILES:
        LOG.info("open files limited to %d (hard limit); each router needs about 6",
                 wanted)
