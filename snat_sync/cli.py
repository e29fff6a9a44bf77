"""The snat-sync command line: parse, call the manager, print. Nothing else."""

import collections
import ipaddress
import json
import logging
import math
import shutil
import sys
import time

from oslo_config import cfg

from snat_sync import failover
from snat_sync import history
from snat_sync import manager
from snat_sync import options
from snat_sync import render
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.router import NamespaceFacts, RouterSpec

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

    status = subparsers.add_parser(
        "status", help="show whether each router's connection table is replicated "
        "(in-sync, degraded or broken, and why), with its role, conntrackd, the "
        "kernel's and conntrackd's entry counts, its peers, lost and malformed "
        "sync messages and its last transition")
    status.add_argument("router", nargs="?")
    status.add_argument("--json", action="store_true")

    wait_help = ("wait until the routers are in sync (the verdict of `status`), "
                 "e.g. before restarting the next node of a rolling upgrade: "
                 "`snat-sync wait --timeout 600 && <restart next node>`. Exits 0 "
                 "as soon as every router is in sync; 1 after the timeout, "
                 "printing each router that is not and why; 2 for a router "
                 "unknown here")
    wait = subparsers.add_parser("wait", help=wait_help, description=wait_help)
    wait.add_argument("routers", nargs="*", metavar="ROUTER",
                      help="router ids (default: every router on this node)")
    wait.add_argument("--timeout", type=float, default=300.0, metavar="S",
                      help="give up after S seconds (default 300)")
    wait.add_argument("--interval", type=float, default=0.25, metavar="S",
                      help="seconds between polls (default 0.25)")

    metrics_help = ("print every router's status and counters as Prometheus "
                    "metrics (text exposition format); `snat-sync daemon` serves "
                    "the same on http://[metrics] listen_address:listen_port"
                    "/metrics")
    metrics = subparsers.add_parser("metrics", help=metrics_help,
                                    description=metrics_help)
    metrics.add_argument(
        "--textfile", metavar="PATH", help="write the metrics to PATH instead of "
        "printing them, atomically and readable by all (0644), for node_exporter's "
        "textfile collector; an absolute path ending in .prom")

    explained = ("show a router's latest transitions and repairs, oldest first, one "
                 "a line: when it arrived, what it was, its outcome, total and "
                 "per-step times, commit counts and the first error. The newest "
                 "[failover] history_size of them are kept")
    history_parser = subparsers.add_parser("history", help=explained,
                                           description=explained)
    history_parser.add_argument("router", help="router id")
    history_parser.add_argument(
        "--limit", type=int, metavar="N",
        help=f"show the newest N only, 1 to {MAX_HISTORY_LIMIT} (default: all kept)")
    history_parser.add_argument("--json", action="store_true",
                                help="print the entries as a JSON list")

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
    if command.name == "wait":
        from snat_sync import wait

        if not 0 <= command.timeout <= wait.MAX_TIMEOUT \
                or not 0.01 <= command.interval <= 60:
            raise InvalidInput("--timeout/--interval",
                               f"{command.timeout}/{command.interval}",
                               f"the timeout must be 0 to {wait.MAX_TIMEOUT:g} s, "
                               "the interval 0.01 to 60 s")
        source = wait.status_source(conf, command.routers, manager.status)
        return wait.run(source, command.timeout, command.interval)
    if command.name == "metrics":
        from snat_sync import metrics

        textfile = (metrics.textfile_path(command.textfile)
                    if command.textfile is not None else None)
        snapshot = metrics.gather(conf)
        if textfile is None:
            sys.stdout.write(metrics.render(snapshot).decode("utf-8"))
        else:
            metrics.write_textfile(textfile, snapshot)
        return 0
    if command.name == "history":
        entries = _router_history(conf, command.router, command.limit)
        if command.json:
            print(json.dumps(entries, indent=2))
        else:
            print(format_history(entries))
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
        from snat_sync.lab import demo  # the one import of the lab: the test bench

        if not 1 <= command.flows <= MAX_DEMO_FLOWS:
            raise InvalidInput("--flows", command.flows,
                               f"must be from 1 to {MAX_DEMO_FLOWS}")
        return demo.main(flows=command.flows)
    raise AssertionError(f"unhandled command {command.name}")


MAX_DEMO_FLOWS = 1000
MAX_HISTORY_LIMIT = 10000
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


