"""Configuration options, and loading them so that a bad value fails at start-up.

oslo.config converts values lazily, on first access; a typo in a rarely used option
would otherwise surface in the middle of a failover. `load` reads every registered
option once and turns the first bad one into an `InvalidInput` that names the option,
the file it came from and the value.
"""

import glob
import ipaddress
import os
import re
import stat

from oslo_config import cfg
from oslo_config import types

from snat_sync.errors import InvalidInput

SYNCED_PROTOCOLS = ("TCP", "UDP", "ICMP", "IPv6-ICMP", "SCTP", "DCCP")
# conntrackd reads numbers with atoi(): anything above INT_MAX wraps around.
CONNTRACKD_INT_MAX = 2**31 - 1
# Timeouts end up in subprocess, flock --timeout and timeout(1); a day is plenty.
TIMEOUT_MAX = 86400
# A command name looked up in PATH, or an absolute path of plain characters.
BINARY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*|(/[A-Za-z0-9_.+-]+)+")
# A kernel conntrack helper's name as conntrackd's config parser reads a word
# (ftp, sip, tftp, Q.931, H.245, netbios-ns, ...).
HELPER_NAME = r"^[A-Za-z][A-Za-z0-9._-]*$"
ALL_HELPERS = "all"

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
        default="auto",
        choices=[
            ("auto", "ftfw for a router with one peer, notrack for one with "
             "several peers or peers learned by multicast"),
            ("ftfw", "reliable: acknowledgements and resends (two nodes only)"),
            ("notrack", "best effort, no acknowledgements"),
            ("alarm", "periodic resend of every entry"),
        ],
        help="conntrackd synchronisation protocol. FTFW keeps one sequence "
        "number for every message it receives, whoever sent it: on a multicast "
        "group of three nodes it drops the messages of the sender whose sequence "
        "is behind another's as replays (a new primary's updates, a returning "
        "node's resync request), so auto uses it only between two nodes.",
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
        help="IPv4 multicast group for the multicast transport, and for the "
        "daemons' health reports of routers without peer addresses (Neutron's), "
        "on the [health] base_port + VRID.",
    ),
    cfg.IPOpt(
        "ipv6_multicast_group",
        version=6,
        default="ff12::3780",
        help="IPv6 multicast group for the multicast transport of routers whose "
        "HA addresses are IPv6, and for the health reports of such routers "
        "without peer addresses. The default is link-local in scope and "
        "transient (ff12::/16): the group is joined on the HA interface only.",
    ),
    cfg.IntOpt(
        "socket_buffer_size",
        default=33554432,
        min=65536,
        max=CONNTRACKD_INT_MAX,
        help="Send and receive buffer size in bytes of the sync sockets. conntrackd "
        "sets it with SO_RCVBUFFORCE / SO_SNDBUFFORCE, so it applies above "
        "net.core.rmem_max / wmem_max (the kernel doubles it). It is a limit, not "
        "an allocation: kernel memory is used only while messages wait to be "
        "read, and conntrackd's RSS does not change. When a burst of entries is "
        "replicated (250,000 loaded with conntrack -R in 3 s), the backup reads "
        "more slowly than the primary sends; at conntrackd's usual 1249280 its "
        "receive buffer overflowed (27,000-80,000 datagrams dropped, FTFW "
        "resends, backup complete 12-31 s after the load started instead of at "
        "its end). Up to 34 MB was seen queued at once; the default allows 64 MB.",
    ),
    cfg.IntOpt(
        "netlink_buffer_size",
        default=536870912,
        min=65536,
        max=CONNTRACKD_INT_MAX,
        help="Initial size in bytes of conntrackd's netlink event socket buffer. "
        "conntrackd forces it past net.core.rmem_max (it asks for half, the "
        "kernel doubles it), so this is the limit itself; memory is used only "
        "while events wait, and conntrackd's RSS does not change. Every queued "
        "conntrack event takes about 1,280 bytes of it, so a burst that gets "
        "ahead of the primary's conntrackd by more than size / 1280 entries "
        "overruns it: the kernel drops events, and those entries reach the peers "
        "only at the resync after netlink_overrun_resync, which sends the whole "
        "table again. Measured with 1,000,000 entries loaded at full speed "
        "(conntrack -R, 25 s) and snat-sync daemon on both nodes: 128 MB "
        "overran, the kernel dropped 168,207 events, and the replica was complete "
        "15.4 s after the load ended (the daemon's repair; 39 s through the "
        "resync alone); 512 MB and 1 GB lost none, with 216 MB and 161 MB queued "
        "at the peak, complete 5.0 s and 2.4 s after the load ended. The default "
        "(about 420,000 events) holds that peak twice over.",
    ),
    cfg.IntOpt(
        "netlink_buffer_max_size",
        default=1073741824,
        min=65536,
        max=CONNTRACKD_INT_MAX,
        help="Largest size in bytes the netlink event buffer may grow to; "
        "conntrackd doubles it after each overrun.",
    ),
    cfg.IntOpt(
        "netlink_overrun_resync",
        default=5,
        min=1,
        max=CONNTRACKD_INT_MAX,
        help="Seconds after the netlink event buffer overran (the kernel dropped "
        "events, e.g. while a large table is loaded at once) until conntrackd "
        "re-reads the whole kernel table and sends what it missed to the peers. "
        "conntrackd's own default, 30 s, leaves flows unreplicated, and lost at a "
        "failover, for that long; each resync costs one full table dump (about "
        "1 s per 200,000 entries measured here). Shorter is worse: at 1 s, with "
        "the primary's conntrackd starved during a 250,000-entry burst, the "
        "resync deleted 7,327 and 26,214 entries from its cache that were still "
        "in its kernel table, and the caches (and the backup) stayed 15,848 and "
        "80,875 entries short for the 10 s watched.",
    ),
    cfg.IntOpt(
        "hash_size",
        default=65536,
        min=8193,
        max=1048576,
        help="Buckets in each conntrackd cache hash table. Must exceed 8192: "
        "conntrackd 1.4 commits 8192 buckets per step, and a commit that ends in "
        "its first step leaves it believing a commit is still running, so it "
        "refuses every later cache flush. conntrackd looks up every event's "
        "entry in its internal cache, walking a bucket's chain (entries / "
        "buckets long), so a small hash makes the primary's conntrackd fall "
        "behind a large table's bursts. Measured with 1,000,000 entries loaded "
        "in 25 s: at 12289 buckets the replica was complete 2.4-5.0 s after the "
        "load ended (160-216 MB of events queued on the primary); at 32768, "
        "65536, 131072, 262144 and 1048576 within 0.01 s (1.3-7.8 MB queued). "
        "Memory grows with it: primary conntrackd RSS at start 3.0 MB at "
        "12289, 4.3 MB at 32768, 6.3 MB at 65536, 10.4 MB at 131072, 68 MB at "
        "1048576 (a warm backup's about two thirds of that).",
    ),
    cfg.IntOpt(
        "hash_limit",
        default=0,
        min=0,
        max=CONNTRACKD_INT_MAX,
        help="Most entries each conntrackd cache holds. 0 sizes it from the "
        "router namespace's nf_conntrack_max, at twice that value, so a full "
        "kernel table always replicates. A set value below that is raised to it. "
        "The FTFW resend queue (ResendQueueSize) gets the same size: a bulk send "
        "of a full table that overflows it loses, for good, every message the "
        "peer misses.",
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
        "have, and takes it before it reads the kernel's table at start (seconds "
        "at 1,000,000 entries, during the failover that restarted it). With other, "
        "conntrackd starts without CAP_SYS_NICE (setpriv), so it is never "
        "real-time; its log says 'scheduler configuration failed' once per start.",
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
        default=list(SYNCED_PROTOCOLS),
        item_type=types.String(choices=SYNCED_PROTOCOLS),
        help="Layer 4 protocols whose connections are replicated. A protocol the "
        "kernel does not track (DCCP on kernels built without "
        "nf_conntrack_proto_dccp) costs nothing.",
    ),
    cfg.ListOpt(
        "expectation_helpers",
        default=[ALL_HELPERS],
        item_type=types.String(regex=HELPER_NAME),
        help="Connection-tracking helpers (kernel helper names: ftp, sip, tftp, "
        "irc, amanda, sane, pptp, RAS, Q.931, H.245, ...) whose expectations are "
        "replicated (conntrackd's ExpectationSync), so that the data connection "
        "of an FTP session or the media of a SIP call opened before a failover "
        "still finds its expectation on the new primary. conntrackd matches a "
        "name as a prefix of the helper's (sip also matches sip-5061). 'all' "
        "replicates the expectations of every helper: a helper creates "
        "expectations only for connections a CT rule in the router's namespace "
        "gave it, so this covers exactly the helpers the namespace uses, also "
        "those whose rules are added after the router. Empty replicates none. "
        "The connections themselves carry their helper's name either way, and "
        "a backup's kernel must have that helper (built in or loadable) to "
        "accept them.",
    ),
    cfg.IntOpt(
        "purge_timeout",
        default=60,
        min=1,
        max=CONNTRACKD_INT_MAX,
        help="Seconds after which a node that left the primary role flushes its "
        "kernel table of entries it no longer forwards (conntrackd -t).",
    ),
    cfg.IntOpt(
        "control_timeout",
        default=10,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds any conntrackd control request other than a commit may take.",
    ),
    cfg.IntOpt(
        "commit_timeout",
        default=60,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds the commit of the replicated table into the kernel may take. "
        "conntrackd -c has no timeout of its own.",
    ),
    cfg.IntOpt(
        "table_timeout",
        default=60,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds a conntrackd request whose work grows with the table may take: "
        "the resync from the kernel (-R), the bulk send to the peer (-B), and a "
        "start, for conntrackd reads the kernel's whole table before it daemonises. "
        "At 1,000,000 entries each took 8-30 s on a 2-core test machine.",
    ),
    cfg.IntOpt(
        "start_timeout",
        default=10,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds a started conntrackd has to answer on its control socket once it has daemonised.",
    ),
    cfg.IntOpt(
        "stop_timeout",
        default=5,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds a stopping conntrackd has to exit before it is killed.",
    ),
    cfg.IntOpt(
        "log_max_bytes",
        default=10485760,
        min=0,
        max=2**40,
        help="The node daemon rotates a router's conntrackd.log once it grows past "
        "this many bytes (copied to conntrackd.log.1, then emptied in place: "
        "conntrackd keeps writing to the file it opened). 0 never rotates.",
    ),
    cfg.IntOpt(
        "log_backups",
        default=3,
        min=1,
        max=100,
        help="Rotated conntrackd logs kept per router (conntrackd.log.1 newest).",
    ),
]

