"""The node manager: add, remove, transition and report the routers of this node.

Adding a router is a pipeline in four stages, and nothing touches the system before
the third:
    get config  the router spec and the options (already validated)
    verify      the namespace, interface and address exist; no other conntrackd
    generate    render conntrackd.conf, the notify hook and the keepalived snippet
    apply       write what changed, (re)start conntrackd; undo the writes on failure
"""

import dataclasses
import json
import logging
import os
import shutil
import time

import psutil

from snat_sync import conntrackd
from snat_sync import demotion
from snat_sync import failover
from snat_sync import guard
from snat_sync import health
from snat_sync import namespace
from snat_sync import refresh
from snat_sync import render
from snat_sync import statedir
from snat_sync import tcp_tracking
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.roles import Role
from snat_sync.router import RouterSpec, check_router_id

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RenderedRouter:
    """Every file of one router, as text, before anything is written."""

    spec: RouterSpec
    files: statedir.RouterFiles
    conntrackd_config: str  # the primary's; see backup_conntrackd_config
    notify_hook: str
    keepalived_snippet: str
    guard_raise: str
    guard_lift: str
    refresh_rules: str
    backup_conntrackd_config: str

    @property
    def notify_command(self):
        return str(self.files.notify_hook)

    def conntrackd_variants(self):
        return {Role.PRIMARY: self.conntrackd_config,
                Role.BACKUP: self.backup_conntrackd_config}

    def contents(self, running_as=Role.PRIMARY):
        """Path -> (content, mode), in the order they are written.

        running_as: the variant conntrackd.conf is a copy of (see
        statedir.RouterFiles.conntrackd_variant).
        """
        variants = self.conntrackd_variants()
        return {
            self.files.spec: (_spec_json(self.spec), 0o600),
            **{self.files.conntrackd_variant(role): (text, 0o600)
               for role, text in variants.items()},
            self.files.conntrackd_config: (variants[running_as], 0o600),
            self.files.guard_raise: (self.guard_raise, 0o600),
            self.files.guard_lift: (self.guard_lift, 0o600),
            self.files.refresh_rules: (self.refresh_rules, 0o600),
            self.files.notify_hook: (self.notify_hook, 0o700),
        }


@dataclasses.dataclass(frozen=True)
class AddResult:
    rendered: RenderedRouter
    changed_files: tuple
    conntrackd_started: bool
    pid: int | None

    def to_dict(self):
        return {
            "router": self.rendered.spec.router_id,
            "namespace": self.rendered.spec.namespace,
            "state_directory": str(self.rendered.files.directory),
            "conntrackd_config": str(self.rendered.files.conntrackd_config),
            "notify_command": self.rendered.notify_command,
            "keepalived_snippet": self.rendered.keepalived_snippet,
            "changed_files": [str(path) for path in self.changed_files],
            "conntrackd_started": self.conntrackd_started,
            "conntrackd_pid": self.pid,
        }


def router_files(conf, router_id):
    statedir.check_state_path(conf.state_path)
    files = statedir.RouterFiles.under(conf.state_path, check_router_id(router_id))
    files.check_socket_path()
    return files


def daemon_for(conf, spec, files):
    options = conf.conntrackd
    return conntrackd.Conntrackd(
        binary=options.binary,
        namespace=spec.namespace,
        files=files,
        control_timeout=options.control_timeout,
        start_timeout=options.start_timeout,
        stop_timeout=options.stop_timeout,
        table_timeout=options.table_timeout,
    )


def generate(conf, spec, facts, files, snat_sync_command):
    """Render every file of a router. Pure."""
    configs = {
        role: render.render_conntrackd_config(render.conntrackd_settings(
            spec, conf.conntrackd, facts, files, warm_standby=is_warm(conf), role=role,
            backup_reads_events=conf.failover.backup_reads_events))
        for role in (Role.PRIMARY, Role.BACKUP)
    }
    guard_raise, guard_lift = render.render_guard(spec, guard.TABLE)
    return RenderedRouter(
        spec=spec,
        files=files,
        conntrackd_config=configs[Role.PRIMARY],
        backup_conntrackd_config=configs[Role.BACKUP],
        notify_hook=render.render_notify_hook(
            spec.router_id,
            files,
            conf.conntrackd.binary,
            snat_sync_command,
            conf.failover.lock_timeout,
            conf.conntrackd.commit_timeout,
            spec.namespace if _uses_guard(conf) else None,
            commits=not is_warm(conf),
            forgets=is_warm(conf),
            control_timeout=conf.conntrackd.control_timeout,
        ),
        keepalived_snippet=render.render_keepalived_snippet(
            spec, str(files.notify_hook),
            render.demotion_track_file(spec, files, conf.failover)
        ),
        guard_raise=guard_raise,
        guard_lift=guard_lift,
        refresh_rules=render.render_refresh(
            spec, refresh.TABLE, render.refresh_settings(conf.failover)),
    )


