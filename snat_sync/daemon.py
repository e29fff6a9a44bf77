"""The node daemon: one long-running process that keeps this node's routers running.

The desired routers come from two places under the state path:
    routers/<id>/spec.json   written by `snat-sync router add` (kept until removed)
    neutron/<id>.json        written by the Neutron L3 agent extension; the daemon
                             adds the router, marks its directory as Neutron's, and
                             removes the router once the file is gone
`reconcile_plan` compares them with what is configured and what runs, and decides;
the daemon carries the actions out on a small thread pool, one job at a time per
router, so a slow router never holds up the others.

Nothing is polled per router. Each conntrackd's pidfd sits in the daemon's selector
and becomes readable the moment that process exits: a crashed conntrackd is
restarted and its state restored at once (`restore_steps`). The role watchers'
netlink sockets (watcher.py) sit in the same selector; when a watcher starts, the
router is taken into the role its address shows (a transition already done is
skipped). Once a second the daemon stats three directories to notice new or
removed specs and namespaces; every `full_interval` seconds it re-reads everything
as a safety net. SIGHUP re-reads the configuration files too and adds every router
again, which rewrites only what changed and restarts only the conntrackd whose
configuration did.

Every [health] check_interval the daemon checks the routers that have no job
running, one after another in one pool job (`check_all`, `check`): for each it
reads its conntrackd's figures from the control socket, sends them to the
peers' daemons (reports.py), lets repair.assess decide what is wrong and what to
repair, carries the repairs out under the router's transition lock, writes
health.json for `snat-sync status`, and rotates conntrackd's log. It serves the
Prometheus metrics on [metrics] listen_address:listen_port and, if asked, writes
them to a textfile for node_exporter.

Stopping the daemon leaves the conntrackd instances running: they keep replicating
while it is away, and the next daemon adopts them. `stop_routers` stops them too.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import queue
import resource
import selectors
import signal
import threading
import time

from snat_sync import conntrackd as conntrackd_module
from snat_sync import failover
from snat_sync import history
from snat_sync import manager
from snat_sync import metrics
from snat_sync import namespace
from snat_sync import options
from snat_sync import repair
from snat_sync import reports as reports_module
from snat_sync import statedir
from snat_sync import watcher as watcher_module
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.failover import Role
from snat_sync.router import RouterSpec, check_router_id

LOG = logging.getLogger(__name__)

NEUTRON_DIRECTORY = "neutron"
# In a router's directory: the router was added from neutron/<id>.json.
NEUTRON_MARKER = "from-neutron"
# pidfds, netlink sockets (each with its event loop's descriptors) and children's
# pipes of hundreds of routers outgrow the usual 1024.
OPEN_FILES = 65536
# Repairs kept in health.json for `snat-sync status`; history.jsonl keeps more.
RECENT_REPAIRS = 10
# Seconds between rewrites of a health.json whose figures alone changed.
HEALTH_FILE_PERIOD = 10.0
# Seconds the metrics' figures are reused for scrapes and the textfile.
METRICS_PERIOD = 15.0
# The pool's job keys of the health checks and of the metrics textfile; no router
# id looks like them.
HEALTH_JOB = "(health)"
METRICS_JOB = "(metrics)"


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing reconciliation decided to do to one router.

    add:    render, write and (re)start, through manager.add_router
    start:  its files are current but its conntrackd is not running: start it and
            restore its state
    remove: stop its conntrackd and delete its directory
    """

    kind: str
    router_id: str
    spec: RouterSpec | None = None


def desired_routers(configured, neutron_owned, neutron_specs):
    """The routers this node should run: {router_id: spec}.

    configured: specs under routers/; neutron_owned: those Neutron's files added;
    neutron_specs: Neutron's files, a spec or None where the file is unreadable
    (the router then stays as it is rather than being removed on a bad write).
    """
    desired = {router_id: spec for router_id, spec in configured.items()
               if router_id not in neutron_owned}
    for router_id, spec in neutron_specs.items():
        kept = spec if spec is not None else configured.get(router_id)
        if kept is not None:
            desired[router_id] = kept
    return desired


