"""One directory per router that holds all of its state, and safe writes into it.

    <state_path>/routers/<router_id>/
        spec.json             the router spec it was added with
        conntrackd.conf       rendered configuration
        conntrackd.lock       conntrackd's LockFile
        conntrackd.ctl        conntrackd's control socket
        conntrackd.log        conntrackd's log
        notify.sh             the hook keepalived runs on every VRRP transition
        notify.log            what snat-sync logged while running the hook
        guard-raise.nft       nftables ruleset of the reset-window guard, and
        guard-lift.nft        the one that removes it (see guard.py)
        refresh.nft           nftables ruleset of the warm standby's refreshes
                              (see refresh.py)
        transition.lock       serialises transitions of this router
        last-transition.json  what the latest transition did, step by step
        latest-arrival        when the newest transition that took the lock arrived
                              (written under the lock by snat-sync and by the hook,
                              as $EPOCHREALTIME's digits): an older one is skipped
        history.jsonl         the latest transitions and repairs, one JSON per line
                              (bounded; see history.py)
        counters.json         transition, repair and commit-duration counters
                              that only grow (the metrics' source)
        health.json           the node daemon's latest health check: what the
                              peers reported and what it repaired (see repair.py)
        demotion              [failover] demote_while_resyncing: keepalived's
                              track file, 1 while the replica is incomplete
                              (see demotion.py)

Directories are 0700 and files 0600 (the hook 0700), owned by root: keepalived's
enable_script_security refuses hooks that any other user could change.
"""

import dataclasses
import functools
import io
import json
import os
import pathlib
import re
import shutil
import stat
import tempfile

from snat_sync.errors import InvalidInput
from snat_sync.router import RouterSpec, check_router_id

# sun_path in struct sockaddr_un is 108 bytes including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107
# The state path ends up in conntrackd.conf (which ends a path at a blank or a
# quote), in keepalived.conf (where '$' starts a variable and '#' or '!' a comment)
# and in a shell script: it is kept to characters none of them treat specially.
STATE_PATH = re.compile(r"/[\w.,:=+@%~/-]*")


@dataclasses.dataclass(frozen=True)
class RouterFiles:
    directory: pathlib.Path

    @classmethod
    def under(cls, state_path, router_id):
        """The files of router_id below state_path, both checked.

        Refuses a state path, routers directory or router directory that is a
        symbolic link or that another user could change (see check_directory).
        """
        directory = (pathlib.Path(state_path).absolute() / "routers"
                     / check_router_id(router_id))
        check_directories(directory, state_path)
        return cls(directory)

    @property
    def spec(self):
        return self.directory / "spec.json"

    @property
    def conntrackd_config(self):
        """The configuration conntrackd runs with: a copy of one of the variants."""
        return self.directory / "conntrackd.conf"

    def conntrackd_variant(self, role):
        """The configuration for conntrackd on a node in role (primary or backup).

        They differ only in warm standby unless [failover] backup_reads_events,
        where a backup's conntrackd reads no conntrack events and only a backup's
        injects what it receives (render.conntrackd_settings); the failover copies the
        role's variant to conntrackd.conf and restarts conntrackd when they differ.
        """
        return self.directory / f"conntrackd.{role.value}.conf"

    @property
    def lock_file(self):
        return self.directory / "conntrackd.lock"

    @property
    def control_socket(self):
        return self.directory / "conntrackd.ctl"

    @property
    def log_file(self):
        return self.directory / "conntrackd.log"

    @property
    def notify_hook(self):
        return self.directory / "notify.sh"

    @property
    def notify_log(self):
        return self.directory / "notify.log"

    @property
    def guard_raise(self):
        return self.directory / "guard-raise.nft"

    @property
    def guard_lift(self):
        return self.directory / "guard-lift.nft"

    @property
    def refresh_rules(self):
        return self.directory / "refresh.nft"

    @property
    def transition_lock(self):
        return self.directory / "transition.lock"

    @property
    def latest_arrival(self):
        return self.directory / "latest-arrival"

    @property
    def history(self):
        return self.directory / "history.jsonl"

    @property
    def counters(self):
        return self.directory / "counters.json"

    @property
    def health(self):
        return self.directory / "health.json"

    @property
    def demotion(self):
        return self.directory / "demotion"

    @property
    def last_transition(self):
        return self.directory / "last-transition.json"

    def check_socket_path(self):
        length = len(os.fsencode(self.control_socket))
        if length > UNIX_SOCKET_PATH_MAX:
            raise InvalidInput(
                "state path",
                str(self.directory.parent.parent),
                f"the control socket path {self.control_socket} is {length} bytes; "
                f"UNIX socket paths must stay under 108 bytes",
            )


def routers_directory(state_path):
    directory = pathlib.Path(state_path).absolute() / "routers"
    check_directories(directory, state_path)
    return directory


def check_state_path(state_path):
    """The absolute state path, if it is safe to build paths on; else InvalidInput.

    Checked where it enters (the command line or a config file): only plain
    characters (see STATE_PATH), no '..', and every part of it that exists is a
    real directory that only root (or the user running this) can change.
    """
    if not isinstance(state_path, (str, os.PathLike)):
        raise InvalidInput("state path", state_path, "not a path")
    path = pathlib.Path(state_path).absolute()
    if not STATE_PATH.fullmatch(str(path)) or ".." in path.parts:
        raise InvalidInput(
            "state path", str(state_path),
            "must be made of letters, digits and / _ . , : = + @ % ~ - only, "
            "without '..' (no spaces, quotes, braces, '$', '#' or ';')")
    check_directories(path, state_path)
    return path


