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
        transition.lock       serialises transitions of this router
        last-transition.json  what the latest transition did, step by step

Directories are 0700 and files 0600 (the hook 0700), owned by root: keepalived's
enable_script_security refuses hooks that any other user could change.
"""

import dataclasses
import json
import os
import pathlib
import tempfile

from snat_sync.errors import InvalidInput

# sun_path in struct sockaddr_un is 108 bytes including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107


@dataclasses.dataclass(frozen=True)
class RouterFiles:
    directory: pathlib.Path

    @classmethod
    def under(cls, state_path, router_id):
        """The files of router_id (already validated) below state_path."""
        return cls(pathlib.Path(state_path).absolute() / "routers" / router_id)

    @property
    def spec(self):
        return self.directory / "spec.json"

    @property
    def conntrackd_config(self):
        return self.directory / "conntrackd.conf"

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
    def transition_lock(self):
        return self.directory / "transition.lock"

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
    return pathlib.Path(state_path).absolute() / "routers"


def ensure_directory(path):
    """Create path (and parents) as root-only directories; refuse symlinks."""
    path = pathlib.Path(path)
    for directory in reversed([path, *path.parents]):
        if directory.is_symlink():
            raise InvalidInput("state path", str(directory), "is a symbolic link")
        if not directory.exists():
            directory.mkdir(mode=0o700)
    os.chmod(path, 0o700)


def write_atomically(path, content, mode=0o600):
    """Replace path with content so that readers see the old or the new file whole.

    The temporary file lives in the same directory, so the final rename is atomic;
    it is fsynced first so a crash cannot leave an empty file behind.
    """
    path = pathlib.Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path, data):
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """The JSON document at path, or None when there is none or it is unreadable."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return None