def verify(spec, files):
    """Check the router against the system; return what generation needs to know."""
    facts = namespace.gather_facts(spec)
    others = conntrackd.foreign_daemons(spec.namespace, str(files.conntrackd_config))
    if others:
        described = ", ".join(
            f"pid {process.pid} ({' '.join(process.cmdline())})" for process in others
        )
        raise InvalidInput(
            "namespace",
            spec.namespace,
            f"another conntrackd already runs there: {described}. Is Neutron's "
            "in-tree conntrackd (ha_conntrackd_enabled) on for this router? Running "
            "both would corrupt the connection table; refusing",
        )
    return facts


def render_router(conf, spec, snat_sync_command):
    """What `router add` would write, without writing or starting anything."""
    files = router_files(conf, spec.router_id)
    return generate(conf, spec, verify(spec, files), files, snat_sync_command)


def add_router(conf, spec, snat_sync_command):
    """Add or reconcile a router; a repeat with the same arguments changes nothing."""
    rendered = render_router(conf, spec, snat_sync_command)
    files = rendered.files
    previous_spec = _load_spec(files)
    previous = {path: statedir.read_text(path) for path in rendered.contents()}
    is_new = not files.directory.exists()
    contents = rendered.contents(running_as=running_variant(files, previous))
    changed = [
        path for path, (content, _mode) in contents.items()
        if previous[path] != content
    ]
    daemon = daemon_for(conf, spec, files)
    config_changed = files.conntrackd_config in changed or (
        previous_spec is not None and previous_spec.namespace != spec.namespace
    )
    try:
        statedir.ensure_directory(files.directory)
        # Under the transition lock: `snat-sync daemon` restarts an exited
        # conntrackd under the same lock, and must not restart the old
        # configuration between the stop and the new files.
        with failover.transition_lock(files.transition_lock,
                                      conf.failover.lock_timeout):
            if config_changed and previous_spec is not None:
                daemon_for(conf, previous_spec, files).stop()
            for path in changed:
                content, mode = contents[path]
                statedir.write_atomically(path, content, mode)
            if (conf.failover.demote_while_resyncing
                    and demotion.read(files.demotion) is None):
                # Until a transition or a health check knows better: demoted,
                # unless it is primary (turning the option on must not move it).
                last = statedir.read_json(files.last_transition)
                demotion.write(files.demotion, demotion.NOT_DEMOTED
                               if isinstance(last, dict)
                               and last.get("role") == "primary"
                               else demotion.DEMOTED)
            started = daemon.start(conf.conntrackd.scheduler)
            # The namespace's nftables tables and sysctls follow the files: a
            # repeat with the same arguments (the daemon re-adds every router at
            # start and on SIGHUP) runs no nft or sysctl at all. A namespace
            # created anew also needs its conntrackd started, so it gets them
            # again.
            if changed or started:
                refresh.apply(spec.namespace, files)
                tcp_tracking.apply(spec.namespace, tcp_tracking.settings(conf.failover))
        if (changed or started) and not _uses_guard(conf):
            _lift_guard_if_up(spec, files)
    except BaseException:
        _undo_add(conf, spec, files, is_new, previous, previous_spec)
        raise
    if changed or started:
        LOG.info("router %s: %s; conntrackd %s", spec.router_id,
                 "wrote " + ", ".join(path.name for path in changed) if changed
                 else "files unchanged",
                 "started" if started else "already running")
    process = daemon.process()
    return AddResult(rendered, tuple(changed), started, process and process.pid)


def running_variant(files, on_disk):
    """The role whose conntrackd configuration conntrackd.conf is a copy of, judged
    from the files on disk (path -> text or None): the backup's only if it is that
    and the primary's differs. A new router's, or an unknown one, is the primary's,
    which reads conntrack events as any conntrackd does, so a router replicates
    from the start; the transitions keepalived runs as soon as it starts (and the
    restore of a restarted conntrackd) give a backup the backup's."""
    running = on_disk.get(files.conntrackd_config)
    primary = on_disk.get(files.conntrackd_variant(Role.PRIMARY))
    backup = on_disk.get(files.conntrackd_variant(Role.BACKUP))
    if running is not None and running == backup and primary != backup:
        return Role.BACKUP
    return Role.PRIMARY


