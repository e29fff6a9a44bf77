"""Configuration options, and loading them so that a bad value fails at start-up.

oslo.config converts values lazily, on first access; a typo in a rarely used option
would otherwise surface in the middle of a failover. `load` reads every registered
option once and turns the first bad one into an `InvalidInput` that names the option,
the file it came from and the value.
"""

import glob
import ipaddress

from oslo_config import cfg
from oslo_config import types

from snat_sync.errors import InvalidInput

SYNCED_PROTOCOLS = ("TCP", "UDP", "ICMP", "IPv6-ICMP", "SCTP", "DCCP")

common_opts = [
    cfg.StrOpt(
        "state-path",
        default="/var/lib/snat-sync",
        help="Directory that holds one sub-directory per router: its conntrackd "
        "configuration, lock file, control socket, log, notify hook and "
        "transition records.",
    ),
]

conntrackd_opts = [
    cfg.StrOpt(
        "binary",
        default="conntrackd",
        help="conntrackd executable, a name looked up in PATH or an absolute path.",
    ),
    cfg.StrOpt(
        "sync_mode",
        default="ftfw",
        choices=[
            ("ftfw", "reliable: acknowledgements and resends (recommended)"),
            ("notrack", "best effort, no acknowledgements"),
            ("alarm", "periodic resend of every entry"),
        ],
        help="conntrackd synchronisation protocol.",
    ),
    cfg.StrOpt(
        "transport",
        default="auto",
        choices=[
            ("auto", "udp for one peer, multicast for several"),
            ("udp", "unicast UDP to the single peer"),
            ("multicast", "the multicast group below"),
        ],
        help="How sync messages travel on the HA network.",
    ),
    cfg.IntOpt(
        "base_port",
        default=3780,
        min=1,
        max=65535 - 254,
        help="A router's sync traffic uses UDP port base_port + VRID, so routers "
        "that share one HA network never mix their messages.",
    ),
    cfg.IPOpt(
        "multicast_group",
        version=4,
        default="225.0.0.50",
        help="IPv4 multicast group for the multicast transport.",
    ),
    cfg.IntOpt(
        "socket_buffer_size",
        default=1249280,
        min=65536,
        help="Send and receive buffer size in bytes of the sync sockets.",
    ),
    cfg.IntOpt(
        "netlink_buffer_size",
        default=2097152,
        min=65536,
        help="Initial size in bytes of conntrackd's netlink event socket buffer.",
    ),
    cfg.IntOpt(
        "netlink_buffer_max_size",
        default=8388608,
        min=65536,
        help="Largest size in bytes the netlink event buffer may grow to.",
    ),
    cfg.IntOpt(
        "hash_size",
        default=12289,
        min=8193,
        max=1048576,
        help="Buckets in each conntrackd cache hash table. Must exceed 8192: "
        "conntrackd 1.4 commits 8192 buckets per step, and a commit that ends in "
        "its first step leaves it believing a commit is still running, so it "
        "refuses every later cache flush. Memory grows with it: conntrackd RSS "
        "2.9 MB at 12289, 4.3 MB at 32768.",
    ),
    cfg.IntOpt(
        "hash_limit",
        default=0,
        min=0,
        help="Most entries each conntrackd cache holds. 0 sizes it from the "
        "router namespace's nf_conntrack_max, at twice that value, so a full "
        "kernel table always replicates. A set value below that is raised to it.",
    ),
    cfg.StrOpt(
        "scheduler",
        default="other",
        choices=[
            ("other", "the normal time-sharing scheduler"),
            ("rr", "real-time round robin at scheduler_priority"),
            ("fifo", "real-time FIFO at scheduler_priority"),
        ],
        help="Scheduling policy of conntrackd. conntrackd itself defaults to "
        "real-time priority 99, which hundreds of routers on one node cannot all "
        "have.",
    ),
    cfg.IntOpt(
        "scheduler_priority",
        default=1,
        min=1,
        max=99,
        help="Real-time priority for the rr and fifo schedulers.",
    ),
    cfg.ListOpt(
        "protocols",
        default=["TCP", "UDP", "ICMP", "IPv6-ICMP"],
        item_type=types.String(choices=SYNCED_PROTOCOLS),
        help="Layer 4 protocols whose connections are replicated.",
    ),
    cfg.IntOpt(
        "purge_timeout",
        default=60,
        min=1,
        help="Seconds after which a node that left the primary role flushes its "
        "kernel table of entries it no longer forwards (conntrackd -t).",
    ),
    cfg.IntOpt(
        "control_timeout",
        default=10,
        min=1,
        help="Seconds any conntrackd control request other than a commit may take.",
    ),
    cfg.IntOpt(
        "commit_timeout",
        default=60,
        min=1,
        help="Seconds the commit of the replicated table into the kernel may take. "
        "conntrackd -c has no timeout of its own.",
    ),
    cfg.IntOpt(
        "start_timeout",
        default=10,
        min=1,
        help="Seconds a starting conntrackd has to answer on its control socket.",
    ),
    cfg.IntOpt(
        "stop_timeout",
        default=5,
        min=1,
        help="Seconds a stopping conntrackd has to exit before it is killed.",
    ),
]

