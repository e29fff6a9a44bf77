"""The failover of connections that need more than a plain entry: FTP and SIP through
the kernel's helpers, and SCTP.

One lab, one crash of the primary, flows of every kind across it:

- FTP (`ftp`): two downloads running at the crash (passive and active mode), and
  a passive and an active session whose data connection was announced (PASV,
  PORT) before the crash and opens after it, then a fresh one and a download on
  the new primary;
- SIP (`sip`): a call set up before the crash, whose RTP starts after it;
- SCTP (`sctp`): two associations from two client addresses sharing a port.

Both routers get what an operator sets up for helpers on a modern kernel, which
assigns no helper by itself (nf_conntrack_helper=0): CT rules in the raw table
(`-j CT --helper ftp` for TCP 21, `sip` for UDP 5060), and a stateful forward
policy that lets new connections out only to those ports and, with an INIT
chunk (as `--syn` does for TCP), to SCTP 9900, and everything else in or out only
as ESTABLISHED or RELATED: a data connection or an RTP stream passes only as an
expectation's, and an SCTP association only where the router knows it.
"""

import dataclasses
import json
import pathlib
import time

from snat_sync.lab import demo
from snat_sync.lab import ftp
from snat_sync.lab import nodes
from snat_sync.lab import sctp
from snat_sync.lab import sip
from snat_sync.lab import topology as lab_module

FTP_ADDRESSES = (*lab_module.CLIENT_ADDRESSES[:3], lab_module.CLIENT_ADDRESSES[6])
SIP_ADDRESS = lab_module.CLIENT_ADDRESSES[3]
SCTP_ADDRESSES = lab_module.CLIENT_ADDRESSES[4:6]
# The SIP and SCTP clients run this long; the crash comes about 1 s after every
# client is ready, the new primary about 3 s later.
CLIENT_DURATION = 12.0
SETTLE_BEFORE_CRASH = 1.0


@dataclasses.dataclass(frozen=True)
class HelperResult:
    ftp: dict
    sip: dict
    sctp_client: dict
    sctp_server: dict
    failover_seconds: float
    # What r2's kernel held just before r1 crashed: `conntrack -L expect` lines
    # and SCTP entries.
    replica_expectations: tuple
    replica_sctp_entries: tuple

    def ftp_transfers(self, session):
        return [each for each in self.ftp["transfers"] if each["session"] == session]


def operator_rules(router):
    """The helper assignment and the stateful forward policy, as iptables argv."""
    inside = router.internal.device
    return [
        ["-t", "raw", "-A", "PREROUTING", "-i", inside, "-p", "tcp", "--dport",
         str(ftp.CONTROL_PORT), "-j", "CT", "--helper", "ftp"],
        ["-t", "raw", "-A", "PREROUTING", "-i", inside, "-p", "udp", "--dport",
         str(sip.SIP_PORT), "-j", "CT", "--helper", "sip"],
        ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
         "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", inside, "-p", "tcp", "--dport",
         str(ftp.CONTROL_PORT), "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", inside, "-p", "udp", "--dport", str(sip.SIP_PORT),
         "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", inside, "-p", "sctp", "--dport",
         str(sctp.SERVER_PORT), "--chunk-types", "any", "INIT", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-j", "DROP"],
    ]


def install_operator_rules(lab):
    for router in lab.routers:
        for rule in operator_rules(router):
            lab_module.run(["iptables", *rule], namespace=router.namespace)


def start(lab, workdir, name, namespace, module, *arguments):
    return lab_module.start_process(
        lab, namespace, lab_module.python_module(f"snat_sync.lab.{module}", *arguments),
        workdir / f"{name}.log")


def wait_for_file(path, process, log, timeout):
    """Wait for a ready file; raise LabError with the log if it does not come."""
    if not lab_module.wait_until(lambda: path.exists() or process.poll() is not None,
                                 timeout) or not path.exists():
        raise lab_module.LabError(f"{path.name} not written within {timeout}s: "
                                  f"{lab_module.read_tail(log)}")


