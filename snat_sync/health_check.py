"""The periodic health check and its repairs, run on the daemon's pool.

Every [health] check_interval the daemon checks the routers that have no job
running, one after another in one pool job (`check_all`, `check`): for each it
reads its kernel count from /proc and its conntrackd's figures from the control
socket, the latter under a short timeout (`observe`), sends them to the peers'
daemons (reports.py) even when conntrackd did not answer, lets repair.assess
decide what is wrong and what to repair, carries the repairs out under the
router's transition lock (`run_repair`), writes health.json for `snat-sync
status` (or only touches it when nothing moved), updates the demotion track
file ([failover] demote_while_resyncing, `update_demotion`), and rotates
conntrackd's log. The verdict itself is health.py's and repair.py's.
"""

import dataclasses
import logging
import os
import time

from snat_sync import conntrackd as conntrackd_module
from snat_sync import demotion
from snat_sync import failover
from snat_sync import health
from snat_sync import history
from snat_sync import manager
from snat_sync import namespace
from snat_sync import repair
from snat_sync import reports as reports_module
from snat_sync import statedir
from snat_sync.errors import SnatSyncError
from snat_sync.reconcile import recorded_role

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")

# Repairs kept in health.json for `snat-sync status`; history.jsonl keeps more.
RECENT_REPAIRS = 10
# Seconds between rewrites of a health.json whose figures alone changed.
HEALTH_FILE_PERIOD = 10.0
# Seconds the check waits for conntrackd's figures. A conntrackd busy with the
# events of a large burst answers only tens of seconds later; waiting the
# control timeout for it (10 s, twice) held up the report, so the peers heard
# nothing for as long (85 s after a 1M-entry burst), and the checks of every
# other router behind it.
STATS_TIMEOUT = 0.5
# Seconds the check waits for a transition to let go of the lock before it
# leaves the demotion file to the next check.
DEMOTION_LOCK_TIMEOUT = 1.0


@dataclasses.dataclass(frozen=True)
class HealthState:
    """What a router's health checks carry from one to the next."""

    memory: repair.Memory = repair.Memory()
    recent_repairs: tuple = ()
    # health.json: when it was last written, and what it said then (see check).
    written: float = float("-inf")
    summary: tuple = ()
    figures: tuple = ()  # the replication figures it was written with


def check(conf, spec, files, pid, peer_reports, state, channel):
    """One health check of one router: observe, report, assess, repair, record.

    Returns the HealthState for the next check.
    """
    daemon = manager.daemon_for(conf, spec, files)
    last = statedir.read_json(files.last_transition)
    role = recorded_role(last)
    observation = observe(conf, daemon, pid, role.value if role else "unknown",
                          last.get("arrived") if role else None)
    peer_reports = reports_module.current_reports(
        peer_reports, spec.peer_addresses, observation.at, conf.health.peer_timeout)
    if channel is not None:
        channel.send(reports_module.encode_report(
            spec.router_id, observation.role, observation.changed,
            observation.internal, observation.external, observation.kernel,
            time.time(), taken=observation.at, standby=observation.standby))
    assessment = repair.assess(observation, peer_reports,
                               reports_module.expected_peers(spec.peer_addresses,
                                                             peer_reports),
                               state.memory, repair.Settings.from_conf(conf))
    _log_problem_changes(spec.router_id, state.memory, assessment.problems)
    recent = list(state.recent_repairs)
    for planned in assessment.repairs:
        recent.append(run_repair(conf, daemon, files, planned, observation.role))
    recent = tuple(recent[-RECENT_REPAIRS:])
    window = health.REPORT_FRESH_CHECKS * conf.health.check_interval
    summary = (observation.role,
               tuple((address, report.role,
                      observation.at - report.received <= window)
                     for address, report in sorted(peer_reports.items())),
               tuple(problem.kind for problem in assessment.problems), len(recent))
    figures = replication_figures(observation, peer_reports)
    written, kept = state.written, state.figures
    if (summary != state.summary
            or observation.at - written >= health_file_period(conf)
            or figures_moved(kept, figures, conf.health.short_tolerance_percent)):
        write_health(conf, files, observation, peer_reports, assessment.problems,
                     recent)
        written, kept = observation.at, figures
    else:
        confirm_health(files)
    if conf.failover.demote_while_resyncing:
        update_demotion(conf, files, observation, peer_reports, last)
    if statedir.rotate_log(files.log_file, conf.conntrackd.log_max_bytes,
                           conf.conntrackd.log_backups):
        LOG.info("router %s: rotated %s", spec.router_id, files.log_file)
    return HealthState(assessment.memory, recent, written, summary, kept)


