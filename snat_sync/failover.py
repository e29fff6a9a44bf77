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
import enum
import fcntl
import logging
import os
import time

from snat_sync import conntrackd as conntrackd_module
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError

LOG = logging.getLogger(__name__)


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"
    FAULT = "fault"
    STOP = "stop"


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
    """One step of a transition: a conntrackd control request, or starting it."""

    name: str
    arguments: tuple = ()
    uses_commit_timeout: bool = False

    @property
    def starts_daemon(self):
        return not self.arguments


COMMIT = Step("commit", ("-c",), uses_commit_timeout=True)
FLUSH_CACHES = Step("flush-caches", ("-f",))
RESYNC_FROM_KERNEL = Step("resync-from-kernel", ("-R",))
BULK_SEND = Step("bulk-send", ("-B",))
ENSURE_RUNNING = Step("ensure-running")
SHORTEN_TIMERS = Step("shorten-timers", ("-t",))
REQUEST_RESYNC = Step("request-resync", ("-n",))


def plan(role, resync_on_backup=True):
    """The steps that take a router's conntrackd into role, in order.

    primary: put the replicated entries into the kernel, then start over from the
             kernel's table and send all of it to the peers, which are backups now.
    backup:  make sure the daemon runs, let entries this node forwarded as primary
             expire (PurgeTimeout), and ask the primary for its whole table.
    fault, stop: this node forwards nothing; let its entries expire.
    """
    if role is Role.PRIMARY:
        return (COMMIT, FLUSH_CACHES, RESYNC_FROM_KERNEL, BULK_SEND)
    if role is Role.BACKUP:
        steps = (ENSURE_RUNNING, SHORTEN_TIMERS)
        return steps + (REQUEST_RESYNC,) if resync_on_backup else steps
    return (SHORTEN_TIMERS,)


def is_superseded(last_record, arrived):
    """True if a transition that arrived at `arrived` is older than the last one run."""
    return bool(last_record) and last_record.get("arrived", 0) > arrived


@dataclasses.dataclass(frozen=True)
class HookCommit:
    """The commit the notify hook already ran before handing over to Python."""

    started: float
    finished: float
    exit_status: int

    @classmethod
    def parse(cls, text):
        try:
            started, finished, status = text.split(",")
            return cls(float(started), float(finished), int(status))
        except ValueError:
            raise InvalidInput(
                "hook commit", text, "expected STARTED,FINISHED,EXIT_STATUS"
            ) from None


@dataclasses.dataclass
class StepRecord:
    name: str
    started: float
    duration_ms: float
    ok: bool
    error: str | None = None
    run_by: str = "snat-sync"


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


def run_transition(router_id, role, daemon, files, options, arrived, hook_commit=None):
    """Run the plan for role against daemon under the router's transition lock.

    Returns the TransitionRecord; a superseded transition is returned unrecorded.
    """
    with transition_lock(files.transition_lock, options.failover.lock_timeout):
        record = TransitionRecord(router_id, role.value, arrived, time.time())
        last = statedir.read_json(files.last_transition)
        if is_superseded(last, arrived):
            record.outcome = "superseded"
            record.finished = time.time()
            LOG.warning(
                "router %s: %s transition that arrived at %.6f skipped: the %s "
                "transition that arrived at %.6f is newer",
                router_id, role.value, arrived, last.get("role"), last.get("arrived"),
            )
            return record
        for step in plan(role, options.failover.resync_on_backup):
            if step is COMMIT and hook_commit is not None:
                step_record = _hook_commit_record(hook_commit)
            else:
                step_record = _run_step(step, daemon, options)
            record.steps.append(step_record)
            if step is COMMIT:
                record.commit = _commit_outcome(daemon)
            if not step_record.ok:
                record.errors.append(f"{step.name}: {step_record.error}")
                break
        record.finished = time.time()
        record.outcome = "failed" if record.errors else "done"
        statedir.write_json(files.last_transition, record.to_dict())
    _log_record(record)
    return record


def _run_step(step, daemon, options):
    started = time.time()
    clock = time.monotonic()
    error = None
    try:
        if step.starts_daemon:
            daemon.start(options.conntrackd.scheduler)
        else:
            timeout = (options.conntrackd.commit_timeout if step.uses_commit_timeout
                       else options.conntrackd.control_timeout)
            daemon.control(*step.arguments, timeout=timeout)
    except SnatSyncError as failure:
        error = str(failure)
    return StepRecord(step.name, started, _ms(time.monotonic() - clock),
                      error is None, error)


def _hook_commit_record(hook_commit):
    ok = hook_commit.exit_status == 0
    error = None
    if not ok:
        error = {124: "timed out", 1: "conntrackd unreachable or lock timeout"}.get(
            hook_commit.exit_status, f"exit status {hook_commit.exit_status}"
        )
    return StepRecord(
        COMMIT.name,
        hook_commit.started,
        _ms(hook_commit.finished - hook_commit.started),
        ok,
        error,
        run_by="notify-hook",
    )


def _commit_outcome(daemon):
    result = conntrackd_module.parse_last_commit(
        statedir.read_text(daemon.files.log_file) or ""
    )
    return dataclasses.asdict(result) if result else None


def _log_record(record):
    timings = ", ".join(f"{step.name} {step.duration_ms:.1f} ms" for step in record.steps)
    committed = ""
    if record.commit:
        committed = (f"; committed {record.commit['committed']}, "
                     f"failed {record.commit['failed']}")
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
