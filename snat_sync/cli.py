"""The snat-sync command line: parse, call the manager, print. Nothing else."""

import ipaddress
import json
import logging
import math
import shutil
import sys
import time

from oslo_config import cfg

from snat_sync import failover
from snat_sync import manager
from snat_sync import options
from snat_sync import render
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.router import RouterSpec

LOG = logging.getLogger("snat_sync")

DESCRIPTION = (
    "Replicate the connection tracking table of keepalived HA routers with "
    "conntrackd, so SNAT'ed TCP and UDP sessions survive a failover. Add each "
    "router on each node with `router add`, put the printed notify command into "
    "keepalived's vrrp_instance, and check `status`."
)


def _router_arguments(parser):
    parser.add_argument("router", help="router id: a Neutron UUID or a plain name")
    parser.add_argument("--namespace", required=True,
                        help="network namespace of the router, e.g. qrouter-<id>")
    parser.add_argument("--ha-interface", required=True,
                        help="interface on the HA network, e.g. ha-1a2b3c4d-5e")
    parser.add_argument("--local-address", required=True,
                        help="this node's address on the HA interface")
    parser.add_argument("--peer-address", action="append", required=True,
                        help="HA address of a peer; repeat for several peers "
                        "(several peers need the multicast transport)")
    parser.add_argument("--vrid", required=True,
                        help="VRRP virtual router id, 1-254; the sync port is "
                        "[conntrackd] base_port + VRID")
    parser.add_argument("--primary-address",
                        help="address/prefix keepalived puts on the HA interface "
                        "while this node is primary (Neutron: 169.254.0.<VRID>/24); "
                        "`snat-sync daemon` watches it as a second VRRP trigger")


def _add_parsers(subparsers):
    router = subparsers.add_parser("router", help="add or remove a router")
    actions = router.add_subparsers(dest="router_action", metavar="{add,remove}")
    actions.required = True
    add = actions.add_parser(
        "add", help="render the router's conntrackd.conf, start conntrackd in its "
        "namespace and write its keepalived notify hook. Repeating it with the same "
        "arguments changes nothing; with other arguments it reconciles.")
    _router_arguments(add)
    add.add_argument("--json", action="store_true", help="print the result as JSON")
    remove = actions.add_parser(
        "remove", help="stop the router's conntrackd and delete its files")
    remove.add_argument("router")

    render_parser = subparsers.add_parser(
        "render", help="print the conntrackd.conf `router add` would write; "
        "touches nothing")
    _router_arguments(render_parser)
    render_parser.add_argument(
        "--ha-network", help="HA network (CIDR); with --nf-conntrack-max, render "
        "without reading the namespace")
    render_parser.add_argument("--nf-conntrack-max", type=int,
                               help="the namespace's nf_conntrack_max")

    notify = subparsers.add_parser(
        "notify", help="run a VRRP transition: primary commits the replicated "
        "table; backup, fault and stop let local entries expire")
    notify.add_argument("router")
    notify.add_argument(
        "state", nargs="+", metavar="STATE",
        help="primary|backup|fault|stop, or keepalived's TYPE NAME STATE PRIORITY")
    notify.add_argument("--arrived", type=float,
                        help="(notify hook) time the transition arrived, epoch seconds")
    notify.add_argument("--hook-step", action="append", default=[],
                        help="(notify hook) NAME,STARTED,FINISHED,EXIT_STATUS of a "
                        "step the hook already ran; repeatable")

    status = subparsers.add_parser("status", help="show each router's conntrackd, "
                                   "caches and last transition")
    status.add_argument("router", nargs="?")
    status.add_argument("--json", action="store_true")

    daemon = subparsers.add_parser(
        "daemon", help="run this node's routers from one process: start missing "
        "conntrackd instances, restart crashed ones and restore their state, remove "
        "routers that are gone, watch each router's primary address; SIGHUP "
        "re-reads every router")
    daemon.add_argument("--workers", type=int, default=8,
                        help="routers worked on in parallel (default 8)")
    daemon.add_argument("--full-interval", type=float, default=300.0,
                        help="seconds between full re-reads of the state path, a "
                        "safety net: changes are noticed within a second, crashes "
                        "at once (default 300)")
    daemon.add_argument("--stop-routers", action="store_true",
                        help="stop every router's conntrackd on exit (by default "
                        "they keep running and the next daemon adopts them)")

    demo = subparsers.add_parser(
        "demo", help="build two keepalived routers with SNAT in network namespaces, "
        "crash the primary with and without snat-sync, and show which flows "
        "survive (root; cleans up after itself)")
    demo.add_argument("--flows", type=int, default=16,
                      help="TCP flows and UDP flows each (default 16)")