def _undo_add(conf, spec, files, is_new, previous, previous_spec):
    """Leave the router as it was before a failed add."""
    if is_new:
        shutil.rmtree(files.directory, ignore_errors=True)
        _remove_refresh(spec)
        return
    for path, content in previous.items():
        if content is None:
            path.unlink(missing_ok=True)
        else:
            mode = 0o700 if path == files.notify_hook else 0o600
            statedir.write_atomically(path, content, mode)
    if previous_spec is not None:
        try:
            daemon_for(conf, previous_spec, files).start(conf.conntrackd.scheduler)
        except SnatSyncError as error:
            LOG.error("router %s: could not restart the previous conntrackd: %s",
                      previous_spec.router_id, error)


def remove_router(conf, router_id):
    """Stop the router's conntrackd and delete its directory. Idempotent."""
    files = router_files(conf, router_id)
    if not files.directory.exists():
        return False
    spec = _load_spec(files)
    # Under the transition lock: `snat-sync daemon` restarts a conntrackd that
    # exits, under the same lock, unless its spec.json is gone by then.
    with failover.transition_lock(files.transition_lock, conf.failover.lock_timeout):
        if spec is not None:
            daemon_for(conf, spec, files).stop()
            _lift_guard_if_up(spec, files)
            _remove_refresh(spec)
        for process in conntrackd.daemons_with_config(str(files.conntrackd_config)):
            LOG.warning("router %s: killing conntrackd pid %d outside its namespace",
                        router_id, process.pid)
            process.kill()
        shutil.rmtree(files.directory)
    LOG.info("router %s removed", router_id)
    return True


def is_warm(conf):
    """Warm standby: backups hold the replica in their kernel tables."""
    return conf.failover.standby_mode == "warm"


def _uses_guard(conf):
    """The guard waits for a commit; warm standby has none."""
    return conf.failover.reset_window_guard and not is_warm(conf)


def _remove_refresh(spec):
    if namespace.namespace_inode(spec.namespace) is not None:
        refresh.remove(spec.namespace)


def _lift_guard_if_up(spec, files):
    """Lift a guard an earlier configuration raised; never fail because of it."""
    if namespace.namespace_inode(spec.namespace) is None:
        return
    try:
        guard.lift_guard(spec.namespace, files)
    except guard.GuardError as error:
        LOG.warning("router %s: could not lift the reset-window guard: %s",
                    spec.router_id, error)


def notify(conf, router_id, arguments, arrived=None, hook_steps=(), skip_if_done=False):
    """Run the transition keepalived (or an operator, or the daemon) asks for."""
    role = failover.parse_notify_arguments(arguments)
    files = router_files(conf, router_id)
    spec = _load_spec(files)
    if spec is None:
        raise InvalidInput("router", router_id, f"unknown here: no {files.spec}")
    return failover.run_transition(
        router_id,
        role,
        daemon_for(conf, spec, files),
        files,
        conf,
        arrived if arrived is not None else time.time(),
        hook_steps,
        skip_if_done,
        other_backups=not spec.has_one_peer,
    )


@dataclasses.dataclass(frozen=True)
class PeerStatus:
    """A peer of the router as the node daemon last heard from its daemon."""

    address: str
    role: str  # as the peer reported it; "unknown" without a report
    last_seen: float | None
    internal_cache: int | None
    external_cache: int | None
    kernel_entries: int | None = None
    # how old its figures are now, by this node's clock; None without a report
    figures_age_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class ReplicationStats:
    """conntrackd's sync figures, counted since it started."""

    packets_sent: int
    packets_received: int
    messages_lost: int  # sequence gaps seen; FTFW asks for them again
    messages_malformed: int
    resend_queue: int  # messages waiting for a peer's acknowledgement
    cache_full_drops: int  # entries dropped because a cache was full