def _router_history(conf, router_id, limit):
    if limit is not None and not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise InvalidInput("--limit", limit, f"must be from 1 to {MAX_HISTORY_LIMIT}")
    files = manager.router_files(conf, router_id)
    if not files.spec.exists():
        raise InvalidInput("router", router_id, "unknown here")
    return history.read_history(files, limit)


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
        facts = NamespaceFacts(_network(command.ha_network, spec),
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
    """One line per router, and under a router that is not in sync, why.

    ROLE is marked with where it comes from: (addr) the primary address seen on
    the HA interface or not, (last) the last transition. The last line counts
    the verdicts.
    """
    if not statuses:
        return "no routers"
    header = ("ROUTER", "ROLE", "VERDICT", "CONNTRACKD", "KERNEL", "INTERNAL",
              "EXTERNAL", "PEERS", "LOST/MALFORMED", "LAST TRANSITION")
    table = _table([header, *(_status_row(each) for each in statuses)])
    lines = [table[0]]
    for each, line in zip(statuses, table[1:]):
        lines.append(line)
        if each.verdict != "in-sync":
            lines.append(f"    reason: {each.reason}")
    counts = collections.Counter(each.verdict for each in statuses)
    lines.append(f"{len(statuses)} router{'s' if len(statuses) != 1 else ''}: "
                 + ", ".join(f"{counts[word]} {word}"
                             for word in ("in-sync", "degraded", "broken")))
    return "\n".join(lines)


def _table(rows):
    """The rows (the header first) as lines of columns padded to their widest cell."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


ROLE_SOURCES = {"address": " (addr)", "last-transition": " (last)"}


def _status_row(each):
    replication = each.replication
    return (
        each.router,
        each.role + ROLE_SOURCES.get(each.role_source, ""),
        each.verdict.upper() if each.verdict == "broken" else each.verdict,
        (f"pid {each.conntrackd_pid} up {_duration(each.conntrackd_uptime_seconds)}"
         if each.conntrackd_alive else "DOWN"),
        _figure(each.kernel_entries),
        _figure(each.internal_cache),
        _figure(each.external_cache),
        ", ".join(f"{peer.address} {peer.role}" for peer in each.peers) or "-",
        (f"{replication.messages_lost}/{replication.messages_malformed}"
         if replication else "-"),
        _describe_transition(each.last_transition),
    )


def _figure(value):
    return "-" if value is None else str(value)


def _duration(seconds):
    """A short age: 45s, 12m, 3h12m, 4d3h."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _describe_transition(record):
    """The last transition in a few words: role, outcome, when, how long."""
    if not isinstance(record, dict):
        return "none"
    words = [_one_line(value) if isinstance(value, str) else "-"
             for value in (record.get("role"), record.get("outcome"))]
    arrived = _number(record.get("arrived"))
    finished = _number(record.get("finished"))
    if arrived is not None:
        words.append(_when(arrived))
        if finished is not None:
            words.append(f"in {(finished - arrived) * 1000:.0f}ms")
    return " ".join(words)


def _when(epoch):
    """Time of day for the last day, the date before."""
    if abs(time.time() - epoch) < 86400:
        return _local_time(epoch, "%H:%M:%S")
    return _local_time(epoch, "%Y-%m-%d")


def format_history(entries):
    """One line per transition or repair, oldest first, as `history` prints them.

    The entries come from a file: a missing or mistyped field shows as "-".
    """
    if not entries:
        return "no history"
    header = ("TIME", "KIND", "WHAT", "OUTCOME", "TOTAL", "STEPS",
              "COMMITTED/EXPECTED/FAILED", "FIRST ERROR")
    return "\n".join(_table([header, *(_history_row(entry) for entry in entries)]))


def _history_row(entry):
    transition = entry.get("kind") == "transition"
    begun = _number(entry.get("arrived" if transition else "started"))
    finished = _number(entry.get("finished"))
    total = "-" if begun is None or finished is None \
        else f"{(finished - begun) * 1000:.1f}ms"
    steps = [step for step in _list(entry.get("steps")) if isinstance(step, dict)]
    return (
        _local_time(begun),
        _one_line(entry.get("kind")),
        _one_line(entry.get("role" if transition else "repair")),
        _one_line(entry.get("outcome")),
        total,
        " ".join(_describe_step(step) for step in steps) or "-",
        _commit_counts(entry.get("commit")),
        _first_error(entry, steps),
    )


def _describe_step(step):
    duration = _number(step.get("duration_ms"))
    shown = "-" if duration is None else f"{duration:.1f}ms"
    if not step.get("ok"):
        shown = f"FAILED({shown})"
    return f"{_one_line(step.get('name'))}={shown}"


def _commit_counts(commit):
    if not isinstance(commit, dict):
        return "-"
    return "/".join(_one_line(commit.get(key))
                    for key in ("committed", "expected", "failed"))


def _first_error(entry, steps):
    errors = [*_list(entry.get("errors")),
              *(step.get("error") for step in steps if not step.get("ok"))]
    return next((_one_line(error) for error in errors if error), "-")


def _local_time(epoch, layout="%Y-%m-%d %H:%M:%S.{ms}"):
    """epoch in local time; {ms} in layout stands for its milliseconds."""
    if epoch is None:
        return "-"
    try:
        moment = time.localtime(epoch)
    except (OverflowError, OSError, ValueError):
        return "-"
    return time.strftime(layout, moment).format(ms=f"{int(epoch % 1 * 1000):03d}")


def _number(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value):
        return value
    return None


def _list(value):
    return value if isinstance(value, list) else []


def _one_line(value):
    """value as one line of printable text, "-" for nothing."""
    if value is None:
        return "-"
    return "".join(char if char.isprintable() else " " for char in str(value))