def build_conf():
    conf = cfg.ConfigOpts()
    options.register(conf)
    conf.register_cli_opt(cfg.SubCommandOpt(
        "command", title="commands", handler=_add_parsers,
        help="run `snat-sync COMMAND --help` for each command's arguments"))
    return conf


def main(argv=None):
    arrived = time.time()
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = build_conf()
    try:
        options.load(conf, argv, default_config_files=_default_config_files(),
                     description=DESCRIPTION)
        statedir.check_state_path(conf.state_path)
        return _dispatch(conf, arrived)
    except InvalidInput as error:
        print(f"snat-sync: {error}", file=sys.stderr)
        return error.exit_status
    except (cfg.ConfigFilesNotFoundError, cfg.ConfigFileParseError,
            cfg.ConfigDirNotFoundError) as error:
        print(f"snat-sync: {error}", file=sys.stderr)
        return 2
    except SnatSyncError as error:
        LOG.error("%s", error)
        return error.exit_status


def _default_config_files():
    return cfg.find_config_files(project="snat-sync", prog="snat-sync")


def _dispatch(conf, arrived):
    command = conf.command
    if command.name == "router" and command.router_action == "add":
        spec = _spec(command)
        _check_binary(conf.conntrackd.binary)
        result = manager.add_router(conf, spec, _snat_sync_command(conf))
        if command.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            print(f"router {spec.router_id}: conntrackd pid {result.pid}, "
                  f"config {result.rendered.files.conntrackd_config}")
            print(result.rendered.keepalived_snippet, end="")
        return 0
    if command.name == "router" and command.router_action == "remove":
        removed = manager.remove_router(conf, command.router)
        print(f"router {command.router}: {'removed' if removed else 'not present'}")
        return 0
    if command.name == "render":
        print(_render(conf, command), end="")
        return 0
    if command.name == "notify":
        hook_steps = [failover.HookStep.parse(text) for text in command.hook_step]
        if command.arrived is not None:
            arrived = _arrived(command.arrived, arrived)
        # From the hook (--arrived): the daemon's watcher may have run it already.
        record = manager.notify(conf, command.router, command.state, arrived,
                                hook_steps, skip_if_done=command.arrived is not None)
        return 1 if record.outcome == "failed" else 0
    if command.name == "status":
        statuses = manager.status(conf, command.router)
        if command.json:
            print(json.dumps([each.to_dict() for each in statuses], indent=2))
        else:
            print(format_status(statuses))
        return 0
    if command.name == "daemon":
        from snat_sync import daemon

        if not 1 <= command.workers <= 64 or not 1 <= command.full_interval <= 3600:
            raise InvalidInput("--workers/--full-interval",
                               f"{command.workers}/{command.full_interval}",
                               "workers must be 1 to 64, the interval 1 to 3600 s")
        return daemon.Daemon(conf, _snat_sync_command(conf), command.workers,
                             command.full_interval, command.stop_routers).run()
    if command.name == "demo":
        from snat_sync import demo

        if not 1 <= command.flows <= MAX_DEMO_FLOWS:
            raise InvalidInput("--flows", command.flows,
                               f"must be from 1 to {MAX_DEMO_FLOWS}")
        return demo.main(flows=command.flows)
    raise AssertionError(f"unhandled command {command.name}")