def demotion_decision(conf, observation, peer_reports, last):
    """Whether the node stays demoted: the replica as `snat-sync status` judges
    it (health.replica), from this check's figures. Pure."""
    report = health.HealthReport(
        checked=observation.at, interval=health_file_period(conf),
        role=observation.role,
        peers=tuple(health.ReportedPeer(
            report.address, report.role, report.received, report.internal,
            report.external, report.kernel, report.figures_age, report.standby)
            for _address, report in sorted(peer_reports.items())),
        problems=(), last_repair=None, check_interval=conf.health.check_interval)
    facts = health.Facts(
        spec_readable=True, namespace="", namespace_exists=True,
        conntrackd_alive=observation.conntrackd_alive, cache_full_drops=None,
        last_transition=last, role=observation.role,
        internal_cache=observation.internal, external_cache=observation.external,
        report=report, kernel_entries=observation.kernel,
        standby_mode=observation.standby,
        short_tolerance_percent=conf.health.short_tolerance_percent)
    since = last.get("arrived") if isinstance(last, dict) else None
    return demotion.decide(observation.role, health.replica(facts, observation.at),
                           since if isinstance(since, (int, float)) else None,
                           observation.at, conf.failover.demotion_timeout)


def update_demotion(conf, files, observation, peer_reports, last):
    """Write the demotion file when the decision changed it.

    Not on a node whose last transition says primary: the primary transition
    lifted the demotion, and that record may be from before a crash, while
    keepalived (init_file) has just demoted the returning node and its BACKUP
    transition is on its way. Under the transition lock, and only if no
    transition ran since `last` was read: that one wrote the file itself, and
    the next check decides on its record.
    """
    if observation.role == "primary":
        return
    value = demotion_decision(conf, observation, peer_reports, last)
    if demotion.read(files.demotion) == value:
        return
    router_id = files.directory.name
    try:
        with failover.transition_lock(files.transition_lock, DEMOTION_LOCK_TIMEOUT):
            if statedir.read_json(files.last_transition) != last:
                return
            demotion.write(files.demotion, value)
    except SnatSyncError as error:
        LOG.info("router %s: demotion left to the next check: %s", router_id, error)
        return
    LOG.info("router %s: %s", router_id,
             "demoted: the replica is incomplete" if value == demotion.DEMOTED
             else "demotion lifted: the replica is complete"
             if observation.at - (last or {}).get("arrived", observation.at)
             < conf.failover.demotion_timeout
             else "demotion lifted: demotion_timeout passed")


def replication_figures(observation, peer_reports):
    """The figures a verdict compares: this node's table and replica, and each
    peer's."""
    return ((observation.kernel, observation.internal, observation.external),
            *((address, report.kernel, report.internal, report.external)
              for address, report in sorted(peer_reports.items())))


def figures_moved(before, after, percent):
    """Whether a figure moved by more than the short tolerance since before: a
    resync in progress is then written at every check, so that `snat-sync
    status` and `wait` see it as it goes; at rest the file is only confirmed."""
    if len(before) != len(after):
        return True
    for old_row, new_row in zip(before, after):
        for old, new in zip(old_row, new_row):
            if isinstance(old, str) or isinstance(new, str):
                if old != new:
                    return True
            elif (old is None) != (new is None):
                return True
            elif old is not None and abs(new - old) > health.short_tolerance(
                    max(old, new), percent):
                return True
    return False


def confirm_health(files):
    """Mark health.json as found still right at this check: its mtime (one
    syscall; a rewrite costs more than the rest of the check)."""
    try:
        os.utime(files.health)
    except FileNotFoundError:
        pass


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
        # and a peer's figures by this (see health.HealthReport.figures_age)
        "check_interval": conf.health.check_interval,
        "role": observation.role,
        "standby": observation.standby,
        # this node's table as the peers' figures below go with it
        "table": observation.table,
        "peers": [{"address": report.address, "role": report.role,
                   "seen": report.received, "internal": report.internal,
                   "external": report.external, "kernel": report.kernel,
                   "figures_age": round(report.figures_age, 3),
                   "standby": report.standby}
                  for _address, report in sorted(peer_reports.items())],
        "problems": [problem.to_dict() for problem in problems],
        "repairs": list(recent_repairs),
    }, durable=False)


def observe(conf, daemon, pid, role, changed=None):
    """The router's figures now: the kernel count from /proc (cheap, and there
    while conntrackd is busy), the caches and sync counters from conntrackd's
    control socket if it answers within STATS_TIMEOUT, else None."""
    at = time.time()
    kernel = namespace.kernel_entry_count(pid) if pid else None
    timeout = min(STATS_TIMEOUT, conf.conntrackd.control_timeout)
    cache = daemon.cache_stats(timeout=timeout)
    network_text = daemon.stats("network", timeout=timeout) if cache else None
    network = (conntrackd_module.parse_network_stats(network_text)
               if network_text else None)
    return repair.Observation(
        at=at,
        role=role,
        conntrackd_alive=cache is not None or daemon.process() is not None,
        internal=cache.internal_active if cache else None,
        external=cache.external_active if cache else None,
        kernel=kernel,
        messages_lost=network.messages_lost if network else None,
        messages_malformed=network.messages_malformed if network else None,
        standby=conf.failover.standby_mode,
        changed=changed,
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
