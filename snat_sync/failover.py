"""The failover state machine: which steps a VRRP transition runs, and running them.

keepalived runs notify scripts fire-and-forget, so two quick transitions can reach
us in the wrong order. Every transition carries the time it arrived (taken first
thing in the notify hook); transitions of one router run one at a time under a lock
file, and one that arrived before the last recorded transition is superseded: it is
logged and skipped, so it cannot undo the newer one.

`parse_notify_arguments`, `plan` and `is_superseded` are pure; `run_transition`
is the thin edge that runs the plan against a router's conntrackd.
"""

import dataclasses
import fcntl
import logging
import math
import os
import re
import time

from snat_sync import announce
from snat_sync import connection_table
from snat_sync import conntrackd as conntrackd_module
from snat_sync import demotion
from snat_sync import guard
from snat_sync import history
from snat_sync import statedir
from snat_sync import table_transfer
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.roles import Role

LOG = logging.getLogger(__name__)


KEEPALIVED_STATES = {
    "MASTER": Role.PRIMARY,
    "BACKUP": Role.BACKUP,
    "FAULT": Role.FAULT,
    "STOP": Role.STOP,
    "DELETED": Role.STOP,
}
KEEPALIVED_TYPES = ("INSTANCE", "GROUP")


def parse_notify_arguments(arguments):
    """The role a notify call asks for.

    Accepts our own word (`primary`), or keepalived's generic notify arguments
    TYPE NAME STATE PRIORITY (`INSTANCE VR_7 MASTER 50`).
    """
    arguments = list(arguments)
    if len(arguments) == 1:
        word = arguments[0]
        for role in Role:
            if word == role.value:
                return role
        if word in KEEPALIVED_STATES:
            return KEEPALIVED_STATES[word]
        raise InvalidInput(
            "notify state", word, "must be one of primary, backup, fault, stop"
        )
    if len(arguments) == 4:
        kind, _name, state, priority = arguments
        if kind not in KEEPALIVED_TYPES:
            raise InvalidInput("notify type", kind, "must be INSTANCE or GROUP")
        if state not in KEEPALIVED_STATES:
            raise InvalidInput(
                "notify state", state, f"must be one of {', '.join(KEEPALIVED_STATES)}"
            )
        if not (priority.isascii() and priority.isdigit()) or int(priority) > 255:
            raise InvalidInput("notify priority", priority, "must be 0 to 255")
        return KEEPALIVED_STATES[state]
    raise InvalidInput(
        "notify arguments",
        " ".join(arguments),
        "expected a state (primary|backup|fault|stop) or keepalived's "
        "TYPE NAME STATE PRIORITY",
    )


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a transition.

    action is "control" (a conntrackd request with arguments), "start-daemon",
    "run-as" (conntrackd with the configuration for a role, arguments (role,)),
    "raise-guard", "lift-guard", "flush-kernel-table", "request-table" (the
    primary's whole table; arguments, conntrackd's request when the daemon's
    transfer is not used), "write-demotion" (the demotion track file, arguments
    (value,)) or "announce-addresses" (gratuitous ARPs and IPv6 neighbour
    advertisements for the namespace's addresses).
    """

    name: str
    action: str = "control"
    arguments: tuple = ()
    # Which [conntrackd] option bounds a control request: the commit and the
    # requests that walk the whole table take longer as it grows.
    timeout_option: str = "control_timeout"
    discards_replicated_entries: bool = False
    # Run again here if the notify hook ran it and it failed (conntrackd was not
    # running yet, say): only for a step that is safe to repeat.
    repeated_after_hook_failure: bool = False
    # Skipped when an earlier step of the same transition started conntrackd: a
    # new conntrackd has just read the kernel's table itself.
    redundant_after_start: bool = False


COMMIT = Step("commit", arguments=("-c",), timeout_option="commit_timeout")
LIFT_GUARD = Step("lift-guard", action="lift-guard")
FLUSH_CACHES = Step("flush-caches", arguments=("-f",),
                    discards_replicated_entries=True)
RESYNC_FROM_KERNEL = Step("resync-from-kernel", arguments=("-R",),
                          timeout_option="table_timeout", redundant_after_start=True)
BULK_SEND = Step("bulk-send", arguments=("-B",), timeout_option="table_timeout")
# The same read of the kernel's table, never skipped: what a bulk send after it
# sends must include every entry, also those created while conntrackd restarted.
RESYNC_BEFORE_BULK = dataclasses.replace(RESYNC_FROM_KERNEL, redundant_after_start=False)
ENSURE_RUNNING = Step("ensure-running", action="start-daemon")
RUN_AS_PRIMARY = Step("run-as-primary", action="run-as", arguments=(Role.PRIMARY,))
RUN_AS_BACKUP = Step("run-as-backup", action="run-as", arguments=(Role.BACKUP,))
RAISE_GUARD = Step("raise-guard", action="raise-guard")
SHORTEN_TIMERS = Step("shorten-timers", arguments=("-t",))
# The whole table from the primary: with warm standby from its node daemon,
# batched into the kernel (table_transfer.py), else conntrackd's resync (-n).
REQUEST_RESYNC = Step("request-resync", action="request-table", arguments=("-n",))
FORGET_OWN_ENTRIES = Step("forget-own-entries", arguments=("-f", "internal"),
                          repeated_after_hook_failure=True)
FLUSH_KERNEL_TABLE = Step("flush-kernel-table", action="flush-kernel-table",
                          timeout_option="table_timeout")
ANNOUNCE_ADDRESSES = Step("announce-addresses", action="announce-addresses")
DEMOTE = Step("demote", action="write-demotion", arguments=(demotion.DEMOTED,))
LIFT_DEMOTION = Step("lift-demotion", action="write-demotion",
                     arguments=(demotion.NOT_DEMOTED,))


HOOK_STEP_NAMES = (COMMIT.name, LIFT_GUARD.name, FORGET_OWN_ENTRIES.name)
# A log offset is a file size in bytes: ASCII digits, at most what a file can hold.
_LOG_OFFSET = re.compile(r"[0-9]{1,19}")
MAX_LOG_OFFSET = 2**63 - 1
WARM = "warm"
COLD = "cold"


def plan(role, standby_mode=WARM, resync_on_backup=True, guard=True, demote=False,
         other_backups=False):
    """The steps that take a router's conntrackd into role, in order.

    Warm standby (replicated entries live in the backups' kernel tables):
    primary: the table is complete already; run conntrackd with the primary's
             configuration (a backup's reads no conntrack events unless [failover]
             backup_reads_events, see render.conntrackd_settings; then the
             restart reads the kernel's table into conntrackd's own cache), so
             that conntrackd reports its changes and ends and can answer a
             backup's request for the whole table. The data plane does not wait
             for it. If conntrackd already ran that configuration (with
             backup_reads_events both are the same), it reads the table again
             (-R). Nothing is sent on its own initiative: a node that becomes
             backup empties its table and asks for it (at 1,000,000 entries a
             bulk send besides would cross the HA network twice). But with
             other_backups (RouterSpec.has_one_peer false: another backup may
             live on and will ask for nothing) the restart into the primary's
             configuration leaves a gap: entries created while no conntrackd
             read events reach those backups only when they change. Then it
             reads the table again (-R, not skipped) and sends all of it (-B).
    backup:  run conntrackd with the backup's configuration; forget the entries
             it held as its own (-f internal), or their ends would be sent to the
             primary and delete live entries there; empty the kernel table and ask
             the primary for its whole one (-n), so that whatever the node held
             before (a table from before a crash or partition, its own flows as
             the old primary) the replica is exactly the primary's.
    fault, stop: this node forwards nothing and speaks for no entry: forget its own.

    Cold standby (replicated entries wait in conntrackd's external cache):
    primary: put the replicated entries into the kernel and lift the guard, then
             start over from the kernel's table and send all of it to the peers.
    backup:  make sure the daemon runs, raise the guard, let entries this node
             forwarded as primary expire (PurgeTimeout), and ask the primary for
             its whole table.
    fault, stop: raise the guard, let entries expire.

    Without resync_on_backup a backup neither asks for the table nor, with warm
    standby, empties its own (it would stay empty).

    demote (demote_while_resyncing, either mode): a backup first demotes itself
    (its replica is about to be resynced; the daemon's health check lifts the
    demotion once it is complete), a primary first lifts its demotion.
    """
    steps = _plan(role, standby_mode, resync_on_backup, guard, other_backups)
    if demote and role is Role.PRIMARY:
        return (LIFT_DEMOTION, *steps)
    if demote and role is Role.BACKUP:
        return (DEMOTE, *steps)
    return steps


def _plan(role, standby_mode, resync_on_backup, guard, other_backups):
    if standby_mode == WARM:
        if role is Role.PRIMARY and other_backups:
            return (RUN_AS_PRIMARY, RESYNC_BEFORE_BULK, BULK_SEND)
        if role is Role.PRIMARY:
            return (RUN_AS_PRIMARY, RESYNC_FROM_KERNEL)
        if role is Role.BACKUP:
            return (RUN_AS_BACKUP, FORGET_OWN_ENTRIES,
                    *(FLUSH_KERNEL_TABLE, REQUEST_RESYNC) * resync_on_backup)
        return (FORGET_OWN_ENTRIES,)
    if role is Role.PRIMARY:
        return (COMMIT, *(LIFT_GUARD,) * guard, FLUSH_CACHES, RESYNC_FROM_KERNEL,
                BULK_SEND)
    steps = (*(ENSURE_RUNNING,) * (role is Role.BACKUP), *(RAISE_GUARD,) * guard,
             SHORTEN_TIMERS)
    if role is Role.BACKUP and resync_on_backup:
        steps += (REQUEST_RESYNC,)
    return steps


def is_superseded(latest_arrival, arrived):
    """True if a transition that arrived at `arrived` is older than the newest one
    that has taken the router's lock (a statedir.LatestArrival, or None)."""
    return latest_arrival is not None and latest_arrival.at > arrived


def is_already_done(last_record, role, latest_arrival=None):
    """True if the last transition took the router into role and succeeded, and
    nothing has changed the router since.

    Two triggers report the same VRRP change (keepalived's notify and the daemon's
    address watcher); whichever comes second finds the work done. A MASTER hook
    whose own transition was then superseded has committed and lifted the guard
    unrecorded; its arrival, newer than the last record's and not one that only
    confirmed, says so.
    """
    return (bool(last_record) and last_record.get("role") == role.value
            and last_record.get("outcome") == "done"
            and (latest_arrival is None or latest_arrival.confirmed_only
                 or latest_arrival.at <= last_record.get("arrived", 0)))


def commit_problems(commit, expected):
    """What went wrong with a commit, judged from its log lines and the cache size.

    conntrackd -c exits 0 even when entries fail; `expected` is the external cache's
    size after the commit (it still holds every replicated entry until the flush).
    """
    if commit is None:
        return ["conntrackd logged no commit"]
    problems = []
    if commit.failed:
        problems.append(f"{commit.failed} of {expected} entries could not be committed")
    accounted = (commit.committed or 0) + commit.already_present + commit.failed
    if expected is not None and accounted < expected:
        problems.append(f"only {accounted} of {expected} replicated entries were "
                        "accounted for by the commit")
    return problems


@dataclasses.dataclass(frozen=True)
class HookStep:
    """A step the notify hook already ran before handing over to Python."""

    name: str
    started: float
    finished: float
    exit_status: int
    # The size of conntrackd.log right before the hook's commit (a 5th field): the
    # commit's block is what the log gained after it. None from a hook rendered
    # before the field existed, or for a step that is not the commit.
    log_offset: int | None = None

    @classmethod
    def parse(cls, text):
        fields = text.split(",")
        offset = None
        if len(fields) == 5:
            offset = fields.pop()
            if not (_LOG_OFFSET.fullmatch(offset) and int(offset) <= MAX_LOG_OFFSET):
                raise InvalidInput("hook step", text,
                                   f"log offset {offset!r} must be 0 to "
                                   f"{MAX_LOG_OFFSET} (bytes)")
            offset = int(offset)
        try:
            name, started, finished, status = fields
            step = cls(name, float(started), float(finished), int(status), offset)
        except ValueError:
            raise InvalidInput(
                "hook step", text,
                "expected NAME,STARTED,FINISHED,EXIT_STATUS[,LOG_OFFSET]"
            ) from None
        if offset is not None and step.name != COMMIT.name:
            raise InvalidInput("hook step", text,
                               f"only the {COMMIT.name} step has a log offset")
        if step.name not in HOOK_STEP_NAMES:
            raise InvalidInput("hook step", text,
                               f"the hook runs only {', '.join(HOOK_STEP_NAMES)}")
        if not (math.isfinite(step.started) and math.isfinite(step.finished)
                and step.started <= step.finished):
            raise InvalidInput("hook step", text, "times must be finite and in order")
        if not 0 <= step.exit_status <= 255:
            raise InvalidInput("hook step", text, "exit status must be 0 to 255")
        return step


@dataclasses.dataclass
class StepRecord:
    name: str
    started: float
    duration_ms: float
    ok: bool
    error: str | None = None
    run_by: str = "snat-sync"
    started_conntrackd: bool = False
    skipped: str | None = None  # why a step that was not needed did not run


@dataclasses.dataclass
class TransitionRecord:
    router: str
    role: str
    arrived: float
    started: float
    finished: float | None = None
    outcome: str = "running"
    steps: list = dataclasses.field(default_factory=list)
    commit: dict | None = None
    errors: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        return dataclasses.asdict(self)


def run_transition(router_id, role, daemon, files, options, arrived, hook_steps=(),
                   skip_if_done=False, other_backups=False):
    """Run the plan for role against daemon under the router's transition lock
    (other_backups: see plan).

    Returns the TransitionRecord. A superseded transition, or with skip_if_done one
    whose role the last transition already reached, runs nothing and leaves
    last-transition.json alone; every transition goes into the router's history
    and counters (history.py), under the lock.
    """
    done_by_hook = {step.name: step for step in hook_steps}
    # To the microsecond, as the hook's $EPOCHREALTIME and the latest-arrival file
    # hold it: compared with the file, an arrival must read back as itself.
    arrived = round(arrived, 6)
    with transition_lock(files.transition_lock, options.failover.lock_timeout):
        record = TransitionRecord(router_id, role.value, arrived, time.time())
        last = statedir.read_json(files.last_transition)
        latest_arrival = statedir.read_latest_arrival(files.latest_arrival)
        if is_superseded(latest_arrival, arrived):
            record.outcome = "superseded"
            record.finished = time.time()
            LOG.warning(
                "router %s: %s transition that arrived at %.6f skipped: a transition "
                "that arrived at %.6f has run", router_id, role.value, arrived,
                latest_arrival.at,
            )
            history.record_transition(files, record.to_dict(),
                                      options.failover.history_size)
            return record
        already_done = skip_if_done and is_already_done(last, role, latest_arrival)
        if latest_arrival is None or arrived > latest_arrival.at:
            statedir.write_latest_arrival(
                files.latest_arrival, statedir.LatestArrival(arrived, already_done))
        if already_done:
            record.outcome = "already-done"
            record.finished = time.time()
            LOG.info("router %s: already %s, nothing to do", router_id, role.value)
            history.record_transition(files, record.to_dict(),
                                      options.failover.history_size)
            return record
        commit_failed = False
        started_conntrackd = False
        log_offset = None
        steps = plan(role, options.failover.standby_mode,
                     options.failover.resync_on_backup,
                     options.failover.reset_window_guard,
                     options.failover.demote_while_resyncing,
                     other_backups)
        for step in steps:
            if step.discards_replicated_entries and commit_failed:
                step_record = StepRecord(step.name, time.time(), 0.0, False,
                                         "skipped: it would discard the entries "
                                         "the commit left out")
            elif step.redundant_after_start and started_conntrackd:
                step_record = skipped_after_start(step)
            elif step.name in done_by_hook and not (
                    step.repeated_after_hook_failure
                    and done_by_hook[step.name].exit_status != 0):
                step_record = _hook_step_record(done_by_hook[step.name])
                log_offset = done_by_hook[step.name].log_offset
            else:
                if step is COMMIT:
                    log_offset = _log_size(daemon.files.log_file)
                step_record = run_step(step, daemon, options)
            record.steps.append(step_record)
            started_conntrackd |= step_record.started_conntrackd
            if not step_record.ok:
                record.errors.append(f"{step.name}: {step_record.error}")
            if step is COMMIT:
                problems = _check_commit(record, daemon,
                                         options.conntrackd.commit_timeout,
                                         log_offset)
                commit_failed = not step_record.ok or bool(problems)
        record.finished = time.time()
        record.outcome = "failed" if record.errors else "done"
        statedir.write_json(files.last_transition, record.to_dict())
        history.record_transition(files, record.to_dict(),
                                  options.failover.history_size)
    _log_record(record)
    return record


def _log_size(path):
    """The size of the file at path in bytes; 0 if it is missing or unreadable."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _check_commit(record, daemon, timeout=None, log_offset=None):
    """Account for the commit in the record; return what went wrong with it.

    Only the commit block the log gained since log_offset (its size right before
    the commit) is this commit's: an earlier failover's block stays in the log, and
    a commit that exits 0 may log nothing. log_offset None (a hook rendered before
    the hook passed it) reads the log's last block. A commit that failed to reach
    conntrackd logged nothing, and is not read at all.
    """
    commit_ran = record.steps[-1].ok
    commit = None
    if commit_ran:
        commit = conntrackd_module.parse_last_commit(
            statedir.read_text(daemon.files.log_file, log_offset or 0) or "")
    stats = daemon.cache_stats(timeout=timeout)
    expected = stats.external_active if stats else None
    record.commit = {**(dataclasses.asdict(commit) if commit else {}),
                     "expected": expected}
    problems = commit_problems(commit, expected) if commit_ran else []
    if stats and stats.external_no_space:
        problems.append(f"the external cache was full: {stats.external_no_space} "
                        "replicated entries were dropped before the failover")
    record.errors.extend(f"commit: {problem}" for problem in problems)
    return problems


def skipped_after_start(step):
    return StepRecord(step.name, time.time(), 0.0, True,
                      skipped="conntrackd was just started and has read the "
                      "kernel's table")


def run_steps(steps, daemon, options, started_conntrackd=False):
    """Run steps in order until one fails; raise SnatSyncError naming it.

    started_conntrackd: conntrackd was started right before (a restore)."""
    for step in steps:
        if step.redundant_after_start and started_conntrackd:
            continue
        record = run_step(step, daemon, options)
        if not record.ok:
            raise SnatSyncError(f"{step.name}: {record.error}")
        started_conntrackd |= record.started_conntrackd


def run_step(step, daemon, options):
    started = time.time()
    clock = time.monotonic()
    error = None
    started_conntrackd = False
    try:
        if step.action == "start-daemon":
            started_conntrackd = daemon.start(options.conntrackd.scheduler)
        elif step.action == "run-as":
            started_conntrackd = daemon.run_as(step.arguments[0],
                                               options.conntrackd.scheduler)
        elif step.action == "raise-guard":
            guard.raise_guard(daemon.namespace, daemon.files)
        elif step.action == "lift-guard":
            guard.lift_guard(daemon.namespace, daemon.files)
        elif step.action == "flush-kernel-table":
            connection_table.flush(daemon.namespace,
                                   getattr(options.conntrackd, step.timeout_option))
        elif step.action == "request-table":
            table_transfer.request_table(daemon, options, step.arguments)
        elif step.action == "announce-addresses":
            announce.announce_addresses(daemon.namespace)
        elif step.action == "write-demotion":
            try:
                demotion.write(daemon.files.demotion, step.arguments[0])
            except OSError as failure:
                raise SnatSyncError(f"cannot write {daemon.files.demotion}: "
                                    f"{failure.strerror}") from None
        else:
            daemon.control(*step.arguments,
                           timeout=getattr(options.conntrackd, step.timeout_option))
    except SnatSyncError as failure:
        error = str(failure)
    return StepRecord(step.name, started, _ms(time.monotonic() - clock),
                      error is None, error, started_conntrackd=bool(started_conntrackd))


def _hook_step_record(hook_step):
    ok = hook_step.exit_status == 0
    error = None
    if not ok:
        error = {124: "timed out", 1: "failed, or the transition lock timed out"}.get(
            hook_step.exit_status, f"exit status {hook_step.exit_status}"
        )
    return StepRecord(
        hook_step.name,
        hook_step.started,
        _ms(hook_step.finished - hook_step.started),
        ok,
        error,
        run_by="notify-hook",
    )


def _log_record(record):
    timings = ", ".join(f"{step.name} {step.duration_ms:.1f} ms" for step in record.steps)
    committed = ""
    if record.commit:
        committed = (f"; committed {record.commit.get('committed')} of "
                     f"{record.commit.get('expected')} expected, "
                     f"failed {record.commit.get('failed')}")
    level = logging.ERROR if record.errors else logging.INFO
    LOG.log(level, "router %s: %s transition %s in %.1f ms (%s)%s%s",
            record.router, record.role, record.outcome,
            _ms(record.finished - record.arrived), timings, committed,
            f"; errors: {'; '.join(record.errors)}" if record.errors else "")


def _ms(seconds):
    return round(seconds * 1000, 3)


class transition_lock:
    """An exclusive flock(2) on the router's transition lock file, with a timeout.

    flock, not fcntl locks: the notify hook takes the same lock with flock(1).
    """

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.descriptor = None

    def __enter__(self):
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                                  0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.descriptor)
                    raise SnatSyncError(
                        f"another transition holds {self.path} for more than "
                        f"{self.timeout} s"
                    ) from None
                time.sleep(0.01)

    def __exit__(self, *exc_info):
        os.close(self.descriptor)
