"""One router's conntrackd: start it in the router's namespace, talk to it, stop it.

conntrackd is controlled through its UNIX socket, a path in the router's state
directory, so control requests work from any network namespace. Each request runs
under a timeout: conntrackd -c, for one, blocks for as long as the commit takes.

The parsers at the bottom are pure; they read what conntrackd prints and logs.
"""

import dataclasses
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import time

import psutil

from snat_sync import namespace as netns
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError

LOG = logging.getLogger(__name__)


class ConntrackdError(SnatSyncError):
    pass


@dataclasses.dataclass(frozen=True)
class Conntrackd:
    """The conntrackd of one router, as the options and its files describe it."""

    binary: str
    namespace: str
    files: object
    control_timeout: int
    start_timeout: int
    stop_timeout: int
    table_timeout: int

    def command(self, *arguments):
        return [self.binary, "-C", str(self.files.conntrackd_config), *arguments]

    # -- finding the daemon -------------------------------------------------------

    def process(self):
        """The live conntrackd serving this router's config in its namespace, if any.

        Matched by its command line (this config file) and by the namespace it runs
        in, so a daemon of another router, or one left in another namespace after a
        rename, is never taken for ours.
        """
        return find_daemon(str(self.files.conntrackd_config), self.namespace)

    def is_running(self):
        return self.process() is not None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, scheduler_policy="other"):
        """Start the daemon unless it already runs; clean up after a crashed one."""
        if self.is_running():
            return False
        self.remove_stale_files()
        LOG.info("starting conntrackd for %s in namespace %s",
                 self.files.directory.name, self.namespace)
        try:
            result = subprocess.run(
                ["ip", "netns", "exec", self.namespace,
                 *start_prefix(scheduler_policy), *self.command("-d")],
                capture_output=True,
                text=True,
                # It reads the kernel's whole table before it forks.
                timeout=self.table_timeout,
            )
        except subprocess.TimeoutExpired:
            raise ConntrackdError(
                f"conntrackd for {self.files.directory.name} did not daemonise within "
                f"{self.table_timeout} s (table_timeout)"
            ) from None
        if result.returncode != 0:
            raise ConntrackdError(
                f"conntrackd for {self.files.directory.name} failed to start "
                f"(exit {result.returncode}): "
                f"{_last_lines(result.stderr) or self.log_tail()}"
            )
        self.wait_until_answering()
        return True

    def run_as(self, role, scheduler_policy="other"):
        """Run conntrackd with the router's configuration for a node in role.

        Copies that variant to conntrackd.conf and restarts conntrackd if the one
        running was started with another; starts it if it is not running. Returns
        True if conntrackd was started: a new conntrackd has read the kernel's table
        into its own cache, and its other cache is empty.
        """
        variant = self.files.conntrackd_variant(role)
        wanted = statedir.read_text(variant)
        if wanted is None:
            raise ConntrackdError(f"{variant} is missing: run `snat-sync router add` "
                                  f"for {self.files.directory.name} again")
        running = statedir.read_text(self.files.conntrackd_config)
        if running == wanted and self.is_running():
            return False
        if running != wanted:
            LOG.info("router %s: conntrackd restarts with %s", self.files.directory.name,
                     variant.name)
            self.stop()
            statedir.write_atomically(self.files.conntrackd_config, wanted, 0o600)
        return self.start(scheduler_policy)

    def wait_until_answering(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            # The socket first: looking for the process scans /proc, which costs
            # more on a node with hundreds of conntrackd.
            if (self.files.control_socket.exists()
                    and self.control("-s", "cache", check=False).returncode == 0):
                process = self.process()
                if process is not None:
                    return process
            time.sleep(0.05)
        raise ConntrackdError(
            f"conntrackd for {self.files.directory.name} did not answer on "
            f"{self.files.control_socket} within {self.start_timeout} s: "
            f"{self.log_tail()}"
        )

    def stop(self):
        """Stop the daemon: ask it (-k), then SIGTERM, then SIGKILL. Idempotent."""
        process = self.process()
        if process is None:
            self.remove_stale_files()
            return False
        LOG.info("stopping conntrackd pid %d of %s", process.pid,
                 self.files.directory.name)
        self.control("-k", check=False)
        for escalation in (signal.SIGTERM, signal.SIGKILL):
            if _exits_within(process, self.stop_timeout):
                break
            LOG.warning("conntrackd pid %d of %s still running after %d s, sending %s",
                        process.pid, self.files.directory.name, self.stop_timeout,
                        escalation.name)
            try:
                process.send_signal(escalation)
            except psutil.NoSuchProcess:
                break
        else:
            _exits_within(process, self.stop_timeout)
        self.remove_stale_files()
        return True

    def remove_stale_files(self):
        """Remove the lock file and socket a dead daemon left behind.

        conntrackd creates its LockFile with O_EXCL and refuses to start while it
        exists. Only called when no daemon of ours is alive.
        """
        for path in (self.files.lock_file, self.files.control_socket):
            if path.exists() or path.is_symlink():
                LOG.warning("removing stale %s", path)
                path.unlink()

    # -- control ------------------------------------------------------------------

    def control(self, *arguments, timeout=None, check=True):
        """Run one control request; raise ConntrackdError if it fails and check."""
        timeout = timeout or self.control_timeout
        try:
            result = subprocess.run(
                self.command(*arguments), capture_output=True, text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            if check:
                raise ConntrackdError(
                    f"conntrackd {' '.join(arguments)} did not answer within "
                    f"{timeout} s"
                ) from None
            return subprocess.CompletedProcess(arguments, 124, "", "timed out")
        except OSError as error:
            if check:
                raise ConntrackdError(
                    f"conntrackd {' '.join(arguments)}: cannot run {self.binary}: "
                    f"{error}"
                ) from None
            return subprocess.CompletedProcess(arguments, 127, "", str(error))
        if check and result.returncode != 0:
            raise ConntrackdError(
                f"conntrackd {' '.join(arguments)} failed (exit {result.returncode}): "
                f"{_last_lines(result.stderr)}"
            )
        return result

    def stats(self, kind, timeout=None):
        """The text of one statistics block (see STATS_REQUESTS), or None if the
        daemon does not answer."""
        return query_stats(self.files.control_socket, kind,
                           timeout or self.control_timeout)

    def cache_stats(self, timeout=None):
        """Internal and external cache figures, or None if the daemon is down.

        Right after a large commit conntrackd is busy with the kernel's events for
        every entry it committed and may answer only seconds later: callers that
        need the figures then pass a longer timeout.
        """
        text = self.stats("cache", timeout)
        if text is None:
            return None
        return parse_cache_stats(text)

    def log_tail(self, lines=5):
        try:
            text = self.files.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return _last_lines(text, lines)


# conntrackd's control requests (conntrackd.h, 1.4.7) for `conntrackd -s KIND`.
STATS_REQUESTS = {"network": 28, "cache": 29, "runtime": 30, "queue": 36}
# A statistics block is a few hundred bytes; an answer this long is no answer.
MAX_STATS_SIZE = 1 << 20


def query_stats(socket_path, kind, timeout):
    """Ask conntrackd for one statistics block through its control socket.

    What `conntrackd -s KIND` does, without forking: send the request code (a
    native-endian int) and read the text until conntrackd closes the socket. About
    0.1 ms, so a node daemon can poll hundreds of routers. Returns None when the
    daemon does not answer within timeout seconds (connect and read together), or
    answers more than MAX_STATS_SIZE bytes.
    """
    if kind not in STATS_REQUESTS:
        raise InvalidInput("statistics kind", kind,
                           f"must be one of {', '.join(STATS_REQUESTS)}")
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(socket_path))
            client.sendall(struct.pack("=i", STATS_REQUESTS[kind]))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                client.settimeout(remaining)
                chunk = client.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_STATS_SIZE:
                    LOG.warning("conntrackd on %s answered more than %d bytes to "
                                "-s %s; ignored", socket_path, MAX_STATS_SIZE, kind)
                    return None
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace")


def _conntrackd_command_lines():
    """(pid, command line) of every live conntrackd on the node.

    Read straight from /proc: psutil's process_iter costs several times more, and
    the node daemon, starting hundreds of routers, looks for each one's daemon a
    few times while it starts.
    """
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = _read_proc(f"/proc/{entry.name}/stat")
            name_end = stat.rindex(b")")
            if (stat[stat.index(b"(") + 1:name_end] != b"conntrackd"
                    or stat[name_end + 2:name_end + 3] == b"Z"):
                continue
            cmdline = _read_proc(f"/proc/{entry.name}/cmdline").decode(
                errors="replace").split("\0")[:-1]
        except (OSError, ValueError):
            continue
        yield int(entry.name), cmdline


def _read_proc(path):
    """A small /proc file, without the cost of a Python file object."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.read(descriptor, 65536)
    finally:
        os.close(descriptor)


def _conntrackd_processes(matching=lambda cmdline: True):
    """Every live conntrackd whose command line matches, with the command line and
    its namespace inode."""
    for pid, cmdline in _conntrackd_command_lines():
        if not matching(cmdline):
            continue
        try:
            process = psutil.Process(pid)
        except psutil.Error:
            continue
        yield process, cmdline, netns.process_namespace_inode(pid)


def find_daemon(config_path, namespace):
    inode = netns.namespace_inode(namespace)
    for process, _cmdline, process_inode in _conntrackd_processes(
            lambda cmdline: config_path in cmdline):
        if process_inode == inode:
            return process
    return None


def find_daemons(wanted):
    """{key: process} of the conntrackd running each wanted configuration.

    wanted: {key: (config path, namespace)}. One pass over the process table for
    all of them, however many: a router's daemon runs its conntrackd.conf inside
    its namespace.
    """
    by_config = {str(config): (key, netns.namespace_inode(namespace))
                 for key, (config, namespace) in wanted.items()}
    found = {}
    for process, cmdline, inode in _conntrackd_processes(
            lambda cmdline: config_argument(cmdline) in by_config):
        key, namespace_inode = by_config[config_argument(cmdline)]
        if inode == namespace_inode:
            found[key] = process
    return found


def config_argument(cmdline):
    """The configuration file a conntrackd command line names with -C."""
    for index, argument in enumerate(cmdline[:-1]):
        if argument == "-C":
            return cmdline[index + 1]
    return None


def daemons_with_config(config_path):
    """Every conntrackd running config_path, in whatever namespace."""
    return [process for process, _cmdline, _inode in _conntrackd_processes(
        lambda cmdline: config_path in cmdline)]


def foreign_daemons(namespace, config_path):
    """conntrackd processes in the namespace that do not run our config.

    Neutron's in-tree conntrackd (ha_conntrackd_enabled) would fight ours for the
    same connection table and sync traffic.
    """
    inode = netns.namespace_inode(namespace)
    return [process for process, cmdline, process_inode in _conntrackd_processes()
            if process_inode == inode and config_path not in cmdline]


def _exits_within(process, timeout):
    """Wait for a process that is not our child; a zombie counts as exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


# setpriv (util-linux) drops the capability to change scheduling before conntrackd
# runs, and conntrackd logs this once as it starts: see start_prefix.
_WITHOUT_SYS_NICE = ("setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice")
SCHEDULER_REFUSED = "scheduler configuration failed: Operation not permitted"


def start_prefix(scheduler_policy):
    """What runs conntrackd at the scheduler policy the options ask for.

    conntrackd 1.4.7 makes itself SCHED_RR at priority 99 unless its Scheduler
    section names RR or FIFO (it accepts nothing else), and it does so before it
    reads the kernel's whole table and daemonises: at 1,000,000 entries that is
    seconds of a real-time task taking a core from the traffic of the failover
    that restarted it, and hundreds of routers on one node must not all run at
    priority 99. Without CAP_SYS_NICE its attempt fails (it logs "scheduler
    configuration failed" once and goes on at the normal scheduler), so it reads
    the table at normal priority from the start. rr and fifo keep the capability.
    """
    return _WITHOUT_SYS_NICE if scheduler_policy == "other" else ()


def _last_lines(text, lines=3):
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# -- parsers (pure) -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheStats:
    internal_active: int
    external_active: int
    internal_no_space: int
    external_no_space: int


@dataclasses.dataclass(frozen=True)
class CommitResult:
    committed: int | None
    already_present: int
    failed: int
    seconds: float | None


# Counts are bounded to 18 digits: a garbled log must not make int() fail or
# produce absurd figures.
_COUNT = r"(?<!\d)(\d{1,18})(?!\d)"
_CACHE_HEADER = re.compile(r"^cache:(internal|external)\s+active objects:\s+" + _COUNT)
_NO_SPACE = re.compile(r"no space left in cache:\s+" + _COUNT)
_COMMIT_START = "committing all external caches"
_COMMITTED = re.compile(r"Committed " + _COUNT + r" new entr")
_ALREADY_PRESENT = re.compile(_COUNT + r" entr(?:y|ies) ignored, already exist")
_CANNOT_COMMIT = re.compile(_COUNT + r" entr(?:y|ies) can't be committed")
_COMMIT_TOOK = re.compile(r"commit has taken (?<!\d)(\d{1,9}(?:\.\d{1,9})?) seconds")


@dataclasses.dataclass(frozen=True)
class NetworkStats:
    """`conntrackd -s network`: sync traffic since the daemon started."""

    packets_sent: int
    packets_received: int
    bytes_sent: int
    bytes_received: int
    send_errors: int
    receive_errors: int
    # Sequence gaps seen in the peers' messages; FTFW asks for them again, so a
    # growing count is a health signal, not a permanent loss.
    messages_lost: int
    # Messages that could not be parsed, received or about to be sent.
    messages_malformed: int


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """`conntrackd -s queue`, the FTFW resend queue (rsqueue) part."""

    resend_queue: int
    resend_queue_max: int
    resend_queue_full_errors: int


_TRAFFIC = {
    "bytes": re.compile(_COUNT + r" Bytes sent\s+" + _COUNT + r" Bytes recv"),
    "packets": re.compile(_COUNT + r" Pckts sent\s+" + _COUNT + r" Pckts recv"),
    "errors": re.compile(_COUNT + r" Error send\s+" + _COUNT + r" Error recv"),
}
_MALFORMED = re.compile(
    r"^\s*(?:Malformed [a-z]+|Wrong protocol version|Bad message [a-z]+"
    r"|Truncated message):\s+" + _COUNT + r"\s*$")
_PACKETS_LOST = re.compile(r"^\s*Packets lost:\s+" + _COUNT + r"\s*$")
_QUEUE_HEADER = re.compile(r"^queue (\S{1,32}):\s*$")
_QUEUE_FIGURES = {
    "current": re.compile(r"^current elements:\s+" + _COUNT + r"\s*$"),
    "maximum": re.compile(r"^maximum elements:\s+" + _COUNT + r"\s*$"),
    "full": re.compile(r"^not enough space errors:\s+" + _COUNT + r"\s*$"),
}


def parse_network_stats(text):
    """Parse `conntrackd -s network`. Missing figures read as 0.

    The traffic lines of every channel (UDP or multicast) are added up; so are the
    malformed counters, received and sent.
    """
    traffic = {name: [0, 0] for name in _TRAFFIC}
    lost = malformed = 0
    for line in text.splitlines():
        for name, pattern in _TRAFFIC.items():
            match = pattern.search(line)
            if match:
                traffic[name][0] += int(match.group(1))
                traffic[name][1] += int(match.group(2))
        match = _MALFORMED.match(line)
        if match:
            malformed += int(match.group(1))
        match = _PACKETS_LOST.match(line)
        if match:
            lost += int(match.group(1))
    return NetworkStats(
        packets_sent=traffic["packets"][0], packets_received=traffic["packets"][1],
        bytes_sent=traffic["bytes"][0], bytes_received=traffic["bytes"][1],
        send_errors=traffic["errors"][0], receive_errors=traffic["errors"][1],
        messages_lost=lost, messages_malformed=malformed,
    )


def parse_queue_stats(text):
    """Parse `conntrackd -s queue` for the resend queue. Missing figures read as 0."""
    figures = {name: 0 for name in _QUEUE_FIGURES}
    current = None
    for line in text.splitlines():
        line = line.strip()
        header = _QUEUE_HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        if current != "rsqueue":
            continue
        for name, pattern in _QUEUE_FIGURES.items():
            match = pattern.match(line)
            if match:
                figures[name] = int(match.group(1))
    return QueueStats(figures["current"], figures["maximum"], figures["full"])


def parse_cache_stats(text):
    """Parse `conntrackd -s cache`. Missing figures read as 0."""
    active = {"internal": 0, "external": 0}
    no_space = {"internal": 0, "external": 0}
    current = None
    for line in text.splitlines():
        header = _CACHE_HEADER.match(line.strip())
        if header:
            current = header.group(1)
            active[current] = int(header.group(2))
            continue
        full = _NO_SPACE.search(line)
        if full and current:
            no_space[current] = int(full.group(1))
    return CacheStats(active["internal"], active["external"],
                      no_space["internal"], no_space["external"])


def parse_last_commit(log_text):
    """The outcome of the latest commit in a conntrackd log, or None if none is logged.

    conntrackd -c exits 0 even when entries fail to commit; only the log tells.
    """
    start = log_text.rfind(_COMMIT_START)
    if start < 0:
        return None
    block = log_text[start:]
    committed = _COMMITTED.search(block)
    failed = _CANNOT_COMMIT.search(block)
    already_present = _ALREADY_PRESENT.search(block)
    took = _COMMIT_TOOK.search(block)
    return CommitResult(
        committed=int(committed.group(1)) if committed else None,
        already_present=int(already_present.group(1)) if already_present else 0,
        failed=int(failed.group(1)) if failed else 0,
        seconds=float(took.group(1)) if took else None,
    )