failover_opts = [
    cfg.StrOpt(
        "standby_mode",
        default="warm",
        choices=[
            ("warm", "replicated entries go straight into each backup's kernel "
             "table and are kept fresh there; becoming primary loads nothing"),
            ("cold", "replicated entries wait in conntrackd's external cache and "
             "are committed into the kernel at failover, behind the reset-window "
             "guard"),
        ],
        help="How a backup holds the replica. warm (conntrackd's "
        "DisableExternalCache, with refreshes of live flows and a flush and "
        "resync whenever a node becomes backup) makes a failover cost VRRP "
        "detection alone at any table size. cold keeps the replica out of the "
        "backup's kernel: the commit at failover takes about 1 s per 100,000 "
        "entries, during which replicated flows wait behind the guard.",
    ),
    cfg.IntOpt(
        "refresh_interval",
        default=4,
        choices=[0, 1, 2, 4, 8, 16, 32, 64],
        help="warm standby: seconds between refreshes of a live flow's entry on "
        "the backups. The first packet of each flow in every new such tick "
        "changes its connection mark (nftables rules in the router's namespace "
        "copy the tick's number into 8 bits of it), so conntrack reports the "
        "entry and conntrackd sends it with its fresh timeout; idle entries cost "
        "nothing. Keep it well below the "
        "shortest conntrack timeout of a live flow (UDP: "
        "nf_conntrack_udp_timeout, 30 s). 0 turns refreshes off: then a flow "
        "whose state no longer changes loses its backup entry once the timeout "
        "it had at its last change runs out. A power of two: the rule ticks on "
        "the bits of the time of day.",
    ),
    cfg.IntOpt(
        "refresh_mark_bit",
        default=8,
        min=0,
        max=24,
        help="warm standby: the lowest of the 8 bits of the connection mark (ct "
        "mark) that hold the refresh's tick number (bits 8-15 by default). "
        "Choose bits nothing else in the router namespaces uses; Neutron's "
        "address scopes use the upper 16 bits.",
    ),
    cfg.BoolOpt(
        "backup_reads_events",
        default=False,
        help="warm standby: whether a backup's conntrackd reads conntrack events. "
        "Every entry it injects raises one on its own node, which it could only "
        "drop: a backup forwards nothing, so no event of its own is worth reading. "
        "False (the default) gives each router a backup configuration whose kernel "
        "filter lets no event through, and transitions restart conntrackd with the "
        "role's configuration (becoming primary, the new conntrackd reads the "
        "kernel's table; the data plane does not wait). Measured: a burst of "
        "1,000,000 new entries was complete on such a backup 1.6 s after the load "
        "ended, nothing lost, while one that reads its events fell behind, overran "
        "its event buffer and sent the replica back to the primary (713,627 after "
        "90 s). True keeps one configuration for both roles (no restart at a "
        "transition); with 20% of the sync packets lost it let FTFW catch up "
        "sooner (0.2-6.1 s for 3,000 entries; without, 1-17 s in 5 runs and 186 "
        "still missing after 30 s in a sixth, left to the daemon's repair), because the "
        "backup's echo keeps its side of the channel busy; see BENCHMARKS.md.",
    ),
    cfg.BoolOpt(
        "reset_window_guard",
        default=True,
        help="cold standby: while a router is not primary, drop (never reject) packets on its "
        "interfaces that conntrack cannot place, until the commit at failover has "
        "finished. Without it, packets of replicated flows that arrive between "
        "keepalived raising the addresses and the end of the commit are answered "
        "with TCP resets or get a fresh SNAT mapping.",
    ),
    cfg.BoolOpt(
        "liberal_tcp_tracking",
        default=True,
        help="Set nf_conntrack_tcp_be_liberal to 1 in each router's namespace "
        "(when the router is added, and again when its namespace is new): "
        "conntrack then marks only out-of-window TCP resets invalid. After a "
        "partition of the HA link the node that stayed primary gets the flows "
        "back with entries from before the split; without it their segments "
        "are invalid, leave without NAT, and the gateway address answers the "
        "server with resets. False leaves the kernel's setting alone.",
    ),
    cfg.IntOpt(
        "lock_timeout",
        default=120,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds a transition waits for the previous one of the same router.",
    ),
    cfg.BoolOpt(
        "resync_on_backup",
        default=True,
        help="On becoming backup, ask the peers to send their whole table so the "
        "local replica is complete.",
    ),
    cfg.BoolOpt(
        "table_transfer",
        default=True,
        help="warm standby: how a backup gets the primary's whole table (on "
        "becoming backup, at a restart of its conntrackd, as a repair). True: it "
        "asks the primary's node daemon, which listens in the router's namespace "
        "on its HA address at [health] base_port + VRID over TCP, dumps its kernel "
        "table and streams it; the backup writes it into its kernel in batches, "
        "where conntrackd's resync creates one entry per request and waits for "
        "each answer (measured in one run: 200,000 entries in 1.7 s against 2.2 s, "
        "1,000,000 in 10.6 s against 17.7 s). Anything short of a complete table "
        "(no daemon answers, it is not the primary, the stream breaks) falls back "
        "to conntrackd's resync request (-n), as does False. cold standby always "
        "uses -n: its replica belongs in conntrackd's cache. With True the "
        "primary's daemon also sends its backups' daemons each new entry whose "
        "port or ICMP identifier source NAT remapped, for every replicated "
        "protocol but TCP and UDP (ICMP, ICMPv6, SCTP, DCCP): conntrackd 1.4.7 "
        "replicates translated ports of TCP and UDP only, and the backup's "
        "kernel would pick another one; and each new expectation of the "
        "expectation_helpers, which conntrackd injects in class 0 (a SIP "
        "call's media lost) and without what an active-mode FTP data "
        "connection needs, together with the sequence shift the ftp helper's "
        "rewrite of PORT gives its control connection (no conntrack event "
        "reports it).",
    ),
    cfg.IntOpt(
        "history_size",
        default=200,
        min=10,
        max=10000,
        help="Transitions and repairs kept per router in history.jsonl "
        "(`snat-sync history ROUTER`); older ones are dropped.",
    ),
    cfg.BoolOpt(
        "demote_while_resyncing",
        default=False,
        help="For keepalived instances that preempt (not Neutron's, which use "
        "nopreempt): keep a track file per router, <router dir>/demotion, that "
        "holds 1 while this node is not primary and its replica is incomplete "
        "(or not yet known), else 0, so that keepalived lowers the node's "
        "priority by demotion_weight and a returning node does not win an "
        "election with a partial table. `router add` prints the keepalived "
        "lines (track_file).",
    ),
    cfg.IntOpt(
        "demotion_weight",
        default=-100,
        min=-253,
        help="The keepalived track_file weight of the demotion file: negative, "
        "-253 to -1. Choose it so that the highest priority plus this weight is "
        "below the lowest priority of the router's other nodes (keepalived keeps "
        "the effective priority within 1..254). A demoted node alone still "
        "becomes primary. Weight 0 would put the instance into FAULT while the "
        "file holds 1, and could leave no primary at all: refused.",
    ),
    cfg.FloatOpt(
        "demotion_timeout",
        default=300.0,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds after the node became backup after which the demotion is "
        "lifted even if the replica is still incomplete, so that a node whose "
        "resync cannot finish does not stay demoted for ever.",
    ),
]

