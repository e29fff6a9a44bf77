"""A catalogue of bad input, each run through the real command line against a real
namespace: every one fails with exit status 2, names the field and the value, and
leaves the system exactly as it was.

"As it was" is checked by a snapshot before and after each case:
  - every file and directory under the test's work directory (which holds the state
    paths and config files): type, mode, owner, size, mtime and content;
  - the conntrackd and keepalived processes that belong to this test (inside its
    namespaces, or naming its work directory on their command line; other tests on
    the machine may start their own meanwhile);
  - the links, addresses and nft ruleset of the test's namespaces, and which
    namespaces with the test's prefix exist (a missing namespace must not be
    created by looking it up).
A positive control runs the same arguments, minus the one bad value, and sees a
router come and go; so a case that changes nothing because everything is broken
cannot pass for one that was rejected. Each family has its own: `router add`, a
config file (and one that sets the state path), a state path, and notify.
"""

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
NETNS_DIRECTORY = pathlib.Path("/run/netns")
DAEMONS = ("conntrackd", "keepalived")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(map(shutil.which, ("conntrackd", "ip", "nft"))),
    reason="needs root, conntrackd, ip and nft")


# -- the system under test -------------------------------------------------------------


@dataclasses.dataclass
class System:
    prefix: str
    namespace: str           # where `router add` cases point
    known_namespace: str     # runs the conntrackd of router "known"
    interface: str           # the HA interface in namespace, 169.254.192.1/18
    peer_interface: str      # the other end, 169.254.192.2/18
    workdir: pathlib.Path    # short: socket paths must stay under 108 bytes
    state: pathlib.Path      # state path of the `router add` cases (empty)
    known_state: pathlib.Path  # state path holding router "known"
    empty_config: pathlib.Path

    @property
    def namespaces(self):
        return (self.namespace, self.known_namespace)

    def valid_add(self, router="ok1", **overrides):
        """`router add` arguments that work; overrides replace one option."""
        arguments = {"--namespace": self.namespace, "--ha-interface": self.interface,
                     "--local-address": "169.254.192.1",
                     "--peer-address": "169.254.192.2", "--vrid": "7"}
        arguments.update(overrides)
        flat = []
        for option, value in arguments.items():
            for each in value if isinstance(value, list) else [value]:
                flat += [option, each]
        return ["router", "add", router, *flat]


def run(argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr}")
    return result


def environment():
    """The package from this source tree first on the path."""
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY),
                                                        os.environ.get("PYTHONPATH")]))}


def snat_sync(system, *arguments, state=None):
    """Run `python3 -m snat_sync` as keepalived or an operator would.

    An empty --config-file keeps /etc/snat-sync/snat-sync.conf (and ~/.snat-sync)
    out, an empty --config-dir the default snat-sync.conf.d directories; state
    False: no --state-path.
    """
    empty_directory = system.workdir / "empty.conf.d"
    empty_directory.mkdir(mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "snat_sync",
            "--config-file", str(system.empty_config),
            "--config-dir", str(empty_directory)]
    if state is not False:
        argv += ["--state-path", str(state or system.state)]
    return subprocess.run([*argv, *map(str, arguments)], capture_output=True,
                          text=True, timeout=60, env=environment(),
                          cwd=system.workdir)


def add_namespace(system, namespace, interface, peer_interface):
    run(["ip", "netns", "add", namespace])

    def inside(*argv):
        run(["ip", "-n", namespace, *argv])

    run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w",
         "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    inside("link", "set", "lo", "up")
    inside("link", "add", interface, "type", "veth", "peer", "name", peer_interface)
    inside("addr", "add", "169.254.192.1/18", "dev", interface)
    inside("addr", "add", "169.254.192.2/18", "dev", peer_interface)
    inside("link", "set", interface, "up")
    inside("link", "set", peer_interface, "up")


def kill_in_namespace(namespace):
    """SIGKILL every process in the namespace, by pid; wait until they are gone."""
    try:
        inode = os.stat(NETNS_DIRECTORY / namespace).st_ino
    except OSError:
        return
    victims = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.stat(f"/proc/{process.pid}/ns/net").st_ino == inode:
                process.kill()
                victims.append(process)
    psutil.wait_procs(victims, timeout=5)


