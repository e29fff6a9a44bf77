"""Rendering: from a router spec, the options and facts about its namespace to text.

Everything here is pure. `conntrackd_settings` decides what goes into a router's
conntrackd.conf; the templates only lay it out.
"""

import dataclasses
import functools
import ipaddress
import pathlib
import shlex
import sys
import sysconfig

import jinja2

from snat_sync.roles import Role


LOOPBACK_NETWORKS = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    policy: str
    priority: int


@dataclasses.dataclass(frozen=True)
class ConntrackdSettings:
    router_id: str
    sync_mode: str
    channel: object
    ha_interface: str
    local_address: object
    peer_addresses: tuple
    socket_buffer_size: int
    netlink_buffer_size: int
    netlink_buffer_max_size: int
    netlink_overrun_resync: int
    hash_size: int
    hash_limit: int
    # DisableExternalCache: entries received from a peer go straight into the
    # kernel table instead of conntrackd's external cache
    injects_received: bool
    scheduler: Scheduler | None
    protocols: tuple
    # ("all",), helper names, or () for no expectation sync (options.py)
    expectation_helpers: tuple
    ignored_networks: tuple
    purge_timeout: int
    files: object
    reads_events: bool = True


def hash_limit(configured, nf_conntrack_max):
    """Entries each conntrackd cache may hold.

    At least twice nf_conntrack_max: the kernel table can be full and the cache also
    keeps dead entries waiting for acknowledgement. Below that, entries beyond the
    limit are dropped silently and their flows are reset at failover.
    """
    return max(configured, 2 * nf_conntrack_max)


# A protocol no conntrack entry has in practice (IPv6's "no next header": conntrack
# tracks no IPv6 packet without a transport header; an IPv4 packet of protocol 59
# would be tracked, and its events read, to no harm), so that a filter accepting
# only it lets no conntrack event through.
NO_EVENTS_PROTOCOL = "ipv6-nonxt"


AUTO_SYNC_MODE = "auto"


def sync_mode(configured, spec):
    """The conntrackd sync mode of a router: [conntrackd] sync_mode, where auto
    is FTFW for a router with one peer and NOTRACK for any other (several
    listed peers, or peers learned by multicast: Neutron's routers, on up to
    max_l3_agents_per_router nodes, 3 by default).

    FTFW tracks a single sequence number for all it receives and drops as a
    replay every message whose number is behind the last one taken, from
    whichever sender. With three nodes on one group each node hears two
    senders: measured in the lab, after the primary died the new primary's
    updates reached the other backup not at all (its numbers were behind the
    dead primary's last ones), and a returning node's resync request never
    reached the primary (a backup's numbers were ahead of it). NOTRACK drops
    nothing by sequence; what it loses, the daemon's stall repair asks for
    again, and the refreshes resend every live flow.
    """
    if configured != AUTO_SYNC_MODE:
        return configured
    return "ftfw" if spec.has_one_peer else "notrack"