health_opts = [
    cfg.FloatOpt(
        "check_interval",
        default=3.0,
        min=0.5,
        max=300,
        help="Seconds between the node daemon's health checks of each router: "
        "cache and sync figures from conntrackd's control socket, and a report "
        "sent to the peers' daemons.",
    ),
    cfg.BoolOpt(
        "repair",
        default=True,
        help="Let the node daemon repair replication faults it finds: ask the "
        "primary for its whole table when this backup's replica stays short, and "
        "resync and send the whole table when this primary survives a split "
        "brain. Off, the faults are only reported.",
    ),
    cfg.IntOpt(
        "repair_after",
        default=2,
        min=1,
        max=100,
        help="Consecutive health checks a fault must be seen in before it is "
        "repaired, so a replica that is still catching up is left alone.",
    ),
    cfg.FloatOpt(
        "repair_backoff",
        default=30.0,
        min=0,
        max=TIMEOUT_MAX,
        help="Seconds after a repair before the same repair runs again for the "
        "same router.",
    ),
    cfg.FloatOpt(
        "short_tolerance_percent",
        default=1.0,
        min=0,
        max=100,
        help="A backup's replica counts as short when it holds fewer entries than "
        "the primary reports by more than this share of the primary's entries "
        "(and by more than 16 entries).",
    ),
    cfg.FloatOpt(
        "peer_timeout",
        default=10.0,
        min=1,
        max=TIMEOUT_MAX,
        help="Seconds without a report from a peer's daemon after which the peer "
        "counts as silent.",
    ),
    cfg.IntOpt(
        "base_port",
        default=4780,
        min=1,
        max=65535 - 254,
        help="The daemons of a router's nodes exchange health reports on UDP port "
        "base_port + VRID of the HA network (to the peer addresses; for a router "
        "without, such as Neutron's, to [conntrackd] multicast_group or "
        "ipv6_multicast_group); the range must not overlap [conntrackd] "
        "base_port's.",
    ),
]

