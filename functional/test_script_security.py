"""keepalived with enable_script_security accepts the notify hook `router add` writes.

keepalived checks a script's path when it loads its configuration and, for one that a
non-root user could change (the file, or any directory on its path, writable by group
or others without the sticky bit, or owned by another user), logs
    Unsafe permissions found for script '<path>' - disabling.
and never runs it. `keepalived -t` (config test) does not make that check, so
keepalived runs here for real, briefly, in a scratch namespace: one VRRP instance with
the hook `router add` wrote, and one with a copy of it in a world-writable directory
as the negative control. Accepted means: no complaint about our hook, a complaint
about the copy, and our hook really ran (keepalived's BACKUP notification reached
snat-sync and was recorded).
"""

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(map(shutil.which, ("conntrackd", "keepalived", "ip",
                                                    "nft"))),
    reason="needs root, conntrackd, keepalived, ip and nft")


def run(*argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (argv, result.stderr)
    return result


def snat_sync(state, *arguments, config):
    """snat-sync on config alone: an empty --config-dir keeps the default
    snat-sync.conf.d directories out, as --config-file does the default files."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    empty_directory = pathlib.Path(config).parent / "empty.conf.d"
    empty_directory.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "snat_sync", "--config-file", str(config),
         "--config-dir", str(empty_directory), "--state-path", str(state),
         *arguments],
        capture_output=True, text=True, timeout=60, env=environment)


def keepalived_config(interface, hooks):
    lines = ["global_defs {", "    enable_script_security", "    script_user root",
             "}"]
    for vrid, hook in hooks:
        lines += [
            f"vrrp_instance VR_{vrid} {{",
            "    state BACKUP",
            "    nopreempt",
            f"    interface {interface}",
            f"    virtual_router_id {vrid}",
            "    priority 100",
            "    advert_int 1",
            "    virtual_ipaddress {",
            f"        10.255.{vrid}.1/32 dev {interface}",
            "    }",
            f'    notify "{hook}"',
            "}",
        ]
    return "\n".join(lines) + "\n"


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def processes_in_namespace(namespace):
    try:
        inode = os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        return []
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.stat(f"/proc/{process.pid}/ns/net").st_ino == inode:
                found.append(process)
    return found


def hook_processes(namespace):
    """What runs in the namespace besides conntrackd: keepalived and the hook."""
    found = []
    for process in processes_in_namespace(namespace):
        with contextlib.suppress(psutil.Error):
            if process.name() != "conntrackd" and process.status() != "zombie":
                found.append(process)
    return found


def kill_in_namespace(namespace):
    victims = processes_in_namespace(namespace)
    for process in victims:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(victims, timeout=5)


@pytest.fixture
def scratch():
    tag = secrets.token_hex(3)
    namespace = f"sssec-{tag}"
    interface = f"ha-{tag}a"
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="sssec-", dir="/tmp"))
    try:
        run("ip", "netns", "add", namespace)
        for argv in (["link", "set", "lo", "up"],
                     ["link", "add", interface, "type", "veth", "peer", "name",
                      f"ha-{tag}b"],
                     ["addr", "add", "169.254.192.1/18", "dev", interface],
                     ["link", "set", interface, "up"],
                     ["link", "set", f"ha-{tag}b", "up"]):
            run("ip", "-n", namespace, *argv)
        yield namespace, interface, workdir
    finally:
        kill_in_namespace(namespace)
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True,
                       timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_keepalived_accepts_the_notify_hook_with_script_security(scratch):
    namespace, interface, workdir = scratch
    config = workdir / "snat-sync.conf"
    config.write_text("")
    state = workdir / "state"
    added = snat_sync(state, "router", "add", "sec1", "--namespace", namespace,
                      "--ha-interface", interface, "--local-address", "169.254.192.1",
                      "--peer-address", "169.254.192.2", "--vrid", "51", "--json",
                      config=config)
    assert added.returncode == 0, added.stderr
    hook = pathlib.Path(json.loads(added.stdout)["notify_command"])
    directory = hook.parent
    for path in (hook, *hook.parents):
        info = os.lstat(path)
        assert not stat.S_ISLNK(info.st_mode), path
        assert info.st_uid == 0, path
        assert not info.st_mode & 0o022 or info.st_mode & stat.S_ISVTX, path
    assert stat.S_IMODE(os.lstat(hook).st_mode) == 0o700

    unsafe_directory = workdir / "unsafe"
    unsafe_directory.mkdir()
    unsafe_directory.chmod(0o777)
    unsafe_hook = unsafe_directory / "notify.sh"
    unsafe_hook.write_text("#!/bin/sh\nexit 0\n")
    unsafe_hook.chmod(0o755)

    keepalived_directory = workdir / "keepalived"
    keepalived_directory.mkdir(mode=0o700)
    keepalived_conf = keepalived_directory / "keepalived.conf"
    keepalived_conf.write_text(keepalived_config(interface, [(51, hook),
                                                             (52, unsafe_hook)]))
    log = keepalived_directory / "keepalived.log"
    with open(log, "wb") as stream:
        keepalived = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "keepalived", "--vrrp", "--dont-fork",
             "--log-console", "--log-detail", "--no-syslog",
             "--use-file", str(keepalived_conf),
             "--pid", str(keepalived_directory / "keepalived.pid"),
             "--vrrp_pid", str(keepalived_directory / "vrrp.pid"),
             "--checkers_pid", str(keepalived_directory / "checkers.pid")],
            stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    recorded = directory / "last-transition.json"
    try:
        ran = wait_for(recorded.exists, timeout=10)
        record = json.loads(recorded.read_text()) if ran else None
        text = log.read_text(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(keepalived.pid, signal.SIGTERM)
        try:
            keepalived.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(keepalived.pid, signal.SIGKILL)
            keepalived.wait(timeout=5)
        # keepalived runs the hook once more (STOP) as it exits; let that finish.
        wait_for(lambda: not hook_processes(namespace), timeout=10)

    assert "Startup complete" in text, text
    assert f"Unsafe permissions found for script '{unsafe_hook}'" in text, text
    complaints = [line for line in text.splitlines()
                  if str(hook) in line and ("nsafe" in line or "SECURITY" in line
                                            or "disabl" in line)]
    assert not complaints, complaints
    assert ran, f"keepalived did not run the hook: {text}"
    assert record["role"] == "backup", record
    for path in directory.iterdir():
        info = os.lstat(path)
        assert info.st_uid == 0, path
        assert not info.st_mode & 0o077 or stat.S_ISSOCK(info.st_mode), (
            path, oct(info.st_mode))

    removed = snat_sync(state, "router", "remove", "sec1", config=config)
    assert removed.returncode == 0, removed.stderr
    assert not directory.exists()