def conntrackd_settings(spec, conntrackd_options, facts, files, warm_standby=True,
                        role=Role.PRIMARY, backup_reads_events=False):
    """Decide the content of a router's conntrackd.conf for a node in role.

    warm_standby: a backup's conntrackd puts replicated entries straight into the
    kernel (DisableExternalCache) instead of keeping them for a commit.

    Unless backup_reads_events, a warm backup's conntrackd reads no conntrack
    events: its kernel filter lets none through. Every entry it injects raises an
    event on its own node, which it reads only to drop it; during a burst of
    1,000,000 new entries on the primary that doubled its work, it fell behind,
    its event buffer overran, and the overrun resync sent the replica back to the
    primary as its own table. A backup forwards nothing, so it has no events worth
    reading; a node becoming primary restarts conntrackd with the primary's
    variant, which reads the kernel table at start. The price: FTFW repairs
    losses on the sync link somewhat more slowly (see [failover]
    backup_reads_events).

    With role variants, the primary's conntrackd also injects nothing it
    receives: what a peer sends lands in its external cache, which nothing
    commits. A primary's table is the live one; the only sender it can hear is a
    node that was primary at the same time (a split brain), whose resends after
    the partition heals would otherwise overwrite live entries with that node's
    versions, TCP window data included, before its backup transition forgets
    them (seen in the partition-heal test: the loser's partition-time entry and
    mark reached the survivor's kernel).
    Cold standby injects nothing: both variants are the primary's.
    """
    options = conntrackd_options
    scheduler = None
    if options.scheduler != "other":
        scheduler = Scheduler(options.scheduler, options.scheduler_priority)
    return ConntrackdSettings(
        router_id=spec.router_id,
        sync_mode=sync_mode(options.sync_mode, spec),
        channel=spec.sync_channel(
            options.transport, options.base_port,
            options.multicast_group if spec.local_address.version == 4
            else options.ipv6_multicast_group,
        ),
        ha_interface=spec.ha_interface,
        local_address=spec.local_address,
        peer_addresses=spec.peer_addresses,
        socket_buffer_size=options.socket_buffer_size,
        netlink_buffer_size=options.netlink_buffer_size,
        netlink_buffer_max_size=max(
            options.netlink_buffer_size, options.netlink_buffer_max_size
        ),
        netlink_overrun_resync=options.netlink_overrun_resync,
        hash_size=options.hash_size,
        hash_limit=hash_limit(options.hash_limit, facts.nf_conntrack_max),
        injects_received=warm_standby and (backup_reads_events
                                            or role is Role.BACKUP),
        scheduler=scheduler,
        protocols=tuple(options.protocols),
        expectation_helpers=tuple(options.expectation_helpers),
        ignored_networks=(*LOOPBACK_NETWORKS, facts.ha_network),
        purge_timeout=options.purge_timeout,
        files=files,
        reads_events=backup_reads_events or not (warm_standby
                                                 and role is Role.BACKUP),
    )


def render_conntrackd_config(settings):
    context = {
        field.name: getattr(settings, field.name)
        for field in dataclasses.fields(settings)
    }
    return _render("conntrackd.conf.j2",
                   {**context, "no_events_protocol": NO_EVENTS_PROTOCOL})


def snat_sync_command(config_files, config_dirs, state_path):
    """The command line a hook uses to call back into snat-sync, as a list."""
    command = [sys.executable, "-m", "snat_sync"]
    for path in config_files:
        command += ["--config-file", str(pathlib.Path(path).absolute())]
    for path in config_dirs:
        command += ["--config-dir", str(pathlib.Path(path).absolute())]
    command += ["--state-path", str(pathlib.Path(state_path).absolute())]
    return command


def render_notify_hook(router_id, files, conntrackd_binary, command, lock_timeout,
                       commit_timeout, guard_namespace=None, commits=True,
                       forgets=False, control_timeout=10):
    """The hook keepalived runs.

    commits (cold standby): on MASTER it commits the external cache first;
    guard_namespace set: it then lifts the guard in that namespace.
    forgets (warm standby): on every other state it has conntrackd forget the
    entries it held as its own first.
    """
    return _render(
        "notify.sh.j2",
        {
            "router_id": router_id,
            "files": files,
            "conntrackd_binary": conntrackd_binary,
            "snat_sync_command": command,
            "lock_timeout": lock_timeout,
            "commit_timeout": commit_timeout,
            "guard_namespace_path": guard_namespace and f"/run/netns/{guard_namespace}",
            "commits": commits,
            "forgets": forgets,
            "control_timeout": control_timeout,
        },
    )


def render_guard(spec, table):
    """The rulesets that raise and lift the router's reset-window guard."""
    context = {"router_id": spec.router_id, "ha_interface": spec.ha_interface,
               "table": table}
    return (_render("guard-raise.nft.j2", context),
            _render("guard-lift.nft.j2", context))


# The refresh counter's width in bits of the connection mark: the tick number
# modulo 256. A packet goes unreported only within its tick or exactly 256 ticks
# after the flow's packet before (17 minutes at the default 4 s, longer than any
# UDP or ICMP timeout); one bit missed every packet an even number of ticks
# after the last (a keepalive every 8 s).
REFRESH_COUNTER_BITS = 8


