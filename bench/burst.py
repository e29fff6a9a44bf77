"""Benchmark: replication of a large burst of entries to the backup.

For each run: a fresh pair of router namespaces (one veth as HA network) with
conntrackd run by `snat-sync router add` on both, BACKUP / MASTER transitions run
through the hooks, then N idle entries (`lab.idle_entry`, half TCP, half UDP) loaded
into the primary's kernel with one `conntrack -R FILE`. The backup's replica is
polled until it holds N or has not grown for --stall s: its external cache (cold
standby; a socket request) or the entries its kernel table gained (warm standby,
the default; `conntrack -C`).

Reported per run: load time, time from the load's start until the backup holds N
(or where it stopped), the backup's `-s network` counters (lost packets), the
primary's `-s queue` (resend queue), UDP receive / send buffer errors and veth drops
in both namespaces, softnet backlog drops (global, read only), the sync sockets'
buffer sizes as `ss -m` shows them, the peak bytes queued on the primary
conntrackd's netfilter netlink sockets and on the backup's UDP sockets (sampled every
5 ms from /proc/PID/net), and conntrackd RSS idle and after the burst.

Variants: --config FILE is given to `snat-sync router add` ([conntrackd] options);
--edit 'Key value' rewrites (or adds) a line of the rendered conntrackd.conf on both
sides and restarts conntrackd (SCHED_OTHER, as snat-sync runs it); --txqueuelen sets
the HA veth's queue length; --burn N runs N busy loops meanwhile (a loaded node);
--rt-loader runs the loader at SCHED_FIFO (the kernel inserting at full speed);
--busy-backup N pins the backup's conntrackd to CPU 1 with N busy loops, the primary's
conntrackd and the loader to CPU 0 (a busy backup node); --node-return then empties
the backup's kernel table and asks for the whole table (`-n`), as a node returning
with an empty table does, and times the resync (time to redundancy);
--daemons runs `snat-sync daemon` on both nodes from before the burst, so the
backup's health checks see it and repair its replica as they would (the repair
loads the primary's table from its daemon);
--table-transfer (with --node-return) runs `snat-sync daemon` for the primary's
node and, after the `-n` return, empties the backup's table once more and
takes it to BACKUP again through its notify hook (FAULT first, so the
transition is not already done): the warm backup's resync then loads the table
from the primary's daemon (table_transfer.py); both returns in one run; --raw-floor
sends the burst's bytes once more over the HA link, in datagrams of the same size,
with a plain UDP sender: the transfer floor.

    python3 bench/burst.py [--size 250000] [--runs 3] [--config F] [--edit 'K V']...
"""

import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import psutil  # noqa: E402

from snat_sync.lab import topology as lab_module  # noqa: E402

FTFW_KEYS = ("ResendQueueSize", "ACKWindowSize", "DisableExternalCache", "PurgeTimeout")
UDP_KEYS = ("SndSocketBuffer", "RcvSocketBuffer")


def edit_config(path, edits):
    text = path.read_text()
    for edit in edits:
        key, value = edit.split(None, 1)
        pattern = re.compile(rf"^(\s*){key} \S+$", re.M)
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{m.group(1)}{key} {value}", text)
        elif key in FTFW_KEYS:
            text = re.sub(r"(Mode FTFW \{\n)", rf"\1\t\t{key} {value}\n", text)
        elif key in UDP_KEYS:
            text = re.sub(r"(UDP \{\n)", rf"\1\t\t{key} {value}\n", text)
        else:
            text = re.sub(r"(General \{\n)", rf"\1\t{key} {value}\n", text)
    path.write_text(text)


def conntrackd_processes(namespace):
    return lab_module.named_processes_in_namespace(namespace, "conntrackd")


def restart(namespace, config):
    directory = config.parent
    subprocess.run(["conntrackd", "-C", str(config), "-k"], capture_output=True,
                   timeout=10)
    if not lab_module.wait_until(lambda: not conntrackd_processes(namespace), 10):
        lab_module.kill_processes(conntrackd_processes(namespace))
    for stale in ("conntrackd.lock", "conntrackd.ctl"):
        (directory / stale).unlink(missing_ok=True)
    common.sh("conntrackd", "-C", config, "-d", namespace=namespace)
    if not lab_module.wait_until((directory / "conntrackd.ctl").exists, 10):
        raise RuntimeError(f"restarted conntrackd made no socket: {config}")
    for process in conntrackd_processes(namespace):
        for thread in process.threads():
            os.sched_setscheduler(thread.id, os.SCHED_OTHER, os.sched_param(0))