@dataclasses.dataclass(frozen=True)
class RouterStatus:
    router: str
    namespace: str
    role: str  # "primary", "backup" or "unknown"
    # "address": the primary address seen on the HA interface, or not;
    # "last-transition": the role of the last transition; "none"
    role_source: str
    peers: tuple[PeerStatus, ...]  # one per spec peer address, in that order
    conntrackd_pid: int | None
    conntrackd_alive: bool
    conntrackd_started: float | None  # epoch seconds
    conntrackd_uptime_seconds: float | None
    kernel_entries: int | None
    internal_cache: int | None
    external_cache: int | None
    replication: ReplicationStats | None
    last_transition: dict | None
    last_repair: dict | None  # the latest repair in health.json
    problems: tuple[str, ...]  # what health.json found, while it is fresh
    checked: float | None  # when the node daemon last checked the router
    verdict: str  # health.IN_SYNC, health.DEGRADED or health.BROKEN
    reason: str
    standby_mode: str = "cold"  # where a backup's replica lives (kernel if warm)
    # What a failover now would start from (health.Replica): on a backup its
    # replica and the primary's table as the primary last reported it; on a
    # primary the fullest peer replica and its own table. missing: the entries
    # a failover now would lose. None where a figure is unknown or stale.
    replica_entries: int | None = None
    primary_entries: int | None = None
    missing_entries: int | None = None
    # Whose conntrackd configuration runs: "primary" (reads conntrack events) or
    # "backup" (reads none); None where the two are the same (the default, and
    # cold standby).
    conntrackd_configuration: str | None = None

    def to_dict(self):
        return dataclasses.asdict(self)


def running_conntrackd(conf, specs):
    """{router_id: psutil.Process} of the routers in specs whose conntrackd runs,
    found in one pass over the process table."""
    return conntrackd.find_daemons({
        router_id: (router_files(conf, router_id).conntrackd_config, spec.namespace)
        for router_id, spec in specs.items()})


def status(conf, router_id=None, read_addresses=True, stats_timeout=None):
    """The RouterStatus of one router or of all.

    read_addresses: take a router's role from where its primary address is (a
    netlink dump in its namespace, some milliseconds each); the node daemon, whose
    watchers keep the transitions in step with the address, passes False and gets
    the role of the last transition.
    stats_timeout: seconds to wait for each conntrackd answer (default [conntrackd]
    control_timeout); `snat-sync wait` polls with a short one.
    """
    if router_id is not None:
        ids = [check_router_id(router_id)]
        if not router_files(conf, router_id).spec.exists():
            raise InvalidInput("router", router_id, "unknown here")
    else:
        ids = _router_ids(conf)
    files = {each: router_files(conf, each) for each in ids}
    specs = {each: _load_spec(files[each]) for each in ids}
    processes = running_conntrackd(conf, {each: spec for each, spec in specs.items()
                                          if spec is not None})
    return [_router_status(conf, each, files[each], specs[each], processes.get(each),
                           read_addresses, stats_timeout)
            for each in ids]


def _router_ids(conf):
    """Routers under the state path; an entry that is no valid router is skipped."""
    directory = statedir.routers_directory(conf.state_path)
    if not directory.is_dir():
        return []
    ids = []
    for path in sorted(directory.iterdir()):
        try:
            ids.append(check_router_id(path.name))
        except InvalidInput as error:
            LOG.warning("ignoring %s: %s", path, error)
    return ids


def _router_status(conf, router_id, files, spec, process, read_addresses,
                   stats_timeout=None):
    now = time.time()
    last = statedir.read_json(files.last_transition)
    last = last if isinstance(last, dict) else None
    report = health.parse_report(statedir.read_json(files.health),
                                 confirmed=_mtime(files.health))
    daemon = daemon_for(conf, spec, files) if spec else None
    kernel = namespace.kernel_entry_count(process.pid) if process else None
    stats = daemon.cache_stats(timeout=stats_timeout) if process else None
    drops = stats.internal_no_space + stats.external_no_space if stats else None
    if drops:
        LOG.error("router %s: conntrackd's cache is full (no space left in cache): "
                  "%d entries were dropped and will not survive a failover; raise "
                  "[conntrackd] hash_limit", router_id, drops)
    role, role_source = _role(spec if read_addresses else None, last)
    configuration = configuration_running(files)
    started = _started(process)
    fresh = report is not None and report.is_fresh(now)
    facts = health.Facts(
        spec_readable=spec is not None,
        namespace=spec.namespace if spec else "",
        namespace_exists=spec is not None
        and namespace.namespace_inode(spec.namespace) is not None,
        conntrackd_alive=process is not None,
        cache_full_drops=drops,
        last_transition=last,
        role=role,
        internal_cache=stats.internal_active if stats else None,
        external_cache=stats.external_active if stats else None,
        report=report,
        kernel_entries=kernel,
        standby_mode=conf.failover.standby_mode,
        short_tolerance_percent=conf.health.short_tolerance_percent,
        conntrackd_configuration=configuration,
    )
    verdict = health.judge(facts, now)
    replica = health.replica(facts, now)
    return RouterStatus(
        router=router_id,
        namespace=spec.namespace if spec else "",
        role=role,
        role_source=role_source,
        peers=tuple(_peer_status(peer, report, now)
                    for peer in _status_peers(spec, report)),
        conntrackd_pid=process.pid if process else None,
        conntrackd_alive=process is not None,
        conntrackd_started=started,
        conntrackd_uptime_seconds=max(0.0, now - started) if started else None,
        kernel_entries=kernel,
        internal_cache=stats.internal_active if stats else None,
        external_cache=stats.external_active if stats else None,
        replication=_replication(daemon, drops, stats_timeout) if stats else None,
        last_transition=last,
        last_repair=report.last_repair if report else None,
        problems=tuple(problem.message for problem in report.problems)
        if fresh else (),
        checked=report.checked if report else None,
        verdict=verdict.word,
        reason=verdict.reason,
        standby_mode=conf.failover.standby_mode,
        replica_entries=replica.replica_entries,
        primary_entries=replica.primary_entries,
        missing_entries=replica.missing_entries,
        conntrackd_configuration=configuration,
    )