metrics_opts = [
    cfg.IPOpt(
        "listen_address",
        default="127.0.0.1",
        help="Address the node daemon serves Prometheus metrics on (/metrics).",
    ),
    cfg.PortOpt(
        "listen_port",
        default=9787,
        help="Port for the metrics; 0 serves none.",
    ),
    cfg.StrOpt(
        "textfile",
        default="",
        help="Also write the metrics to this file for node_exporter's textfile "
        "collector (rewritten atomically at the health checks, at most every "
        "15 s); empty writes none. Its name must end in .prom.",
    ),
]


def list_opts():
    """Options for oslo-config-generator (entry point oslo.config.opts)."""
    return [
        ("DEFAULT", common_opts),
        ("conntrackd", conntrackd_opts),
        ("failover", failover_opts),
        ("health", health_opts),
        ("metrics", metrics_opts),
    ]


def register(conf):
    for group, opts in list_opts():
        if group == "DEFAULT":
            conf.register_cli_opts(opts)
        else:
            conf.register_opts(opts, group=group)


def load(conf, argv, default_config_files=None, description=None):
    """Parse argv and the config files into conf, then validate every option."""
    try:
        conf(
            argv,
            project="snat-sync",
            default_config_files=default_config_files,
            description=description,
        )
    except (cfg.NoSuchOptError, cfg.TemplateSubstitutionError) as error:
        # A value with $name in it: oslo.config substitutes options into values.
        name = getattr(error, "opt_name", "")
        value = next((each for each in argv if f"${name}" in each
                      or f"${{{name}" in each), f"${name}")
        raise InvalidInput("option value", value,
                           f"{error}; oslo.config substitutes $name in values "
                           "(write $$ for a '$')") from None
    for path in [*_config_files(conf), *(conf.config_dir or [])]:
        check_config_path(path)
    validate(conf)