def reconcile_plan(desired, configured, running, rerender=False):
    """The actions that take configured and running to desired, in a stable order.

    rerender (on SIGHUP, the options may have changed) adds every desired router
    again: add_router rewrites only what changed and restarts conntrackd only if
    its configuration did.
    """
    actions = []
    for router_id, spec in sorted(desired.items()):
        if rerender or configured.get(router_id) != spec:
            actions.append(Action("add", router_id, spec))
        elif router_id not in running:
            actions.append(Action("start", router_id, spec))
    for router_id in sorted(configured.keys() - desired.keys()):
        actions.append(Action("remove", router_id))
    return tuple(actions)


def restore_steps(last_role):
    """What a freshly (re)started conntrackd needs, given the router's last role.

    A new conntrackd has empty caches. On the primary it reads the kernel's table
    (-R) and sends all of it to the backups (-B), whose replica it refreshes; on a
    backup it asks the primary for its whole table (-n). Otherwise there is nothing
    to restore: without a recorded role the next transition sets things up.
    """
    if last_role is Role.PRIMARY:
        return (failover.RESYNC_FROM_KERNEL, failover.BULK_SEND)
    if last_role is Role.BACKUP:
        return (failover.REQUEST_RESYNC,)
    return ()


def recorded_role(last_record):
    """The role of a last-transition record, or None."""
    try:
        return Role(last_record["role"])
    except (TypeError, KeyError, ValueError):
        return None


# -- reading the state path (thin edges) ----------------------------------------------


def read_configured(state_path):
    """({router_id: spec} under routers/, {ids added from Neutron's files})."""
    directory = statedir.routers_directory(state_path)
    configured, neutron_owned = {}, set()
    if not directory.is_dir():
        return configured, neutron_owned
    for entry in sorted(os.listdir(directory)):
        try:
            spec = load_spec_file(directory / entry / "spec.json")
            if spec is None:
                continue
            configured[check_router_id(entry)] = spec
        except InvalidInput as error:
            LOG.error("router %s: ignoring its spec.json: %s", entry, error)
            continue
        if (directory / entry / NEUTRON_MARKER).exists():
            neutron_owned.add(entry)
    return configured, neutron_owned


def read_neutron_specs(state_path):
    """{router_id: spec or None} from neutron/<id>.json; None marks a bad file."""
    directory = statedir.check_state_path(state_path) / NEUTRON_DIRECTORY
    specs = {}
    if not directory.is_dir():
        return specs
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        router_id = entry[:-len(".json")]
        try:
            spec = load_spec_file(directory / entry)
            if spec is None:  # removed meanwhile
                continue
            if spec.router_id != check_router_id(router_id):
                raise InvalidInput("router", spec.router_id,
                                   f"does not match its file name {entry}")
        except InvalidInput as error:
            LOG.error("ignoring %s: %s", directory / entry, error)
            spec = None
        specs[router_id] = spec
    return specs