def check_directories(path, state_path):
    """check_directory on path and each of its parents, from the root down."""
    path = pathlib.Path(path)
    for directory in reversed([path, *path.parents]):
        check_directory(directory, state_path)


def check_directory(directory, state_path):
    """Refuse a directory that is a symlink, is no directory, or is unsafe.

    Unsafe is what keepalived's enable_script_security refuses on the way to a
    script: owned by another user, or writable by group or others without the
    sticky bit (as /tmp has). A missing directory is fine.
    """
    try:
        status = os.lstat(directory)
    except FileNotFoundError:
        return
    except OSError as error:
        raise InvalidInput("state path", str(state_path),
                           f"cannot examine {directory}: {error.strerror}") from None
    if stat.S_ISLNK(status.st_mode):
        raise InvalidInput("state path", str(directory), "is a symbolic link")
    if not stat.S_ISDIR(status.st_mode):
        raise InvalidInput("state path", str(state_path),
                           f"{directory} is not a directory")
    if status.st_uid not in (0, os.geteuid()):
        raise InvalidInput("state path", str(state_path),
                           f"{directory} is owned by uid {status.st_uid}, not root")
    if status.st_mode & 0o022 and not status.st_mode & stat.S_ISVTX:
        raise InvalidInput("state path", str(state_path),
                           f"{directory} is writable by group or others")


def ensure_directory(path):
    """Create path (and parents) as root-only directories; refuse symlinks."""
    path = pathlib.Path(path)
    for directory in reversed([path, *path.parents]):
        if directory.is_symlink():
            raise InvalidInput("state path", str(directory), "is a symbolic link")
        if not directory.exists():
            directory.mkdir(mode=0o700)
        elif directory != path:
            check_directory(directory, path)
    os.chmod(path, 0o700)


def write_atomically(path, content, mode=0o600, durable=True):
    """Replace path with content so that readers see the old or the new file whole.

    The temporary file lives in the same directory, so the final rename is atomic;
    it is fsynced first so a crash cannot leave an empty file behind. A file that
    is rewritten every few seconds and means nothing after a reboot (health.json)
    skips the fsyncs (durable=False).
    """
    path = pathlib.Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(content)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory):
    """Make a rename in directory survive a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path, data, durable=True):
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n",
                     durable=durable)


@dataclasses.dataclass(frozen=True)
class LatestArrival:
    """The newest transition that took a router's lock (its latest-arrival file).

    at: when it arrived. confirmed_only: it found the role the last recorded
    transition had reached and changed nothing (already-done); otherwise it may
    have changed the router (the notify hook commits before snat-sync records).
    """

    at: float
    confirmed_only: bool = False


# Seconds since the epoch with up to 9 decimals, then " already-done" for a
# transition that only confirmed. The hook writes $EPOCHREALTIME's form (10 digits,
# a dot, 6 digits) alone, and compares the first field as a string.
LATEST_ARRIVAL = re.compile(r"(\d{1,15}(?:\.\d{1,9})?)( already-done)?")


def read_latest_arrival(path):
    """The LatestArrival in a latest-arrival file; None if there is none or it is bad."""
    text = read_text(path)
    match = LATEST_ARRIVAL.fullmatch(text.strip()) if text is not None else None
    if match is None:
        return None
    return LatestArrival(float(match.group(1)), match.group(2) is not None)


def write_latest_arrival(path, latest):
    """Record the newest arrival; the caller holds the transition lock."""
    write_atomically(path, f"{latest.at:.6f}"
                     + (" already-done" if latest.confirmed_only else "") + "\n",
                     durable=False)


def rotate_log(path, max_bytes, backups):
    """Rotate a log another process appends to, once it is larger than max_bytes.

    Copy, then empty in place: conntrackd keeps the log open for good and writes
    with O_APPEND, so after the truncation its next line lands at the start of
    the emptied file. path.1 is the newest copy, path.<backups> the oldest.
    Returns True if it rotated. Lines written between the copy and the
    truncation are lost; at conntrackd's rate that is rarely more than one.
    """
    path = pathlib.Path(path)
    try:
        if max_bytes == 0 or path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for number in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{number + 1}"))
    with open(path, "rb") as source, open(
            os.open(path.with_name(f"{path.name}.1"),
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600),
            "wb") as copy:
        shutil.copyfileobj(source, copy)
    os.truncate(path, 0)
    return True


def read_json(path):
    """The JSON document at path, or None when there is none or it is unreadable."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


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
    return RouterSpec.from_dict(read_json(path))


def read_text(path, offset=0):
    """The text of the file at path; None unless it is a regular file we can read.

    A symlink, a FIFO (which would block) or a device is not followed or opened for
    reading. Bytes that are not UTF-8 read as U+FFFD: the files may be damaged.
    With offset, only the bytes after the first offset ones; a file now shorter than
    offset was truncated since (a log rotated by copy-and-truncate), and is all read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(descriptor, "rb") as stream:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                return None
            if 0 < offset <= status.st_size:
                stream.seek(offset)
            return io.TextIOWrapper(stream, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