def rss_kb(namespace):
    return sum(process.memory_info().rss // 1024
               for process in conntrackd_processes(namespace))


def nstat(namespace):
    out = common.sh("nstat", "-az", "--json", namespace=namespace, check=False).stdout
    with contextlib.suppress(ValueError):
        data = json.loads(out)
        flat = {}
        for group in data.values():
            flat.update(group)
        return flat
    return {}


def link_stats(namespace):
    data = json.loads(common.sh("ip", "-s", "-j", "link", "show", "ha0",
                                namespace=namespace).stdout)[0]
    stats = data.get("stats64", data.get("stats", {}))
    return {"rx_dropped": stats["rx"]["dropped"], "tx_dropped": stats["tx"]["dropped"],
            "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"],
            "tx_bytes": stats["tx"]["bytes"]}


def softnet_dropped():
    return sum(int(line.split()[1], 16) for line in open("/proc/net/softnet_stat"))


def socket_memory(namespace):
    out = common.sh("ss", "-uamn", namespace=namespace).stdout
    found = re.findall(r"skmem:\(([^)]*)\)", out)
    return [dict(re.findall(r"([a-z]+)(\d+)", each)) for each in found]


def netlink_memory(namespace):
    """(Rmem, Drops) of the namespace's NETLINK_NETFILTER sockets."""
    out = common.sh("cat", "/proc/net/netlink", namespace=namespace).stdout
    found = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 9 and fields[1] == "12":
            found.append((int(fields[4]), int(fields[8])))
    return found


class PeakSampler(threading.Thread):
    """Largest memory queued, while it runs, on the primary conntrackd's netfilter
    netlink sockets and on the backup's UDP sockets (/proc/PID/net of each)."""

    def __init__(self, primary_pid, backup_pid, interval=0.005):
        super().__init__(daemon=True)
        self.paths = (f"/proc/{primary_pid}/net/netlink", f"/proc/{backup_pid}/net/udp")
        self.interval = interval
        self.netlink_peak = self.udp_peak = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(self.paths[0]) as source:
                    for line in source.read().splitlines()[1:]:
                        fields = line.split()
                        if fields[1] == "12":
                            self.netlink_peak = max(self.netlink_peak, int(fields[4]))
                with open(self.paths[1]) as source:
                    for line in source.read().splitlines()[1:]:
                        queued = int(line.split()[4].split(":")[1], 16)
                        self.udp_peak = max(self.udp_peak, queued)
            time.sleep(self.interval)


def ctl(config, *args, namespace=None):
    return common.sh("conntrackd", "-C", config, *args, check=False,
                     namespace=namespace).stdout


def numbers(text, label):
    match = re.search(rf"{label}:?\s+(\d+)", text)
    return int(match.group(1)) if match else None


def pin(namespace, cpu):
    for process in conntrackd_processes(namespace):
        for thread in process.threads():
            os.sched_setaffinity(thread.id, {cpu})


def return_with_empty_table(r2, backup, size, limit, stall):
    """The backup returns with an empty table: its kernel table is emptied and it
    asks the primary for the whole one, as a node becoming backup does. Seconds
    until its kernel table holds `size` entries again (or how far it got)."""
    common.sh("conntrack", "-F", namespace=r2, check=False)
    started = time.time()
    ctl(backup["conntrackd_config"], "-n")
    last, grown_at, count = -1, time.time(), 0
    while time.time() - started < limit:
        count = common.conntrack_count(r2)
        if count >= size:
            return {"complete_s": round(time.time() - started, 2), "held": count}
        if count != last:
            last, grown_at = count, time.time()
        elif time.time() - grown_at > stall:
            break
        time.sleep(0.1)
    return {"complete_s": None, "held": count,
            "stopped_s": round(time.time() - started, 2)}


def return_through_the_hook(r2, backup, size, limit):
    """The backup returns with an empty table and becomes backup through its notify
    hook, which asks the primary's daemon for the table. Seconds from the hook's
    start until the kernel table holds `size` entries, and what the hook logged
    of the transfer."""
    common.sh("conntrack", "-F", namespace=r2, check=False)
    common.sh(backup["notify_command"], "INSTANCE", "VR_1", "FAULT", "100",
              namespace=r2)
    common.sh("conntrack", "-F", namespace=r2, check=False)
    started = time.time()
    hook = subprocess.Popen(
        ["ip", "netns", "exec", r2, backup["notify_command"], "INSTANCE", "VR_1",
         "BACKUP", "100"])
    complete_at, count = None, 0
    while time.time() - started < limit:
        finished = hook.poll() is not None
        count = common.conntrack_count(r2)
        if count >= size:
            complete_at = time.time() - started
            break
        if finished:
            break
        time.sleep(0.02)
    hook.wait(timeout=limit)
    log = (backup["directory"] / "notify.log").read_text().splitlines()
    return {"complete_s": complete_at and round(complete_at, 2), "held": count,
            "hook_exit": hook.returncode,
            "transfer_log": [line for line in log if "table" in line][-2:]}


RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(2.0)
got, first, last = 0, None, None
print("ready", flush=True)
try:
    while got < int(sys.argv[3]):
        n = len(s.recv(65535))
        last = time.time()
        first = first or last
        got += n
except socket.timeout:
    pass
print(got, first, last, flush=True)
"""

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 32, 64 << 20)  # SO_SNDBUFFORCE
total, size = int(sys.argv[3]), int(sys.argv[4])
payload = bytes(size)
sent = 0
while sent < total:
    try:
        sent += s.sendto(payload, (sys.argv[1], int(sys.argv[2])))
    except BlockingIOError:
        pass
"""


def raw_transfer(bench, r1, r2, total_bytes, datagram):
    """Seconds a plain UDP sender takes to move total_bytes in datagrams of
    `datagram` bytes from r1 to r2 over the HA link, first to last byte received,
    and how many bytes arrived."""
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", r2, sys.executable, "-c", RECEIVER,
         common.HA_ADDRESSES[1], "39999", str(total_bytes)],
        stdout=subprocess.PIPE, text=True)
    try:
        receiver.stdout.readline()
        common.sh("ip", "netns", "exec", r1, sys.executable, "-c", SENDER,
                  common.HA_ADDRESSES[1], 39999, total_bytes, datagram, timeout=120)
        got, first, last = receiver.communicate(timeout=60)[0].split()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    seconds = float(last) - float(first) if first != "None" else None
    return {"bytes": total_bytes, "datagram": datagram, "received": int(got),
            "seconds": seconds and round(seconds, 3)}


def start_daemon(bench, node, config_file):
    """`snat-sync daemon` for a node of the pair, its metrics endpoint on a free
    port; stopped by pid with the bench."""
    name = node["state_path"].name
    config = bench.workdir / f"daemon-{name}.conf"
    config.write_text((pathlib.Path(config_file).read_text() if config_file else "")
                      + "\n[metrics]\nlisten_port = 0\n")
    config.chmod(0o600)
    argv = lab_module.snat_sync_argv(node["state_path"], "--config-file", config,
                                     "daemon", "--workers", 2)
    with open(bench.workdir / f"daemon-{name}.log", "ab") as log:
        process = subprocess.Popen([str(a) for a in argv], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, PYTHONPATH=str(common.REPO)))
    bench.processes.append(process)
    return process