def load_spec_file(path):
    """The RouterSpec in a JSON file, None if there is no file; InvalidInput if bad.

    Parsed and checked once per version of the file (inode, mtime, size): a full
    reconciliation of hundreds of routers then costs a stat per file.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    return _parse_spec_file(str(path), status.st_ino, status.st_mtime_ns,
                            status.st_size)


@functools.lru_cache(maxsize=4096)
def _parse_spec_file(path, inode, mtime_ns, size):
    return RouterSpec.from_dict(statedir.read_json(path))


def running_daemons(conf, configured):
    """{router_id: pid} of the configured routers whose conntrackd runs."""
    return {router_id: process.pid for router_id, process
            in manager.running_conntrackd(conf, configured).items()}


# -- jobs (run on the pool) -----------------------------------------------------------


def add(conf, spec, snat_sync_command, from_neutron):
    """manager.add_router, then restore the state if conntrackd was (re)started.

    Jobs that start conntrackd return a true value; the main loop then looks up the
    new processes of all such routers in one pass over the process table.
    """
    result = manager.add_router(conf, spec, snat_sync_command)
    files = result.rendered.files
    if from_neutron:
        statedir.write_atomically(files.directory / NEUTRON_MARKER, "")
    if result.conntrackd_started:
        daemon = manager.daemon_for(conf, spec, files)
        with failover.transition_lock(files.transition_lock,
                                      conf.failover.lock_timeout):
            restore(conf, daemon, files)
    return result.pid


def start(conf, spec):
    """Start a router's conntrackd that is not running, and restore its state.

    Under the router's transition lock, so no transition runs against a
    half-restored daemon and the role read here is the one the restore acts on.
    """
    files = manager.router_files(conf, spec.router_id)
    daemon = manager.daemon_for(conf, spec, files)
    with failover.transition_lock(files.transition_lock, conf.failover.lock_timeout):
        if statedir.read_json(files.spec) is None:
            LOG.info("router %s was removed meanwhile; not starting it",
                     spec.router_id)
            return False
        if daemon.start(conf.conntrackd.scheduler):
            LOG.warning("router %s: conntrackd was not running; started it",
                        spec.router_id)
            restore(conf, daemon, files)
    return True


def restore(conf, daemon, files):
    """Run restore_steps for the recorded role; the caller holds the lock."""
    role = recorded_role(statedir.read_json(files.last_transition))
    for step in restore_steps(role):
        daemon.control(*step.arguments, timeout=conf.conntrackd.control_timeout)
    if role is not None:
        LOG.info("router %s: restored conntrackd state as %s", files.directory.name,
                 role.value)


def transition(conf, router_id, role, arrived):
    """The watcher's trigger: the same serialised transition keepalived's runs."""
    record = manager.notify(conf, router_id, [role.value], arrived, skip_if_done=True)
    LOG.info("router %s: %s transition from the address watcher: %s", router_id,
             role.value, record.outcome)


# -- health checks (run on the pool) ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HealthState:
    """What a router's health checks carry from one to the next."""

    memory: repair.Memory = repair.Memory()
    recent_repairs: tuple = ()
    # health.json: when it was last written, and what it said then (see check).
    written: float = float("-inf")
    summary: tuple = ()


def check(conf, spec, files, pid, peer_reports, state, channel):
    """One health check of one router: observe, report, assess, repair, record.

    Returns the HealthState for the next check.
    """
    daemon = manager.daemon_for(conf, spec, files)
    last = statedir.read_json(files.last_transition)
    role = recorded_role(last)
    observation = observe(conf, daemon, pid, role.value if role else "unknown")
    if channel is not None and observation.internal is not None:
        channel.send(reports_module.encode_report(
            spec.router_id, observation.role, last.get("arrived") if role else None,
            observation.internal, observation.external, observation.kernel,
            time.time()))
    assessment = repair.assess(observation, peer_reports, spec.peer_addresses,
                               state.memory, repair.Settings.from_conf(conf))
    _log_problem_changes(spec.router_id, state.memory, assessment.problems)
    recent = list(state.recent_repairs)
    for planned in assessment.repairs:
        recent.append(run_repair(conf, daemon, files, planned, observation.role))
    recent = tuple(recent[-RECENT_REPAIRS:])
    summary = (observation.role,
               tuple((address, report.role) for address, report
                     in sorted(peer_reports.items())),
               tuple(problem.kind for problem in assessment.problems), len(recent))
    written = state.written
    if summary != state.summary or observation.at - written >= health_file_period(conf):
        write_health(conf, files, observation, peer_reports, assessment.problems,
                     recent)
        written = observation.at
    if statedir.rotate_log(files.log_file, conf.conntrackd.log_max_bytes,
                           conf.conntrackd.log_backups):
        LOG.info("router %s: rotated %s", spec.router_id, files.log_file)
    return HealthState(assessment.memory, recent, written, summary)