def run_scenario(workdir, snat_sync_config=None, prefix=None):
    """Build a lab, run every flow kind across a crash of r1 and tear down.

    snat_sync_config: the text of snat-sync's config file for both nodes (the
    lab's sandbox config when None); False runs keepalived alone.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    go = workdir / "go"
    with lab_module.running_lab(workdir / "lab", prefix=prefix) as lab:
        install_operator_rules(lab)
        if snat_sync_config is False:
            demo.start_keepalived_pair(lab, {})
        else:
            arguments = ()
            if snat_sync_config is not None:
                config = workdir / "snat-sync.conf"
                config.write_text(snat_sync_config)
                config.chmod(0o600)
                arguments = ("--config-file", str(config))
            commands = demo.register_with_snat_sync(lab, workdir, arguments)
            state_paths = {router.name: demo.node_state_path(workdir, router)
                           for router in lab.routers}
            demo.start_keepalived_pair(lab, commands, state_paths)
            # As on a production node: the daemon sends the primary's translated
            # SCTP ports, which conntrackd does not carry.
            nodes.start_daemons(lab, state_paths, config if arguments else None)
        r1, r2 = lab.routers
        server = lab.server_namespace
        address = lab_module.SERVER_ADDRESS
        servers = [
            start(lab, workdir, "ftp-server", server, "ftp", "server", "--address",
                  address, "--duration", 60, "--ready-file", workdir / "ftp-server.ready"),
            start(lab, workdir, "sip-server", server, "sip", "server", "--address",
                  address, "--go-file", go, "--duration", 60),
            start(lab, workdir, "sctp-server", server, "sctp", "server", "--address",
                  address, "--duration", 60, "--output", workdir / "sctp-server.json"),
        ]
        wait_for_file(workdir / "ftp-server.ready", servers[0],
                      workdir / "ftp-server.log", 10)
        client = lab.client_namespace
        clients = {
            "ftp": start(lab, workdir, "ftp-client", client, "ftp", "client",
                         "--server", address, "--addresses", ",".join(FTP_ADDRESSES),
                         "--ready-file", workdir / "ftp.ready", "--go-file", go,
                         "--output", workdir / "ftp.json"),
            "sip": start(lab, workdir, "sip-client", client, "sip", "client",
                         "--address", SIP_ADDRESS, "--server", address,
                         "--ready-file", workdir / "sip.ready",
                         "--duration", CLIENT_DURATION, "--output", workdir / "sip.json"),
            "sctp": start(lab, workdir, "sctp-client", client, "sctp", "client",
                          "--server", address, "--addresses", ",".join(SCTP_ADDRESSES),
                          "--ready-file", workdir / "sctp.ready",
                          "--duration", CLIENT_DURATION,
                          "--output", workdir / "sctp-client.json"),
        }
        for name, process in clients.items():
            wait_for_file(workdir / f"{name}.ready", process,
                          workdir / f"{name}-client.log", 10)
        time.sleep(SETTLE_BEFORE_CRASH)
        expectations = tuple(lab_module.run(
            ["conntrack", "-L", "expect"], namespace=r2.namespace,
            check=False).stdout.splitlines())
        sctp_entries = tuple(lab_module.run(
            ["conntrack", "-L", "-p", "sctp"], namespace=r2.namespace,
            check=False).stdout.splitlines())
        failover_seconds = demo.crash_primary(lab)
        go.write_text("go\n")
        for name, process in clients.items():
            demo.wait_for_exit(process, workdir / f"{name}-client.log", 60)
        servers[2].terminate()
        demo.wait_for_exit(servers[2], workdir / "sctp-server.log", 10)
    def read(name):
        return json.loads((workdir / name).read_text())

    return HelperResult(
        ftp=read("ftp.json"), sip=read("sip.json"),
        sctp_client=read("sctp-client.json"), sctp_server=read("sctp-server.json"),
        failover_seconds=failover_seconds, replica_expectations=expectations,
        replica_sctp_entries=sctp_entries)