def one_run(size, entries_path, config_file, edits, txqueuelen, stall, limit, burn=0,
            busy_backup=0, rt_loader=False, resync_after=False, raw_floor=False,
            table_transfer=False, daemons=False):
    with common.Bench("burst") as bench:
        r1, r2 = bench.router_pair()
        for index in range(burn):
            # CPU hogs (a busy node); stopped by pid with the bench.
            bench.start(r1, ["sh", "-c", "while :; do :; done"],
                        bench.workdir / f"burn{index}.log")
        if txqueuelen is not None:
            for namespace in (r1, r2):
                common.sh("ip", "-n", namespace, "link", "set", "ha0", "txqueuelen",
                          txqueuelen)
        primary = bench.add_router(r1, 0, config_file=config_file)
        backup = bench.add_router(r2, 1, config_file=config_file)
        if edits:
            for namespace, side in ((r1, primary), (r2, backup)):
                config = pathlib.Path(side["conntrackd_config"])
                # The role's variant is what a transition runs: edit them too.
                for path in (config, *config.parent.glob("conntrackd.*.conf")):
                    edit_config(path, edits)
                restart(namespace, config)
        common.sh(backup["notify_command"], "INSTANCE", "VR_1", "BACKUP", "100",
                  namespace=r2)
        common.sh(primary["notify_command"], "INSTANCE", "VR_1", "MASTER", "100",
                  namespace=r1)
        if busy_backup:
            # A busy backup node: its conntrackd shares CPU 1 with busy loops, the
            # primary's conntrackd and the loader keep CPU 0.
            pin(r1, 0)
            pin(r2, 1)
            for index in range(busy_backup):
                bench.start(r2, ["taskset", "-c", "1", "sh", "-c", "while :; do :; done"],
                            bench.workdir / f"busy{index}.log")
        if table_transfer or daemons:
            start_daemon(bench, primary, config_file)
        if daemons:
            start_daemon(bench, backup, config_file)
        time.sleep(0.5)
        backup_socket = backup["directory"] / "conntrackd.ctl"
        primary_socket = primary["directory"] / "conntrackd.ctl"
        rss_idle = (rss_kb(r1), rss_kb(r2))
        sockets = {"primary": socket_memory(r1), "backup": socket_memory(r2)}
        before = {"nstat_r1": nstat(r1), "nstat_r2": nstat(r2),
                  "link_r1": link_stats(r1), "link_r2": link_stats(r2),
                  "softnet": softnet_dropped()}
        sampler = PeakSampler(conntrackd_processes(r1)[0].pid,
                              conntrackd_processes(r2)[0].pid)
        sampler.start()
        # Warm standby (DisableExternalCache On) puts the replica in the backup's
        # kernel table, cold standby in its external cache: count whichever grows.
        backup_kernel_before = common.conntrack_count(r2)
        started = time.time()
        loader = ["taskset", "-c", "0"] if busy_backup else []
        if rt_loader:
            # The kernel inserting at full speed (as softirq would), ahead of
            # every conntrackd: real-time FIFO, RT throttling leaves them 5%.
            loader = ["chrt", "-f", "10", *loader]
        common.sh(*loader, "conntrack", "-R", entries_path, namespace=r1, timeout=300)
        loaded = time.time() - started
        kernel = common.conntrack_count(r1)
        last, grown_at, complete_at, count = -1, time.time(), None, 0
        while time.time() - started < limit:
            try:
                count = max(common.cache_counts(backup_socket).external_active,
                            common.conntrack_count(r2) - backup_kernel_before)
            except (OSError, RuntimeError):
                continue
            if count >= size:
                complete_at = time.time() - started
                break
            if count != last:
                last, grown_at = count, time.time()
            elif time.time() - grown_at > stall:
                break
            time.sleep(0.1)
        stopped_at = time.time() - started
        sampler.done.set()
        sampler.join()
        # The burst's own traffic, before any node return adds to it: what the
        # transfer floor resends.
        burst_link = link_stats(r1)
        node_return = None
        if resync_after and complete_at is not None:
            node_return = return_with_empty_table(r2, backup, size, limit, stall)
            if table_transfer:
                node_return["table_transfer"] = return_through_the_hook(
                    r2, backup, size, limit)
                node_return["table_transfer"]["primary_log"] = [
                    line for line in (bench.workdir / "daemon-node0.log").read_text()
                    .splitlines() if "entries of the table" in line][-1:]
        try:
            primary_internal = common.cache_counts(primary_socket).internal_active
        except OSError as error:
            primary_internal = f"no answer: {error}"
        netlink_after = netlink_memory(r1)
        after = {"nstat_r1": nstat(r1), "nstat_r2": nstat(r2),
                 "link_r1": link_stats(r1), "link_r2": link_stats(r2),
                 "softnet": softnet_dropped()}
        backup_network = ctl(backup["conntrackd_config"], "-s", "network")
        backup_general = ctl(backup["conntrackd_config"], "-s")
        primary_network = ctl(primary["conntrackd_config"], "-s", "network")
        primary_queue = ctl(primary["conntrackd_config"], "-s", "queue")

        def delta(key, name):
            return after[key].get(name, 0) - before[key].get(name, 0)

        result = {
            "size": size, "loadavg": os.getloadavg()[0], "kernel": kernel,
            "load_s": round(loaded, 2),
            "complete_s": complete_at and round(complete_at, 2),
            "backup_external": count, "missing": size - count,
            "stopped_s": round(stopped_at, 2),
            "primary_internal": primary_internal,
            "backup_packets_lost": numbers(backup_network, "Packets lost"),
            "backup_network": " | ".join(line.strip() for line in
                                         backup_network.splitlines() if line.strip()),
            "primary_network": " | ".join(line.strip() for line in
                                          primary_network.splitlines() if line.strip()),
            "primary_queue": " | ".join(line.strip() for line in
                                        primary_queue.splitlines() if line.strip()),
            "udp_rcvbuf_errors_backup": delta("nstat_r2", "UdpRcvbufErrors"),
            "udp_in_errors_backup": delta("nstat_r2", "UdpInErrors"),
            "udp_rcvbuf_errors_primary": delta("nstat_r1", "UdpRcvbufErrors"),
            "udp_sndbuf_errors_primary": delta("nstat_r1", "UdpSndbufErrors"),
            "veth_tx_dropped_primary": after["link_r1"]["tx_dropped"]
            - before["link_r1"]["tx_dropped"],
            "veth_rx_dropped_backup": after["link_r2"]["rx_dropped"]
            - before["link_r2"]["rx_dropped"],
            "packets_primary_to_backup": burst_link["tx_packets"]
            - before["link_r1"]["tx_packets"],
            "bytes_primary_to_backup": burst_link["tx_bytes"]
            - before["link_r1"]["tx_bytes"],
            "softnet_dropped": after["softnet"] - before["softnet"],
            "rss_idle_kb": rss_idle, "rss_after_kb": (rss_kb(r1), rss_kb(r2)),
            "netlink_peak_bytes": sampler.netlink_peak,
            "backup_udp_peak_bytes": sampler.udp_peak,
            "sockets": sockets, "primary_netlink_after": netlink_after,
            "backup_log_tail": (backup["directory"] / "conntrackd.log").read_text()
            .splitlines()[-5:],
            "primary_log_tail": (primary["directory"] / "conntrackd.log").read_text()
            .splitlines()[-8:],
            "primary_general": " | ".join(
                line.strip() for line in ctl(primary["conntrackd_config"], "-s")
                .splitlines() if line.strip()),
        }
        if node_return is not None:
            result["node_return"] = node_return
        if daemons:
            result["backup_repairs"] = [
                line for line in (bench.workdir / "daemon-node1.log").read_text()
                .splitlines() if "repair" in line or "entries created" in line]
        if raw_floor:
            # The same bytes in datagrams of the same size, sent once over the HA
            # link from r1 to r2 by a plain sender: the transfer floor.
            packets = max(1, result["packets_primary_to_backup"])
            try:
                result["raw_transfer"] = raw_transfer(
                    bench, r1, r2, result["bytes_primary_to_backup"],
                    max(64, result["bytes_primary_to_backup"] // packets - 42))
            except (RuntimeError, subprocess.SubprocessError, ValueError) as error:
                # The run's own figures still count.
                result["raw_transfer"] = {"error": str(error)[-300:]}
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=250000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", help="snat-sync config file for router add")
    parser.add_argument("--edit", action="append", default=[],
                        help="'Key value' line for the rendered conntrackd.conf")
    parser.add_argument("--txqueuelen", type=int)
    parser.add_argument("--stall", type=float, default=10.0)
    parser.add_argument("--limit", type=float, default=60.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--busy-backup", type=int, default=0,
                        help="busy loops sharing CPU 1 with the backup's conntrackd "
                        "(primary and loader on CPU 0)")
    parser.add_argument("--rt-loader", action="store_true",
                        help="run conntrack -R at SCHED_FIFO 10")
    parser.add_argument("--burn", type=int, default=0,
                        help="busy-loop processes running during the run")
    parser.add_argument("--node-return", action="store_true",
                        help="after the burst, empty the backup's table and time "
                        "its resync (a node returning with an empty table)")
    parser.add_argument("--daemons", action="store_true",
                        help="run snat-sync daemon on both nodes from before the "
                        "burst (health checks and their repairs)")
    parser.add_argument("--table-transfer", action="store_true",
                        help="with --node-return: also return through the notify "
                        "hook, the table loaded from the primary's daemon")
    parser.add_argument("--raw-floor", action="store_true",
                        help="also time the burst's bytes sent once over the HA "
                        "link by a plain UDP sender (the transfer floor)")
    parser.add_argument("--json", help="append results here (one JSON per line)")
    arguments = parser.parse_args()
    workdir = pathlib.Path(common.tempfile.mkdtemp(prefix="snat-sync-burst-"))
    try:
        entries = workdir / "entries.txt"
        entries.write_text("".join(lab_module.idle_entry(index) + "\n"
                                   for index in range(arguments.size)))
        with common.kernel_limits_for(arguments.size,
                                      lambda text: print(text, file=sys.stderr)):
            for run in range(arguments.runs):
                report(arguments, run, one_run(
                    arguments.size, entries, arguments.config, arguments.edit,
                    arguments.txqueuelen, arguments.stall, arguments.limit,
                    arguments.burn, arguments.busy_backup, arguments.rt_loader,
                    arguments.node_return, arguments.raw_floor,
                    arguments.table_transfer, arguments.daemons))
    finally:
        subprocess.run(["rm", "-rf", str(workdir)])


def report(arguments, run, result):
    result.update(label=arguments.label, run=run, edits=arguments.edit,
                  config=arguments.config and pathlib.Path(arguments.config).read_text(),
                  txqueuelen=arguments.txqueuelen, burn=arguments.burn,
                  busy_backup=arguments.busy_backup, rt_loader=arguments.rt_loader)
    print(json.dumps(result), flush=True)
    if arguments.json:
        with open(arguments.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