def configuration_running(files):
    """"primary" or "backup": whose conntrackd configuration conntrackd.conf is a
    copy of; None if the two variants are the same (cold standby) or unreadable."""
    on_disk = {path: statedir.read_text(path) for path in (
        files.conntrackd_config, files.conntrackd_variant(Role.PRIMARY),
        files.conntrackd_variant(Role.BACKUP))}
    primary = on_disk[files.conntrackd_variant(Role.PRIMARY)]
    backup = on_disk[files.conntrackd_variant(Role.BACKUP)]
    if primary is None or backup is None or primary == backup:
        return None
    return running_variant(files, on_disk).value


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


# The role a transition leaves the node in: after FAULT or STOP it is not primary,
# and becomes backup again when keepalived recovers.
TRANSITION_ROLES = {"primary": "primary", "backup": "backup", "fault": "backup",
                    "stop": "backup"}


def _role(spec, last):
    """(role, source): where the primary address is, else the last transition."""
    if spec is not None and spec.primary_address is not None:
        held = namespace.holds_address(spec.namespace, spec.ha_interface,
                                       spec.primary_address)
        if held is not None:
            return ("primary" if held else "backup"), "address"
    role = TRANSITION_ROLES.get(last.get("role")) if last else None
    if role is not None:
        return role, "last-transition"
    return "unknown", "none"


def _started(process):
    if process is None:
        return None
    try:
        return process.create_time()
    except psutil.Error:
        return None


def _status_peers(spec, report):
    """The spec's peers; for a router without (multicast, Neutron) the peers its
    daemon learned, as its latest check wrote them."""
    if spec is not None and spec.peer_addresses:
        return tuple(map(str, spec.peer_addresses))
    return tuple(peer.address for peer in report.peers) if report else ()


def _peer_status(address, report, now):
    reported = report.peer(address) if report else None
    if reported is None:
        return PeerStatus(address, "unknown", None, None, None)
    age = report.figures_age(reported, now)
    return PeerStatus(address, reported.role, reported.seen, reported.internal,
                      reported.external, reported.kernel,
                      None if age is None else round(age, 3))


def _replication(daemon, cache_full_drops, timeout=None):
    """The sync figures; None unless conntrackd answers for both blocks."""
    network_text = daemon.stats("network", timeout)
    queue_text = daemon.stats("queue", timeout)
    if network_text is None or queue_text is None:
        return None
    network = conntrackd.parse_network_stats(network_text)
    return ReplicationStats(
        packets_sent=network.packets_sent,
        packets_received=network.packets_received,
        messages_lost=network.messages_lost,
        messages_malformed=network.messages_malformed,
        resend_queue=conntrackd.parse_queue_stats(queue_text).resend_queue,
        cache_full_drops=cache_full_drops,
    )


def _load_spec(files):
    data = statedir.read_json(files.spec)
    if data is None:
        return None
    try:
        return RouterSpec.from_dict(data)
    except (InvalidInput, KeyError) as error:
        LOG.error("ignoring unreadable %s: %s", files.spec, error)
        return None


def _spec_json(spec):
    return json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"