def check_all(conf, checks):
    """Check the routers one after another; {router_id: HealthState}.

    checks: (router_id, the arguments of check after conf). One job for all
    routers, not one each: hundreds of small jobs spread over the pool's threads
    cost more than twice the CPU of the checks themselves (measured: 3.6 % of a
    core for 100 routers every 3 s, against 1.4 % in one thread). A router whose
    check fails keeps its state and is checked again next time.
    """
    states = {}
    for router_id, arguments in checks:
        try:
            states[router_id] = check(conf, *arguments)
        except (SnatSyncError, OSError) as error:
            LOG.error("router %s: health check failed: %s", router_id, error)
        except Exception:
            LOG.exception("router %s: health check failed", router_id)
    return states


def health_file_period(conf):
    """How often health.json is rewritten when nothing in it but figures changed.

    Rewriting it costs more CPU than the rest of a check (about 0.4 ms): with
    hundreds of routers it is kept to every HEALTH_FILE_PERIOD seconds, and
    written at once when a role, peer's role, problem or repair changes.
    """
    return max(conf.health.check_interval, HEALTH_FILE_PERIOD)


def write_health(conf, files, observation, peer_reports, problems, recent_repairs):
    """health.json for `snat-sync status` (read back by health.parse_report)."""
    statedir.write_json(files.health, {
        "checked": observation.at,
        # Readers judge freshness by it: the file is rewritten at least this often.
        "interval": health_file_period(conf),
        "role": observation.role,
        "peers": [{"address": report.address, "role": report.role,
                   "seen": report.received, "internal": report.internal,
                   "external": report.external, "kernel": report.kernel}
                  for _address, report in sorted(peer_reports.items())],
        "problems": [problem.to_dict() for problem in problems],
        "repairs": list(recent_repairs),
    }, durable=False)


def observe(conf, daemon, pid, role):
    """The router's figures now, from its conntrackd's control socket and /proc."""
    timeout = conf.conntrackd.control_timeout
    cache = daemon.cache_stats(timeout=timeout)
    network_text = daemon.stats("network", timeout=timeout) if cache else None
    network = (conntrackd_module.parse_network_stats(network_text)
               if network_text else None)
    return repair.Observation(
        at=time.time(),
        role=role,
        conntrackd_alive=cache is not None or daemon.process() is not None,
        internal=cache.internal_active if cache else None,
        external=cache.external_active if cache else None,
        kernel=namespace.kernel_entry_count(pid) if pid else None,
        messages_lost=network.messages_lost if network else None,
        messages_malformed=network.messages_malformed if network else None,
    )


def run_repair(conf, daemon, files, planned, role):
    """Carry one repair out under the transition lock; record and log it.

    A transition that ran since the check changed what is right: if the role is
    no longer the one the repair was decided for, it is skipped.
    """
    router_id = files.directory.name
    record = {"kind": "repair", "repair": planned.name, "router": router_id,
              "role": role, "reason": planned.reason, "started": time.time(),
              "steps": []}
    with failover.transition_lock(files.transition_lock, conf.failover.lock_timeout):
        current = recorded_role(statedir.read_json(files.last_transition))
        if (current.value if current else "unknown") != role:
            record["outcome"] = "skipped"
            record["error"] = f"the router became {current.value if current else '?'}"
        else:
            for step in planned.steps:
                record["steps"].append(dataclasses.asdict(
                    failover.run_step(step, daemon, conf)))
            failed = [step for step in record["steps"] if not step["ok"]]
            record["outcome"] = "failed" if failed else "done"
            if failed:
                record["error"] = f"{failed[0]['name']}: {failed[0]['error']}"
        record["finished"] = time.time()
        history.record_repair(files, record, conf.failover.history_size)
    timings = ", ".join(f"{step['name']} {step['duration_ms']:.1f} ms"
                        for step in record["steps"])
    LOG.log(logging.INFO if record["outcome"] == "done" else logging.ERROR,
            "router %s: repair %s %s in %.1f ms (%s): %s%s", router_id, planned.name,
            record["outcome"], (record["finished"] - record["started"]) * 1000,
            timings or "no steps", planned.reason,
            f"; {record['error']}" if "error" in record else "")
    return record