failover_opts = [
    cfg.BoolOpt(
        "reset_window_guard",
        default=True,
        help="While a router is not primary, drop (never reject) packets on its "
        "interfaces that conntrack cannot place, until the commit at failover has "
        "finished. Without it, packets of replicated flows that arrive between "
        "keepalived raising the addresses and the end of the commit are answered "
        "with TCP resets or get a fresh SNAT mapping.",
    ),
    cfg.IntOpt(
        "lock_timeout",
        default=120,
        min=1,
        help="Seconds a transition waits for the previous one of the same router.",
    ),
    cfg.BoolOpt(
        "resync_on_backup",
        default=True,
        help="On becoming backup, ask the peers to send their whole table so the "
        "local replica is complete.",
    ),
]


def list_opts():
    """Options for oslo-config-generator (entry point oslo.config.opts)."""
    return [
        ("DEFAULT", common_opts),
        ("conntrackd", conntrackd_opts),
        ("failover", failover_opts),
    ]


def register(conf):
    for group, opts in list_opts():
        if group == "DEFAULT":
            conf.register_cli_opts(opts)
        else:
            conf.register_opts(opts, group=group)


def load(conf, argv, default_config_files=None, description=None):
    """Parse argv and the config files into conf, then validate every option."""
    conf(
        argv,
        project="snat-sync",
        default_config_files=default_config_files,
        description=description,
    )
    validate(conf)


def validate(conf):
    for group, opts in list_opts():
        section = conf if group == "DEFAULT" else getattr(conf, group)
        for opt in opts:
            try:
                getattr(section, opt.dest)
            except (cfg.ConfigFileValueError, ValueError) as error:
                raise _invalid_option(conf, group, opt, error) from None
    if not ipaddress.ip_address(conf.conntrackd.multicast_group).is_multicast:
        raise _invalid_option(
            conf, "conntrackd", _opt("conntrackd", "multicast_group"),
            ValueError("is not valid: not a multicast address"))


def _opt(group, name):
    return next(opt for each, opts in list_opts() if each == group
                for opt in opts if opt.name == name)


def _invalid_option(conf, group, opt, error):
    files = _config_files(conf)
    raw_value, source = _raw_value(files, group, opt.name)
    reason = str(error).rsplit("is not valid: ", 1)[-1]
    return InvalidInput(f"option [{group}] {opt.name} in {source}", raw_value, reason)


def _config_files(conf):
    files = list(conf.config_file or [])
    for directory in conf.config_dir or []:
        files.extend(sorted(glob.glob(f"{directory}/*.conf")))
    return files


def _raw_value(files, group, name):
    """The last value a config file gives for the option, as written."""
    found = ("", "the command line")
    for path in files:
        sections = {}
        cfg.ConfigParser(path, sections).parse()
        values = sections.get(group, {}).get(name)
        if values:
            found = (values[-1], path)
    return found