@pytest.fixture(scope="module")
def system():
    tag = secrets.token_hex(3)
    prefix = f"ssbad-{tag}"
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ssbad-", dir="/tmp"))
    built = System(
        prefix=prefix,
        namespace=prefix,
        known_namespace=f"{prefix}-k",
        interface=f"ha-{tag}a",
        peer_interface=f"ha-{tag}b",
        workdir=workdir,
        state=workdir / "state",
        known_state=workdir / "known",
        empty_config=workdir / "empty.conf",
    )
    try:
        built.state.mkdir(mode=0o700)
        built.empty_config.write_text("")
        add_namespace(built, built.namespace, built.interface, built.peer_interface)
        add_namespace(built, built.known_namespace, built.interface,
                      built.peer_interface)
        added = snat_sync(built, *built.valid_add("known", **{
            "--namespace": built.known_namespace}), state=built.known_state)
        assert added.returncode == 0, added.stderr
        yield built
    finally:
        for namespace in built.namespaces:
            kill_in_namespace(namespace)
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True,
                           timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


# -- snapshots -------------------------------------------------------------------------


def files_under(directory):
    """Every entry below directory (symlinks not followed) with what could change."""
    found = {}
    for root, directories, names in os.walk(directory):
        for name in [*directories, *names]:
            path = pathlib.Path(root, name)
            info = os.lstat(path)
            entry = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode),
                     info.st_uid, info.st_gid)
            if name == "conntrackd.log":
                pass  # the running daemon of router "known" may write it any time
            elif stat.S_ISREG(info.st_mode):
                entry += (info.st_size, info.st_mtime_ns,
                          hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(info.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISDIR(info.st_mode):
                entry += (info.st_mtime_ns,)
            found[str(path.relative_to(directory))] = entry
    return found


def our_daemons(system):
    inodes = set()
    for namespace in system.namespaces:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_DIRECTORY / namespace).st_ino)
    found = set()
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):
            if process.info["name"] not in DAEMONS:
                continue
            inode = os.stat(f"/proc/{process.pid}/ns/net").st_ino
            if inode in inodes or str(system.workdir) in " ".join(
                    process.info["cmdline"] or []):
                found.add((process.pid, process.info["name"]))
    return found


def namespace_state(namespace):
    return tuple(
        run(argv, check=False).stdout for argv in (
            ["ip", "-n", namespace, "-d", "link", "show"],
            ["ip", "-n", namespace, "addr", "show"],
            ["ip", "-n", namespace, "route", "show", "table", "all"],
            ["ip", "netns", "exec", namespace, "nft", "list", "ruleset"],
        ))


def snapshot(system):
    return {
        "files": files_under(system.workdir),
        "daemons": our_daemons(system),
        "namespaces": sorted(name for name in os.listdir(NETNS_DIRECTORY)
                             if name.startswith(system.prefix)),
        **{f"namespace {name}": namespace_state(name) for name in system.namespaces},
    }


def assert_unchanged(before, after):
    for key in before:
        if before[key] != after[key]:
            if key == "files":
                changed = sorted(set(before[key].items()) ^ set(after[key].items()))
                raise AssertionError(f"files changed: {changed}")
            raise AssertionError(f"{key} changed:\n{before[key]}\n->\n{after[key]}")