def _log_problem_changes(router_id, memory, problems):
    """One line when a problem appears, one when it is gone."""
    before = {kind for kind, _since in memory.since}
    now = {problem.kind for problem in problems}
    for problem in problems:
        if problem.kind not in before:
            LOG.log(logging.ERROR if problem.severity == repair.BROKEN
                    else logging.WARNING, "router %s: %s: %s", router_id,
                    problem.kind, problem.message)
    for kind in sorted(before - now):
        LOG.info("router %s: %s: resolved", router_id, kind)


def write_metrics_textfile(path, snapshot_source):
    metrics.write_textfile(path, snapshot_source())


# -- the daemon -------------------------------------------------------------------------


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
    peer_reports: dict = dataclasses.field(default_factory=dict)
    health: HealthState = HealthState()


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
        self.tracked = {}
        self.jobs = collections.defaultdict(collections.deque)
        self.busy = set()
        self.lock = threading.Lock()
        self.results = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_read, selectors.EVENT_READ, ("wake", None))
        self.reload_requested = False
        self.stop_requested = False
        self.spec_stamp = None
        self.namespace_stamp = None
        self.last_full = 0.0
        self.next_check = 0.0
        self.metrics_server = None
        self.metrics_lock = threading.Lock()
        self.metrics_cache = (float("-inf"), None)

    # -- main loop ---------------------------------------------------------------

    def run(self):
        _raise_open_files_limit()
        previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_signal),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal),
                    signal.SIGINT: signal.signal(signal.SIGINT, self._on_signal)}
        LOG.info("snat-sync daemon started, state path %s", self.conf.state_path)
        try:
            self._serve_metrics()
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
            elif kind == "exit":
                self._on_exit(router_id)
            elif kind == "watch":
                self._on_address_event(router_id)
            elif kind == "report":
                self._on_reports(router_id)
        self._collect_results()

    def _reconcile_if_due(self):
        spec_stamp = _stamp(os.path.join(self.conf.state_path, "routers"),
                            os.path.join(self.conf.state_path, NEUTRON_DIRECTORY))
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
                self._ensure_namespace_sockets(router_id, tracked.spec)

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
        configured, neutron_owned = read_configured(self.conf.state_path)
        neutron_specs = read_neutron_specs(self.conf.state_path)
        desired = desired_routers(configured, neutron_owned, neutron_specs)
        running = running_daemons(self.conf, configured)
        with self.lock:
            busy = set(self.busy)
        for router_id, pid in running.items():
            if router_id not in busy:
                self._track(router_id, configured[router_id], pid)
        for action in reconcile_plan(desired, configured, running, rerender):
            if action.router_id in busy:
                continue
            LOG.info("router %s: %s", action.router_id, action.kind)
            if action.kind == "add":
                self._submit(action.router_id, "started", add, self.conf, action.spec,
                             self.snat_sync_command, action.router_id in neutron_specs)
            elif action.kind == "start":
                self._submit(action.router_id, "started", start, self.conf,
                             action.spec)
            else:
                self._untrack(action.router_id)
                self._submit(action.router_id, "removed", manager.remove_router,
                             self.conf, action.router_id)
        for router_id in set(self.tracked) - desired.keys() - configured.keys():
            self._untrack(router_id)
        for router_id, spec in desired.items():
            if configured.get(router_id) == spec:
                self._ensure_namespace_sockets(router_id, spec)

    # -- per-router jobs -------------------------------------------------------------

    def _submit(self, router_id, outcome, function, *arguments):
        """Queue a job for the router; jobs of one router run one after another."""
        with self.lock:
            self.jobs[router_id].append((outcome, function, arguments))
            if router_id in self.busy:
                return
            self.busy.add(router_id)
        self.pool.submit(self._work, router_id)

    def _work(self, router_id):
        while True:
            with self.lock:
                if not self.jobs[router_id]:
                    del self.jobs[router_id]
                    self.busy.discard(router_id)
                    break
                outcome, function, arguments = self.jobs[router_id].popleft()
            try:
                result = function(*arguments)
            except (SnatSyncError, OSError) as error:
                LOG.error("router %s: %s failed: %s", router_id, function.__name__,
                          error)
                outcome, result = "failed", None
            except Exception:
                LOG.exception("router %s: %s failed", router_id, function.__name__)
                outcome, result = "failed", None
            self.results.put((router_id, outcome, result))
        self._wake()

    def _collect_results(self):
        started = {}
        while True:
            try:
                router_id, outcome, result = self.results.get_nowait()
            except queue.Empty:
                break
            if outcome == "checked":
                for checked, state in result.items():
                    if checked in self.tracked:
                        self.tracked[checked].health = state
            if outcome == "started" and result:
                spec = self._spec_of(router_id)
                if spec is not None:
                    started[router_id] = spec
        if not started:
            return
        running = running_daemons(self.conf, started)
        for router_id, spec in started.items():
            if router_id not in running:
                LOG.warning("router %s: conntrackd exited right after its start; "
                            "trying again at the next full reconciliation",
                            router_id)
                continue
            self._track(router_id, spec, running[router_id])
            self._ensure_namespace_sockets(router_id, spec)

    def _spec_of(self, router_id):
        try:
            return load_spec_file(manager.router_files(self.conf, router_id).spec)
        except InvalidInput:
            return None

    # -- crashes -----------------------------------------------------------------------

    def _track(self, router_id, spec, pid):
        tracked = self.tracked.get(router_id)
        if tracked is not None and tracked.spec != spec:
            self._untrack(router_id)
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

    def _untrack(self, router_id):
        tracked = self.tracked.pop(router_id, None)
        if tracked is None:
            return
        self._forget_pid(tracked)
        if tracked.watcher is not None:
            self.selector.unregister(tracked.watcher.fileno())
            tracked.watcher.close()
        self._close_channel(tracked)

    def _on_exit(self, router_id):
        tracked = self.tracked.get(router_id)
        if tracked is None or tracked.pid is None:
            return
        LOG.warning("router %s: conntrackd pid %d exited", router_id, tracked.pid)
        self._forget_pid(tracked)
        with self.lock:
            busy = router_id in self.busy
        if not busy:  # a job that stops conntrackd reports the new pid itself
            self._restart(router_id, tracked.spec)

    def _restart(self, router_id, spec):
        self._submit(router_id, "started", start, self.conf, spec)

    # -- health checks and peer reports ----------------------------------------------

    def _check_if_due(self):
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.conf.health.check_interval
        with self.lock:
            busy = set(self.busy)
        if HEALTH_JOB not in busy:
            checks = [(router_id, (tracked.spec, tracked.files, tracked.pid,
                                   dict(tracked.peer_reports), tracked.health,
                                   tracked.channel))
                      for router_id, tracked in self.tracked.items()
                      if router_id not in busy and tracked.pid is not None]
            if checks:
                self._submit(HEALTH_JOB, "checked", check_all, self.conf, checks)
        if self.conf.metrics.textfile and METRICS_JOB not in busy:
            self._submit(METRICS_JOB, "metrics", write_metrics_textfile,
                         self.conf.metrics.textfile, self._metrics_snapshot)

    def _ensure_namespace_sockets(self, router_id, spec):
        self._ensure_watcher(router_id, spec)
        self._ensure_channel(router_id, spec)

    def _ensure_channel(self, router_id, spec):
        tracked = self.tracked.get(router_id)
        if tracked is None:
            return
        inode = namespace.namespace_inode(spec.namespace)
        if tracked.channel is not None and tracked.channel_namespace == inode:
            return
        self._close_channel(tracked)
        if inode is None:
            return
        port = reports_module.report_port(self.conf.health.base_port, spec.vrid)
        try:
            channel = reports_module.ReportChannel(spec, port)
        except Exception as error:  # pyroute2 and bind raise a variety of errors
            LOG.error("router %s: cannot open the report socket on %s port %d in "
                      "namespace %s: %s", router_id, spec.local_address, port,
                      spec.namespace, error)
            return
        tracked.channel, tracked.channel_namespace = channel, inode
        self.selector.register(channel.fileno(), selectors.EVENT_READ,
                               ("report", router_id))

    def _close_channel(self, tracked):
        if tracked.channel is not None:
            self.selector.unregister(tracked.channel.fileno())
            tracked.channel.close()
        tracked.channel = tracked.channel_namespace = None

    def _on_reports(self, router_id):
        tracked = self.tracked[router_id]
        try:
            received = tracked.channel.read(time.time())
        except OSError as error:
            LOG.error("router %s: reading peer reports failed: %s", router_id, error)
            self._close_channel(tracked)
            return
        for report in received:
            tracked.peer_reports[report.address] = report

    # -- metrics ----------------------------------------------------------------------

    def _serve_metrics(self):
        port = self.conf.metrics.listen_port
        if not port:
            return
        try:
            self.metrics_server = metrics.serve(
                self.conf.metrics.listen_address, port, self._metrics_snapshot)
        except SnatSyncError as error:
            LOG.error("metrics not served: %s", error)
            return
        LOG.info("serving metrics on %s port %d", self.conf.metrics.listen_address,
                 port)

    def _metrics_snapshot(self):
        """The metrics' figures, gathered at most every METRICS_PERIOD seconds (or
        health check interval, if longer): each gathering asks every router's
        conntrackd again, and Prometheus scrapes every 15 s or more."""
        with self.metrics_lock:
            gathered_at, snapshot = self.metrics_cache
            period = max(self.conf.health.check_interval, METRICS_PERIOD)
            if time.monotonic() - gathered_at >= period:
                try:
                    snapshot = metrics.gather(self.conf, read_addresses=False)
                except (SnatSyncError, OSError) as error:
                    LOG.error("gathering the metrics failed: %s", error)
                    if snapshot is None:
                        raise
                    return snapshot
                self.metrics_cache = (time.monotonic(), snapshot)
            return snapshot

    # -- the role watcher -------------------------------------------------------------

    def _ensure_watcher(self, router_id, spec):
        tracked = self.tracked.get(router_id)
        if tracked is None or spec.primary_address is None:
            return
        inode = namespace.namespace_inode(spec.namespace)
        current = tracked.watcher
        if current is not None and current.namespace_inode == inode:
            return
        if current is not None:  # the namespace was deleted or re-created
            self.selector.unregister(current.fileno())
            current.close()
            tracked.watcher = None
        if inode is None:
            return
        try:
            watcher = watcher_module.RoleWatcher(spec, inode)
            holds = watcher.holds_primary_address()
        except Exception as error:  # pyroute2 raises a variety of errors
            LOG.error("router %s: cannot watch namespace %s: %s", router_id,
                      spec.namespace, error)
            return
        tracked.watcher = watcher
        self.selector.register(watcher.fileno(), selectors.EVENT_READ,
                               ("watch", router_id))
        # Where the address is now is the role to be in; without a notify hook
        # (Neutron) this is also what raises the guard on a new backup and asks
        # the primary for its table. A transition already done is skipped.
        self._submit(router_id, "transition", transition, self.conf, router_id,
                     Role.PRIMARY if holds else Role.BACKUP, time.time())

    def _on_address_event(self, router_id):
        arrived = time.time()
        tracked = self.tracked[router_id]
        try:
            changes = tracked.watcher.read()
        except Exception as error:
            LOG.error("router %s: address watcher failed: %s", router_id, error)
            self.selector.unregister(tracked.watcher.fileno())
            tracked.watcher.close()
            tracked.watcher = None
            return
        for role in changes:
            LOG.info("router %s: primary address %s on %s", router_id,
                     "appeared" if role is Role.PRIMARY else "disappeared",
                     tracked.spec.ha_interface)
            self._submit(router_id, "transition", transition, self.conf, router_id,
                         role, arrived)

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self):
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for router_id in list(self.tracked):
            spec = self.tracked[router_id].spec
            self._untrack(router_id)
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
