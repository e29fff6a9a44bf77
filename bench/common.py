"""Helpers shared by the benchmarks in bench/ (root; namespaces only).

Every namespace a benchmark creates is named `ssb-<hex>-...`, every process it starts
is tracked and stopped by pid, and `Bench` removes everything however the run ends.
Nothing is added to the root namespace.
"""

import argparse
import contextlib
import ctypes
import json
import math
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Every child (snat-sync CLI, notify hooks, keepalived and what it runs) imports the
# package from this tree, not from wherever it happens to be installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

from snat_sync import conntrackd  # noqa: E402
from snat_sync.lab import topology as lab_module  # noqa: E402

HA_ADDRESSES = ("169.254.192.1", "169.254.192.2")
GATEWAY = "203.0.113.10"


def sh(*argv, namespace=None, check=True, capture=True, timeout=120):
    argv = [str(each) for each in argv]
    if namespace is not None:
        argv = ["nsenter", f"--net=/run/netns/{namespace}", *argv]
    result = subprocess.run(argv, capture_output=capture, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout or '').strip()}")
    return result


def integer_list(text):
    """An argparse type: comma-separated integers ("0,200000") as a list."""
    try:
        return [int(each) for each in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of integers: {text!r}") from None


def load_average():
    return os.getloadavg()


def uptime_line():
    return sh("uptime").stdout.strip()


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def conntrack_count(namespace):
    """Entries in the namespace's kernel table (`conntrack -C`)."""
    return int(sh("conntrack", "-C", namespace=namespace).stdout.split()[0])


def snat_entry_lines(count, first=0, timeout=1200, protocol="tcp", server="203.0.113.100"):
    """`conntrack -R` lines for `count` established SNAT entries.

    Original tuples 10.<b>.x.y:sport -> server:20000+b, SNAT'ed to GATEWAY:1024+j;
    blocks of 60,000 keep every reply tuple unique. Server ports 20000+ never meet
    the lab's live flows.
    """
    lines = []
    for index in range(first, first + count):
        block, j = divmod(index, 60000)
        extra = "--state ESTABLISHED " if protocol == "tcp" else ""
        lines.append(
            f"-I -p {protocol} -s 10.{1 + block}.{j // 250}.{j % 250 + 1} -d {server} "
            f"--sport {10000 + j % 50000} --dport {20000 + block} "
            f"--src-nat {GATEWAY}:{1024 + j} -u SEEN_REPLY,ASSURED -t {timeout} "
            f"{extra}".rstrip() + "\n")
    return lines


def write_entries(path, count, **kwargs):
    with open(path, "w") as stream:
        stream.writelines(snat_entry_lines(count, **kwargs))
    return path


def cache_counts(socket_path):
    """The cache figures of a conntrackd, straight from its control socket."""
    text = conntrackd.query_stats(socket_path, "cache", 5.0)
    if text is None:
        raise OSError(f"conntrackd on {socket_path} does not answer")
    return conntrackd.parse_cache_stats(text)


class Bench:
    """Namespaces, state paths and processes of one benchmark run; `close` (or the
    context manager) removes all of them."""

    def __init__(self, name):
        self.prefix = f"ssb-{secrets.token_hex(3)}"
        self.name = name
        self.namespaces = []
        self.processes = []
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"snat-sync-{name}-"))
        self.routers = []  # (state_path, router_id)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        self.close()
        signal.signal(signal.SIGTERM, self._previous)

    def namespace(self, suffix):
        name = f"{self.prefix}-{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def router_pair(self):
        """Two router namespaces joined by one veth (the HA network), each with a
        qr veth pair of its own to carry a VIP. Returns (r1, r2)."""
        r1, r2 = self.namespace("r1"), self.namespace("r2")
        sh("ip", "-n", r1, "link", "add", "ha0", "type", "veth", "peer", "name", "ha0",
           "netns", r2)
        for namespace, address in zip((r1, r2), HA_ADDRESSES):
            sh("ip", "-n", namespace, "addr", "add", f"{address}/18", "dev", "ha0")
            sh("ip", "-n", namespace, "link", "set", "ha0", "up")
            sh("ip", "-n", namespace, "link", "add", "qr0", "type", "veth",
               "peer", "name", "qr1")
            sh("ip", "-n", namespace, "link", "set", "qr0", "up")
            sh("ip", "-n", namespace, "link", "set", "qr1", "up")
        return r1, r2

    def snat_sync(self, state_path, *args, check=True):
        # The lab's sandbox config unless args give one: never the host's.
        argv = lab_module.snat_sync_argv(state_path, *args)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                                timeout=120, env=env)
        if check and result.returncode != 0:
            raise RuntimeError(f"snat-sync {' '.join(map(str, args))}: {result.stderr}")
        return result

    def add_router(self, namespace, index, router_id="bench", vrid=1,
                   config_file=None):
        """`snat-sync router add` for one side of the pair; returns its answer."""
        state_path = self.workdir / f"node{index}"
        args = []
        if config_file:
            args += ["--config-file", config_file]
        answer = json.loads(self.snat_sync(
            state_path, *args, "router", "add", router_id, "--namespace", namespace,
            "--ha-interface", "ha0", "--local-address", HA_ADDRESSES[index],
            "--peer-address", HA_ADDRESSES[1 - index], "--vrid", vrid, "--json",
        ).stdout)
        self.routers.append((state_path, router_id, args))
        answer["state_path"] = state_path
        answer["directory"] = pathlib.Path(answer["state_directory"])
        return answer

    def start(self, namespace, argv, log_path, stdin=None, stdout=None):
        """Start argv inside namespace (stderr, and stdout unless given, to log_path);
        stopped by pid at close."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{namespace}", *map(str, argv)],
                stdin=stdin, stdout=stdout or log, stderr=log,
                start_new_session=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.processes.append(process)
        return process

    def close(self):
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                lab_module.stop_process(process)
        for state_path, router_id, args in self.routers:
            with contextlib.suppress(Exception):
                self.snat_sync(state_path, *args, "router", "remove", router_id,
                               check=False)
        for namespace in self.namespaces:
            with contextlib.suppress(Exception):
                lab_module.kill_processes(lab_module.processes_in_namespace(namespace))
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        self.namespaces.clear()
        self.processes.clear()
        subprocess.run(["rm", "-rf", str(self.workdir)])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_until(predicate, timeout, interval=0.05):
    return lab_module.wait_until(predicate, timeout, interval)


# --- a kernel-table counter that runs inside a namespace -----------------------------


def start_count_poller(bench, namespace, output, interval, duration):
    """Poll the namespace's nf_conntrack_count every `interval` s for `duration` s,
    from a process inside it, writing `time.time() count` pairs (on change) to output."""
    return bench.start(namespace, [sys.executable, __file__, "poll-count", output,
                                   interval, duration], str(output) + ".log")


def read_count_samples(output):
    samples = []
    with contextlib.suppress(FileNotFoundError):
        for line in open(output):
            stamp, count = line.split()
            samples.append((float(stamp), int(count)))
    return samples


def _poll_count(output, interval, duration):
    deadline = time.monotonic() + duration
    last = None
    with open(output, "w", buffering=1) as out, \
            open("/proc/sys/net/netfilter/nf_conntrack_count") as source:
        while time.monotonic() < deadline:
            source.seek(0)
            count = source.read().strip()
            if count != last:
                out.write(f"{time.time():.6f} {count}\n")
                last = count
            time.sleep(interval)


def start_sync_poller(bench, namespace, socket_path, output, interval, duration,
                      replica_namespace=None):
    """Like start_count_poller, and also the replica's size: lines `time.time()
    kernel_count replica_count`. The replica is the external cache of the conntrackd
    behind socket_path (cold standby), or with replica_namespace the kernel table of
    that namespace (warm standby: the backup injects what it receives)."""
    argv = [sys.executable, __file__, "poll-sync", socket_path, output, interval,
            duration]
    if replica_namespace:
        argv.append(replica_namespace)
    return bench.start(namespace, argv, str(output) + ".log")


def read_sync_samples(output):
    samples = []
    with contextlib.suppress(FileNotFoundError):
        for line in open(output):
            stamp, kernel, external = line.split()
            samples.append((float(stamp), int(kernel), int(external)))
    return samples


CLONE_NEWNET = 0x40000000


def open_count_in(namespace):
    """nf_conntrack_count of another network namespace, opened inside it: a sysctl
    file keeps reading the namespace it was opened in (checked here: such a file
    read from the root namespace gave the other namespace's count). Python 3.11
    has no os.setns, hence libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    other = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(other, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            return open("/proc/sys/net/netfilter/nf_conntrack_count")
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(other)


def _poll_sync(socket_path, output, interval, duration, replica_namespace=None):
    deadline = time.monotonic() + duration
    last = None
    replica_source = open_count_in(replica_namespace) if replica_namespace else None

    def replica():
        if replica_source is None:
            return cache_counts(socket_path).external_active
        replica_source.seek(0)
        return replica_source.read().strip()

    with open(output, "w", buffering=1 << 20) as out, \
            open("/proc/sys/net/netfilter/nf_conntrack_count") as source:
        try:
            while time.monotonic() < deadline:
                source.seek(0)
                kernel = source.read().strip()
                held = replica()
                stamp = time.time()
                if (kernel, held) != last:
                    out.write(f"{stamp:.6f} {kernel} {held}\n")
                    last = (kernel, held)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


CONNTRACK_MAX = pathlib.Path("/proc/sys/net/netfilter/nf_conntrack_max")
HASHSIZE = pathlib.Path("/sys/module/nf_conntrack/parameters/hashsize")
HEADROOM = 1.1  # the kernel limits must fit 1.1 x the largest idle table


# --- the kernel's global conntrack limits ---------------------------------------------


@contextlib.contextmanager
def kernel_limits_for(entries, say):
    """Raise nf_conntrack_max and the hash size to fit `entries` x HEADROOM if they
    are lower (never lower them); restore the previous values on the way out."""
    needed = math.ceil(entries * HEADROOM)
    previous = {path: int(path.read_text().split()[0])
                for path in (CONNTRACK_MAX, HASHSIZE)}
    changed = []
    try:
        for path in (HASHSIZE, CONNTRACK_MAX):
            if previous[path] < needed:
                changed.append(path)
                path.write_text(str(needed))
                say(f"{path}: {previous[path]} -> {path.read_text().strip()}")
        yield {str(path): int(path.read_text().split()[0]) for path in previous}
    finally:
        for path in reversed(changed):
            try:
                path.write_text(str(previous[path]))
                say(f"{path}: restored {path.read_text().strip()}")
            except OSError as error:
                say(f"{path}: could not restore {previous[path]}: {error}")


if __name__ == "__main__" and sys.argv[1:2] == ["poll-sync"]:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _poll_sync(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]),
               *sys.argv[6:7])

if __name__ == "__main__" and sys.argv[1:2] == ["poll-count"]:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    _poll_count(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