# -- the catalogue ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """arguments(system) -> argv after --state-path; expect: text stderr must hold.

    setup(system) runs before the snapshot (what it creates is part of "before");
    it returns the state path to use instead of the default, None for the default,
    or NO_STATE_OPTION for none on the command line."""

    arguments: object
    expect: tuple
    setup: object = None
    status: int = 2


def add_with(**overrides):
    return lambda system: system.valid_add(**overrides)


def add_as(router):
    return lambda system: system.valid_add(router)


def config(text, name):
    def setup(system):
        path = system.workdir / name
        path.write_text(text)
        return None
    return setup


def with_config(name, arguments=None):
    def build(system):
        return ["--config-file", str(system.workdir / name),
                *(arguments(system) if arguments else system.valid_add())]
    return build


NO_STATE_OPTION = False


def config_only_state(system, name, text):
    """Write a config file that sets the state path; give no --state-path."""
    (system.workdir / name).write_text(text)
    return NO_STATE_OPTION


def symlinked_state(system):
    real = system.workdir / "real"
    real.mkdir(mode=0o700, exist_ok=True)
    link = system.workdir / "link"
    if not link.is_symlink():
        link.symlink_to(real)
    return link


def symlink_to_known(system):
    link = system.workdir / "known-link"
    if not link.is_symlink():
        link.symlink_to(system.known_state)
    return link


def group_writable_state(system):
    path = system.workdir / "open"
    path.mkdir(exist_ok=True)
    path.chmod(0o777)
    return path


def writable_config(system, name):
    path = system.workdir / name
    path.write_text("[conntrackd]\nbinary = /tmp/anyone-could-put-this-here\n")
    path.chmod(0o666)


def foreign_state(system):
    path = system.workdir / "foreign"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, 65534, 65534)
    return path


def file_as_state(system):
    path = system.workdir / "file"
    path.write_text("")
    path.chmod(0o600)
    return path


def known(*arguments):
    """Arguments for a command against the state path that holds router "known"."""
    return ("known", arguments)


CASES = {
    # router ids
    "router id traversal": Case(add_as("../x"), ("invalid router id '../x'",)),
    "router id slash": Case(add_as("a/b"), ("invalid router id 'a/b'",)),
    "router id command substitution": Case(add_as("$(reboot)"),
                                           ("invalid router id '$(reboot)'",)),
    "router id semicolon": Case(add_as("a;b"), ("invalid router id 'a;b'",)),
    "router id space": Case(add_as("a b"), ("invalid router id 'a b'",)),
    "router id newline": Case(add_as("a\nb"), ("invalid router id 'a\\nb'",)),
    "router id empty": Case(add_as(""), ("invalid router id ''",)),
    "router id dot dot": Case(add_as(".."), ("invalid router id '..'",)),
    "router id 65 characters": Case(add_as("r" * 65),
                                    (f"invalid router id '{'r' * 65}'",)),
    "router id unicode": Case(add_as("routér"), ("invalid router id 'routér'",)),
    # namespaces
    "namespace missing": Case(
        lambda s: s.valid_add(**{"--namespace": f"{s.prefix}-missing"}),
        ("invalid namespace 'ssbad-", "-missing'", "no such network namespace")),
    "namespace traversal": Case(
        lambda s: s.valid_add(**{"--namespace": f"../{s.namespace}"}),
        ("invalid namespace '../ssbad-",)),
    "namespace path": Case(
        lambda s: s.valid_add(**{"--namespace": f"/run/netns/{s.namespace}"}),
        ("invalid namespace '/run/netns/ssbad-",)),
    "namespace space": Case(add_with(**{"--namespace": "a b"}),
                            ("invalid namespace 'a b'",)),
    # interfaces
    "interface 16 bytes": Case(add_with(**{"--ha-interface": "ha-0123456789abc"}),
                               ("invalid HA interface 'ha-0123456789abc'",)),
    "interface 16 bytes unicode": Case(add_with(**{"--ha-interface": "é" * 8}),
                                       (f"invalid HA interface '{'é' * 8}'",)),
    "interface slash": Case(add_with(**{"--ha-interface": "ha/x"}),
                            ("invalid HA interface 'ha/x'",)),
    "interface space": Case(add_with(**{"--ha-interface": "ha x"}),
                            ("invalid HA interface 'ha x'",)),
    "interface missing": Case(add_with(**{"--ha-interface": "ha-nosuch"}),
                              ("invalid HA interface 'ha-nosuch'",
                               "no such interface")),
    "interface at sign": Case(add_with(**{"--ha-interface": "eth0@if3"}),
                              ("invalid HA interface 'eth0@if3'",)),
    "interface leading digit": Case(add_with(**{"--ha-interface": "1abc"}),
                                    ("invalid HA interface '1abc'",)),
    "interface conntrackd keyword": Case(add_with(**{"--ha-interface": "UDP"}),
                                         ("invalid HA interface 'UDP'", "keyword")),
    "interface hex word": Case(add_with(**{"--ha-interface": "beef"}),
                               ("invalid HA interface 'beef'",)),
    "interface loopback": Case(add_with(**{"--ha-interface": "lo"}),
                               ("invalid HA interface 'lo'",)),
    # addresses
    "address garbage": Case(add_with(**{"--local-address": "banana"}),
                            ("invalid local address 'banana'",)),
    "address loopback": Case(add_with(**{"--local-address": "127.0.0.1"}),
                             ("invalid local address '127.0.0.1'",)),
    "address multicast": Case(add_with(**{"--peer-address": "224.0.0.18"}),
                              ("invalid peer address '224.0.0.18'",)),
    "address broadcast": Case(add_with(**{"--peer-address": "255.255.255.255"}),
                              ("invalid peer address '255.255.255.255'",)),
    "address not on the interface": Case(
        add_with(**{"--local-address": "169.254.192.9"}),
        ("invalid local address '169.254.192.9'", "not configured")),
    "address with prefix": Case(add_with(**{"--local-address": "169.254.192.1/18"}),
                                ("invalid local address '169.254.192.1/18'",)),
    "address with blank": Case(add_with(**{"--local-address": " 169.254.192.1"}),
                               ("invalid local address ' 169.254.192.1'",)),
    "peer equals local": Case(add_with(**{"--peer-address": "169.254.192.1"}),
                              ("invalid peer address '169.254.192.1'", "own local")),
    "peer given twice": Case(
        add_with(**{"--peer-address": ["169.254.192.2", "169.254.192.2"]}),
        ("invalid peer address", "given twice")),
    "peer outside the HA network": Case(add_with(**{"--peer-address": "10.0.0.2"}),
                                        ("invalid peer address '10.0.0.2'",
                                         "not in the HA network")),
    "mixed address families": Case(add_with(**{"--peer-address": "fd00::2"}),
                                   ("invalid peer address 'fd00::2'", "IPv4")),
    "IPv6 scope id": Case(
        add_with(**{"--local-address": "fe80::1%eth0", "--peer-address": "fe80::2"}),
        ("invalid local address 'fe80::1%eth0'", "scope")),
    # VRIDs
    "VRID 0": Case(add_with(**{"--vrid": "0"}), ("invalid VRID '0'",)),
    "VRID 255": Case(add_with(**{"--vrid": "255"}), ("invalid VRID '255'",)),
    "VRID -1": Case(add_with(**{"--vrid": "-1"}), ("invalid VRID '-1'",)),
    "VRID 1.5": Case(add_with(**{"--vrid": "1.5"}), ("invalid VRID '1.5'",)),
    "VRID 07x": Case(add_with(**{"--vrid": "07x"}), ("invalid VRID '07x'",)),
    "VRID empty": Case(add_with(**{"--vrid": ""}), ("invalid VRID ''",)),
    "VRID with blank": Case(add_with(**{"--vrid": " 7"}), ("invalid VRID ' 7'",)),
    "VRID hex": Case(add_with(**{"--vrid": "0x7"}), ("invalid VRID '0x7'",)),
    "VRID missing": Case(
        lambda s: [arg for arg in s.valid_add() if arg not in ("--vrid", "7")],
        ("the following arguments are required: --vrid",)),
    # configuration files
    "udp with two peers": Case(
        with_config("udp.conf", add_with(
            **{"--peer-address": ["169.254.192.2", "169.254.192.3"]})),
        ("invalid peer address '169.254.192.2, 169.254.192.3'", "udp"),
        setup=config("[conntrackd]\ntransport = udp\n", "udp.conf")),
    "config bad integer": Case(
        with_config("bad-int.conf"), ("hash_size", "bad-int.conf", "'lots'"),
        setup=config("[conntrackd]\nhash_size = lots\n", "bad-int.conf")),
    "config integer out of range": Case(
        with_config("big.conf"), ("hash_limit", "big.conf", "'99999999999'"),
        setup=config("[conntrackd]\nhash_limit = 99999999999\n", "big.conf")),
    "config base port 0": Case(
        with_config("port.conf"), ("base_port", "port.conf", "'0'"),
        setup=config("[conntrackd]\nbase_port = 0\n", "port.conf")),
    "config unknown choice": Case(
        with_config("choice.conf"), ("sync_mode", "choice.conf", "'turbo'"),
        setup=config("[conntrackd]\nsync_mode = turbo\n", "choice.conf")),
    "config unknown protocol": Case(
        with_config("proto.conf"), ("protocols", "proto.conf", "GRE"),
        setup=config("[conntrackd]\nprotocols = TCP,GRE\n", "proto.conf")),
    "config group not multicast": Case(
        with_config("group.conf"), ("multicast_group", "group.conf", "'10.0.0.1'"),
        setup=config("[conntrackd]\nmulticast_group = 10.0.0.1\n", "group.conf")),
    "config misspelt option": Case(
        with_config("typo.conf"), ("hash_limt", "typo.conf", "no such option"),
        setup=config("[conntrackd]\nhash_limt = 5\n", "typo.conf")),
    "config binary with arguments": Case(
        with_config("binary.conf"), ("binary", "binary.conf", "'conntrackd -x'"),
        setup=config("[conntrackd]\nbinary = conntrackd -x\n", "binary.conf")),
    "config binary missing": Case(
        with_config("nobinary.conf"),
        ("invalid option [conntrackd] binary '/nonexistent/conntrackd'",),
        setup=config("[conntrackd]\nbinary = /nonexistent/conntrackd\n",
                     "nobinary.conf")),
    "config state path with a space": Case(
        lambda s: ["--config-file", str(s.workdir / "space.conf"), *s.valid_add()],
        ("invalid state path", "a b"),
        setup=lambda s: config_only_state(
            s, "space.conf", f"[DEFAULT]\nstate_path = {s.workdir}/a b\n")),
    "config file missing": Case(
        lambda s: ["--config-file", str(s.workdir / "missing.conf"), *s.valid_add()],
        ("missing.conf",)),
    "config file writable by others": Case(
        with_config("open.conf"), ("invalid config file", "open.conf",
                                   "writable by group or others"),
        setup=lambda s: writable_config(s, "open.conf")),
    "config file unparseable": Case(
        with_config("broken.conf"), ("broken.conf", "[conntrackd"),
        setup=config("[conntrackd\nhash_size = 1\n", "broken.conf")),
    # notify, against the state path of router "known"
    "notify unknown router": Case(known("notify", "nosuch", "primary"),
                                  ("invalid router 'nosuch'", "unknown")),
    "notify bad router id": Case(known("notify", "../known", "primary"),
                                 ("invalid router id '../known'",)),
    "notify bad state": Case(known("notify", "known", "banana"),
                             ("invalid notify state 'banana'",)),
    "notify bad keepalived state": Case(
        known("notify", "known", "INSTANCE", "VR_7", "BOGUS", "100"),
        ("invalid notify state 'BOGUS'",)),
    "notify bad type": Case(known("notify", "known", "BOGUS", "VR_7", "MASTER", "100"),
                            ("invalid notify type 'BOGUS'",)),
    "notify wrong count": Case(known("notify", "known", "INSTANCE", "VR_7", "MASTER"),
                               ("invalid notify arguments 'INSTANCE VR_7 MASTER'",)),
    "notify priority 256": Case(
        known("notify", "known", "INSTANCE", "VR_7", "MASTER", "256"),
        ("invalid notify priority '256'",)),
    "notify priority -1": Case(
        known("notify", "known", "INSTANCE", "VR_7", "MASTER", "-1"),
        ("invalid notify priority '-1'",)),
    "notify arrived infinite": Case(
        known("notify", "known", "--arrived", "inf", "primary"),
        ("invalid --arrived inf",)),
    "notify arrived in the future": Case(
        known("notify", "known", "--arrived", "99999999999", "primary"),
        ("invalid --arrived 99999999999",)),
    "notify bad hook step": Case(
        known("notify", "known", "--hook-step", "commit,a,b,0", "primary"),
        ("invalid hook step 'commit,a,b,0'",)),
    "remove through a symlinked state path": Case(
        lambda s: ["router", "remove", "known"],
        ("invalid state path", "symbolic link"), setup=symlink_to_known),
    # state paths
    "state path symlink": Case(lambda s: s.valid_add(),
                               ("invalid state path", "link", "symbolic link"),
                               setup=symlinked_state),
    "state path socket too long": Case(
        lambda s: s.valid_add(), ("invalid state path", "x" * 80, "108 bytes"),
        setup=lambda s: s.workdir / ("x" * 90)),
    "state path with a space": Case(lambda s: s.valid_add(),
                                    ("invalid state path", "st ate"),
                                    setup=lambda s: s.workdir / "st ate"),
    "state path with a dollar": Case(lambda s: s.valid_add(),
                                     ("invalid option value", "st$te", "$$"),
                                     setup=lambda s: s.workdir / "st$te"),
    "state path with an escaped dollar": Case(lambda s: s.valid_add(),
                                              ("invalid state path", "st$te"),
                                              setup=lambda s: s.workdir / "st$$te"),
    "state path with dot dot": Case(lambda s: s.valid_add(),
                                    ("invalid state path", "/../state"),
                                    setup=lambda s: f"{s.workdir}/real/../state"),
    "state path writable by others": Case(
        lambda s: s.valid_add(), ("invalid state path", "writable by group or others"),
        setup=group_writable_state),
    "state path owned by another user": Case(
        lambda s: s.valid_add(), ("invalid state path", "owned by uid 65534"),
        setup=foreign_state),
    "state path is a file": Case(lambda s: s.valid_add(),
                                 ("invalid state path", "not a directory"),
                                 setup=file_as_state),
    "status through a symlinked state path": Case(
        lambda s: ["status"], ("invalid state path", "symbolic link"),
        setup=symlinked_state),
    # render, status, remove, demo
    "render network without the address": Case(
        lambda s: ["render", *s.valid_add()[2:], "--ha-network", "10.0.0.0/8",
                   "--nf-conntrack-max", "1000"],
        ("invalid HA network '10.0.0.0/8'",)),
    "render negative conntrack max": Case(
        lambda s: ["render", *s.valid_add()[2:], "--ha-network", "169.254.192.0/18",
                   "--nf-conntrack-max", "-5"],
        ("invalid --nf-conntrack-max -5",)),
    "render network alone": Case(
        lambda s: ["render", *s.valid_add()[2:], "--ha-network", "169.254.192.0/18"],
        ("invalid --ha-network '169.254.192.0/18'", "--nf-conntrack-max")),
    "status bad router id": Case(lambda s: ["status", "../x"],
                                 ("invalid router id '../x'",)),
    "remove bad router id": Case(lambda s: ["router", "remove", "a b"],
                                 ("invalid router id 'a b'",)),
    "demo no flows": Case(lambda s: ["demo", "--flows", "0"], ("invalid --flows 0",)),
}


def case_arguments(system, case):
    if isinstance(case.arguments, tuple) and case.arguments[0] == "known":
        return system.known_state, list(case.arguments[1])
    return None, case.arguments(system)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly_and_changes_nothing(system, name):
    case = CASES[name]
    state = case.setup(system) if case.setup else None
    known_state, arguments = case_arguments(system, case)
    state = known_state or state
    before = snapshot(system)

    result = snat_sync(system, *arguments, state=state)
    # A daemon started by mistake may take a moment to show up.
    time.sleep(0.05)
    after = snapshot(system)

    assert result.returncode == case.status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for text in case.expect:
        assert text in result.stderr, (text, result.stderr)
    assert result.stdout == "" or "usage:" in result.stdout
    assert_unchanged(before, after)


def test_valid_input_adds_a_router_and_removal_leaves_nothing(system):
    """The positive control: the arguments every case above starts from work."""
    state = system.workdir / "control"
    before = snapshot(system)

    added = snat_sync(system, *system.valid_add("control1"), state=state)
    assert added.returncode == 0, added.stderr
    directory = state / "routers" / "control1"
    assert (directory / "conntrackd.conf").is_file()
    assert (directory / "notify.sh").is_file()
    started = our_daemons(system) - before["daemons"]
    assert [name for _pid, name in started] == ["conntrackd"]
    # Item 3 of the hardening: root-only directories and files.
    for path in (state, state / "routers", directory):
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == 0
    for name in ("spec.json", "conntrackd.conf", "guard-raise.nft", "guard-lift.nft"):
        info = os.lstat(directory / name)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 0), name
    info = os.lstat(directory / "notify.sh")
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, 0)

    removed = snat_sync(system, "router", "remove", "control1", state=state)
    assert removed.returncode == 0, removed.stderr
    after = snapshot(system)

    assert our_daemons(system) == before["daemons"]
    leftovers = {path for path in files_under(system.workdir)
                 if path.startswith("control")}
    assert leftovers <= {"control", "control/routers"}, leftovers
    assert not any((state / "routers").iterdir())
    after["files"] = {path: entry for path, entry in after["files"].items()
                      if not path.startswith("control")}
    assert_unchanged(before, after)


def add_and_remove(system, router, *global_arguments, state=None):
    """The control's round trip: `router add` works and starts one conntrackd,
    `router remove` takes both away; the files left are the state path's own
    directories. Returns the rendered conntrackd.conf."""
    before = snapshot(system)
    added = snat_sync(system, *global_arguments, *system.valid_add(router),
                      state=state)
    assert added.returncode == 0, added.stderr
    state_path = pathlib.Path(state) if state else system.state
    directory = state_path / "routers" / router
    rendered = (directory / "conntrackd.conf").read_text()
    started = our_daemons(system) - before["daemons"]
    assert [name for _pid, name in started] == ["conntrackd"]
    removed = snat_sync(system, *global_arguments, "router", "remove", router,
                        state=state)
    assert removed.returncode == 0, removed.stderr
    assert our_daemons(system) == before["daemons"]
    assert not directory.exists() and not any((state_path / "routers").iterdir())
    return rendered


def test_a_valid_config_file_is_read_and_works(system):
    """The control of the config file cases: a root-only, parseable file of known
    options and valid values is taken, and its values reach conntrackd.conf."""
    path = system.workdir / "good.conf"
    path.write_text("[conntrackd]\nhash_size = 16411\nsync_mode = notrack\n"
                    "protocols = TCP,UDP\nbase_port = 3900\n")
    path.chmod(0o600)
    rendered = add_and_remove(system, "control2", "--config-file", path,
                              state=system.workdir / "control-config")
    assert "HashSize 16411" in rendered, rendered
    assert "Mode NOTRACK" in rendered, rendered
    assert "3907" in rendered, rendered  # base_port + VRID 7


def test_a_config_file_may_set_the_state_path(system):
    """The control of "config state path with a space": the same file with a
    state path that has none, and no --state-path."""
    state = system.workdir / "control-from-config"
    path = system.workdir / "state.conf"
    path.write_text(f"[DEFAULT]\nstate_path = {state}\n")
    path.chmod(0o600)
    added = snat_sync(system, "--config-file", path, *system.valid_add("control3"),
                      state=NO_STATE_OPTION)
    assert added.returncode == 0, added.stderr
    assert (state / "routers" / "control3" / "conntrackd.conf").is_file()
    removed = snat_sync(system, "--config-file", path, "router", "remove",
                        "control3", state=NO_STATE_OPTION)
    assert removed.returncode == 0, removed.stderr
    assert not any((state / "routers").iterdir())


def test_a_valid_state_path_works(system):
    """The control of the state path cases: a real, root-only directory (the
    symlink case's own target among them) takes a router and answers status."""
    real = system.workdir / "real"
    real.mkdir(mode=0o700, exist_ok=True)
    add_and_remove(system, "control4", state=real)
    status = snat_sync(system, "status", state=real)
    assert status.returncode == 0, status.stderr
    known = snat_sync(system, "status", "known", "--json", state=system.known_state)
    assert known.returncode == 0 and '"known"' in known.stdout, known.stderr


@pytest.mark.parametrize("arguments", [
    ["backup"],
    ["INSTANCE", "VR_7", "BACKUP", "100"],
    ["--arrived", "now", "backup"],
])
def test_valid_notify_runs_a_transition(system, arguments):
    """The control of the notify cases: the same router and forms, valid, run a
    transition (exit 0) and record it."""
    arguments = [str(time.time()) if each == "now" else each for each in arguments]
    record = system.known_state / "routers" / "known" / "last-transition.json"
    result = snat_sync(system, "notify", "known", *arguments,
                       state=system.known_state)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert '"role": "backup"' in record.read_text().replace('":"', '": "')