@dataclasses.dataclass(frozen=True)
class RefreshBit:
    """One bit of the refresh counter: the bit of `meta hour` (a time of day) it
    copies into the connection mark."""

    tick: str  # "HH:MM:SS", a power of two times the interval
    mark: int

    @property
    def cleared_mask(self):
        return 0xFFFFFFFF ^ self.mark


@dataclasses.dataclass(frozen=True)
class RefreshSettings:
    """The warm standby's refreshes of one router; interval 0 means none.

    The rules copy the tick number (seconds since midnight / interval) modulo
    2 ** REFRESH_COUNTER_BITS into the bits of the connection mark from mark_bit
    up, so the first packet of a flow in any later tick changes the mark.
    """

    interval: int
    mark_bit: int

    @property
    def enabled(self):
        return self.interval > 0

    @property
    def counter(self):
        """The counter's bits, the one that changes every tick first."""
        return tuple(RefreshBit(_time_of_day(self.interval << index),
                                1 << (self.mark_bit + index))
                     for index in range(REFRESH_COUNTER_BITS))


def _time_of_day(seconds):
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def refresh_settings(failover_options):
    """The refreshes a router gets: none with cold standby, which needs none."""
    if failover_options.standby_mode != "warm":
        return RefreshSettings(0, failover_options.refresh_mark_bit)
    return RefreshSettings(failover_options.refresh_interval,
                           failover_options.refresh_mark_bit)


def render_refresh(spec, table, settings):
    """The ruleset that adds (or, with refreshes off, removes) the refresh table."""
    return _render("refresh.nft.j2", {
        "router_id": spec.router_id, "ha_interface": spec.ha_interface,
        "table": table, "enabled": settings.enabled, "interval": settings.interval,
        "counter": settings.counter, "mark_bit": settings.mark_bit,
        "last_bit": settings.mark_bit + REFRESH_COUNTER_BITS - 1,
    })


@dataclasses.dataclass(frozen=True)
class Demotion:
    """The keepalived track_file of a router's demotion file (demotion.py)."""

    name: str
    file: str
    weight: int


def demotion_track_file(spec, files, failover_options):
    """The router's track_file, or None with demote_while_resyncing off."""
    if not failover_options.demote_while_resyncing:
        return None
    return Demotion(f"snat_sync_{spec.router_id}", str(files.demotion),
                    failover_options.demotion_weight)


def render_keepalived_snippet(spec, notify_command, demotion=None):
    """The lines keepalived needs; with demotion (a Demotion), its track_file
    in global scope and in the instance."""
    return _render(
        "keepalived.conf.j2",
        {
            "router_id": spec.router_id,
            "instance_name": f"VR_{spec.vrid}",
            "vrid": spec.vrid,
            "notify_command": notify_command,
            "demotion": demotion,
        },
    )


def templates_directory():
    """Where the templates are: beside the source tree, or installed as data files.

    An editable install or a source checkout has them next to the package; a wheel
    installs them under <prefix>/share/snat-sync/templates.
    """
    candidates = [
        pathlib.Path(__file__).resolve().parent.parent / "templates",
        pathlib.Path(sysconfig.get_path("data")) / "share" / "snat-sync" / "templates",
        pathlib.Path(sys.prefix) / "share" / "snat-sync" / "templates",
        pathlib.Path("/usr/share/snat-sync/templates"),
        pathlib.Path("/usr/local/share/snat-sync/templates"),
    ]
    for candidate in candidates:
        if (candidate / "conntrackd.conf.j2").is_file():
            return candidate
    raise FileNotFoundError(
        "snat-sync templates not found in any of: "
        + ", ".join(str(candidate) for candidate in candidates)
    )


def _environment():
    return _environment_for(templates_directory())


@functools.lru_cache(maxsize=4)
def _environment_for(directory):
    """One environment per templates directory: it keeps the compiled templates
    (and recompiles one whose file changed), so rendering hundreds of routers does
    not compile every template hundreds of times."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters["quote"] = lambda value: shlex.quote(str(value))
    return environment


def _render(template_name, context):
    return _environment().get_template(template_name).render(context)