def check_config_path(path):
    """Refuse a config file (or directory) that a user other than root could change.

    The hook keepalived runs as root hands its config files to snat-sync, and a
    config file names the binary snat-sync runs as root: it must be as safe as the
    hook itself (see statedir.check_directory). Symlinks are followed.
    """
    real = os.path.realpath(path)
    for each in [real, *_parents(real)]:
        try:
            status = os.stat(each)
        except OSError as error:
            raise InvalidInput("config file", str(path),
                               f"cannot examine {each}: {error.strerror}") from None
        if status.st_uid not in (0, os.geteuid()):
            raise InvalidInput("config file", str(path),
                               f"{each} is owned by uid {status.st_uid}, not root")
        sticky = stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
        if status.st_mode & 0o022 and not sticky:
            raise InvalidInput("config file", str(path),
                               f"{each} is writable by group or others")


def _parents(path):
    """The directories above path, nearest first."""
    parents = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return parents
        parents.append(parent)
        path = parent


def validate(conf):
    for group, opts in list_opts():
        section = conf if group == "DEFAULT" else getattr(conf, group)
        for opt in opts:
            try:
                getattr(section, opt.dest)
            except (cfg.ConfigFileValueError, ValueError) as error:
                raise _invalid_option(conf, group, opt, error) from None
            except (cfg.NoSuchOptError, cfg.TemplateSubstitutionError) as error:
                # oslo.config replaces $name in a value by the option name.
                raise _invalid_option(conf, group, opt, ValueError(
                    f"is not valid: {error}; oslo.config substitutes $name in "
                    "values (write $$ for a '$')")) from None
    for name in ("multicast_group", "ipv6_multicast_group"):
        if not ipaddress.ip_address(getattr(conf.conntrackd, name)).is_multicast:
            raise _invalid_option(
                conf, "conntrackd", _opt("conntrackd", name),
                ValueError("is not valid: not a multicast address"))
    if not BINARY.fullmatch(conf.conntrackd.binary):
        raise _invalid_option(
            conf, "conntrackd", _opt("conntrackd", "binary"),
            ValueError("is not valid: must be a command name or an absolute path "
                       "of letters, digits and _ . + -"))
    if conf.conntrackd.sync_mode == "alarm" and conf.failover.standby_mode == "warm":
        raise _invalid_option(
            conf, "conntrackd", _opt("conntrackd", "sync_mode"),
            ValueError("is not valid: conntrackd's alarm mode keeps replicated "
                       "entries in its external cache; warm standby needs ftfw or "
                       "notrack (or set [failover] standby_mode = cold)"))
    sync_ports = range(conf.conntrackd.base_port + 1, conf.conntrackd.base_port + 256)
    report_ports = range(conf.health.base_port + 1, conf.health.base_port + 256)
    if sync_ports.start < report_ports.stop and report_ports.start < sync_ports.stop:
        raise _invalid_option(
            conf, "health", _opt("health", "base_port"),
            ValueError(f"is not valid: its ports {report_ports.start}-"
                       f"{report_ports.stop - 1} overlap the sync ports "
                       f"{sync_ports.start}-{sync_ports.stop - 1}"))
    helpers = conf.conntrackd.expectation_helpers
    if ALL_HELPERS in helpers and len(helpers) > 1:
        raise _invalid_option(
            conf, "conntrackd", _opt("conntrackd", "expectation_helpers"),
            ValueError(f"is not valid: '{ALL_HELPERS}' already covers every "
                       "helper; give it alone or list helper names"))
    if conf.failover.demotion_weight >= 0:
        raise _invalid_option(
            conf, "failover", _opt("failover", "demotion_weight"),
            ValueError("is not valid: must be negative (-253 to -1): keepalived "
                       "puts an instance whose track file weight is 0 into FAULT "
                       "while the file holds 1, which could leave no primary, and "
                       "a positive weight would raise the priority of a node with "
                       "an incomplete replica"))
    textfile = conf.metrics.textfile
    if textfile and (not os.path.isabs(textfile) or not textfile.endswith(".prom")):
        raise _invalid_option(
            conf, "metrics", _opt("metrics", "textfile"),
            ValueError("is not valid: must be an absolute path ending in .prom"))
    _check_unknown_options(conf)


def _check_unknown_options(conf):
    """A misspelt option would silently keep its default: refuse it.

    Only the sections snat-sync owns are checked; other sections are left alone.
    """
    for path in _config_files(conf):
        sections = {}
        cfg.ConfigParser(path, sections).parse()
        for group, opts in list_opts():
            known = {opt.dest for opt in opts}
            if group == "DEFAULT":
                known |= set(conf)  # config_file, config_dir and the like
            for name, values in sections.get(group, {}).items():
                if name.replace("-", "_") not in known:
                    raise InvalidInput(f"option [{group}] {name} in {path}",
                                       values[-1], "no such option")


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