MAX_DEMO_FLOWS = 1000
# Transitions are ordered by the time they arrived; one stamped far in the future
# would make every later transition look superseded. The hook takes the time on
# this host just before it starts snat-sync, so a little slack is enough.
ARRIVED_SLACK = 60


def _arrived(value, now):
    if not math.isfinite(value) or value <= 0 or value > now + ARRIVED_SLACK:
        raise InvalidInput("--arrived", value,
                           "must be the epoch time the transition arrived, not in "
                           "the future")
    return value


def _check_binary(binary):
    if shutil.which(binary) is None:
        raise InvalidInput("option [conntrackd] binary", binary,
                           "not found, or not an executable file")


def _spec(command):
    return RouterSpec.create(
        command.router, command.namespace, command.ha_interface,
        command.local_address, command.peer_address, command.vrid,
        command.primary_address,
    )


def _snat_sync_command(conf):
    return render.snat_sync_command(conf.config_file or [],
                                    conf.config_dir or [], conf.state_path)


def _render(conf, command):
    spec = _spec(command)
    given = (command.ha_network is not None, command.nf_conntrack_max is not None)
    if any(given) and not all(given):
        missing = "--nf-conntrack-max" if given[0] else "--ha-network"
        shown = command.ha_network if given[0] else command.nf_conntrack_max
        raise InvalidInput("--ha-network" if given[0] else "--nf-conntrack-max",
                           shown, f"needs {missing} too")
    if all(given):
        files = manager.router_files(conf, spec.router_id)
        facts = render.NamespaceFacts(_network(command.ha_network, spec),
                                      _nf_conntrack_max(command.nf_conntrack_max))
        rendered = manager.generate(conf, spec, facts, files,
                                    _snat_sync_command(conf))
    else:
        rendered = manager.render_router(conf, spec, _snat_sync_command(conf))
    return rendered.conntrackd_config


def _network(text, spec):
    """The HA network given to `render`: it must hold the router's addresses."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidInput("HA network", text, "not a network in CIDR form") from None
    for address in (spec.local_address, *spec.peer_addresses):
        if address.version != network.version or address not in network:
            raise InvalidInput("HA network", text, f"does not hold {address}")
    return network


def _nf_conntrack_max(value):
    # conntrackd's HashLimit is twice this and must stay within a C int.
    if not 1 <= value <= options.CONNTRACKD_INT_MAX // 2:
        raise InvalidInput("--nf-conntrack-max", value,
                           f"must be from 1 to {options.CONNTRACKD_INT_MAX // 2}")
    return value


def format_status(statuses):
    if not statuses:
        return "no routers"
    lines = []
    header = ("ROUTER", "NAMESPACE", "ROLE", "CONNTRACKD", "INTERNAL", "EXTERNAL",
              "LAST TRANSITION")
    rows = [header]
    for each in statuses:
        rows.append((
            each.router,
            each.namespace,
            each.role,
            (f"pid {each.conntrackd_pid}" if each.conntrackd_alive else "DOWN")
            + (f" CACHE FULL: {each.cache_full_drops} dropped"
               if each.cache_full_drops else ""),
            _figure(each.internal_cache),
            _figure(each.external_cache),
            _describe_transition(each.last_transition),
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                     .rstrip())
    return "\n".join(lines)


def _figure(value):
    return "-" if value is None else str(value)


def _describe_transition(record):
    if not record:
        return "none"
    when = time.strftime("%H:%M:%S", time.localtime(record["arrived"]))
    steps = " ".join(f"{step['name']}={step['duration_ms']:.1f}ms"
                     for step in record["steps"])
    commit = record.get("commit") or {}
    committed = (f" committed={commit.get('committed')} failed={commit.get('failed')}"
                 if commit else "")
    return f"{record['role']} {record['outcome']} at {when}: {steps}{committed}"
