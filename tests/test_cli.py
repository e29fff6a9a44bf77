"""The command line: exit statuses, messages, and commands that touch nothing."""

import json
import secrets
import time

import pytest

from snat_sync import cli
from snat_sync import manager
from snat_sync import statedir
from snat_sync.roles import Role

RENDER = ["render", "r1", "--namespace", "ns", "--ha-interface", "ha-x",
          "--local-address", "169.254.192.1", "--peer-address", "169.254.192.2",
          "--vrid", "7", "--ha-network", "169.254.192.0/18",
          "--nf-conntrack-max", "262144"]


def run(state_path, *arguments):
    return cli.main(["--state-path", str(state_path), *arguments])


def add_router_files(state_path, spec, running_as=Role.PRIMARY):
    """A router as `router add` leaves it on disk (without a daemon), its
    conntrackd.conf a copy of the variant for running_as."""
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, spec.to_dict())
    for role in (Role.PRIMARY, Role.BACKUP):
        files.conntrackd_variant(role).write_text(f"# {role.value}\n")
    files.conntrackd_config.write_text(f"# {running_as.value}\n")
    return files


@pytest.fixture
def cold_config(write_config):
    """Cold standby: the notify tests below are about the commit and the guard."""
    return str(write_config("[failover]\nstandby_mode = cold\n"))


def everything_under(path):
    return sorted(str(each.relative_to(path)) for each in path.rglob("*")) \
        if path.exists() else []


# -- notify -------------------------------------------------------------------------


def test_notify_with_a_bad_state_exits_2(state_path, capsys):
    status = run(state_path, "notify", "r1", "INSTANCE", "VR_7", "BOGUS", "50")
    assert status == 2
    err = capsys.readouterr().err
    assert "snat-sync: invalid notify state 'BOGUS'" in err
    assert "MASTER" in err
    assert not state_path.exists()


def test_notify_for_an_unknown_router_exits_2(state_path, capsys):
    status = run(state_path, "notify", "nosuchrouter", "INSTANCE", "VR_7", "MASTER",
                 "50")
    assert status == 2
    err = capsys.readouterr().err
    assert "invalid router 'nosuchrouter'" in err
    assert "unknown here" in err
    assert not (state_path / "routers" / "nosuchrouter").exists()


def test_notify_with_a_bad_router_id_exits_2(state_path, capsys):
    assert run(state_path, "notify", "../../etc", "primary") == 2
    assert "invalid router id '../../etc'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["soon", "1000.1,1000.3,0", "commit,a,b,0",
                                 "commit,1000.1,1000.3,0,-5",
                                 "commit,1000.1,1000.3,0,12x"])
def test_notify_with_a_bad_hook_step_exits_2(state_path, spec, capsys, bad):
    files = add_router_files(state_path, spec)
    assert run(state_path, "notify", "r1", "primary", "--hook-step", bad) == 2
    assert f"invalid hook step '{bad}'" in capsys.readouterr().err
    assert not files.last_transition.exists()


def conntrackd_command(files, *arguments):
    return ["conntrackd", "-C", str(files.conntrackd_config), *arguments]


def nft_command(files, ruleset):
    return ["nsenter", "--net=/run/netns/qrouter-r1", "nft", "-f",
            str(getattr(files, ruleset))]


CACHE_STATS = ("cache:internal\tactive objects:\t\t0\n"
               "cache:external\tactive objects:\t\t3\n")
COMMIT_LOG = ("[Tue Nov 24 20:13:56 2026] (pid=1) [notice] committing all external "
              "caches\n"
              "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] Committed 3 new entries\n"
              "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] commit has taken 0.000010 "
              "seconds\n")


def append_commit_log(files):
    with open(files.log_file, "a") as log:
        log.write(COMMIT_LOG)


def answer_cache_stats(monkeypatch):
    """conntrackd's control socket, faked: every statistics request gets
    CACHE_STATS."""
    monkeypatch.setattr("snat_sync.conntrackd.query_stats",
                        lambda path, kind, timeout: CACHE_STATS)


def test_notify_primary_runs_the_transition_and_records_it(state_path, spec, fp, cold_config,
                                                           monkeypatch):
    answer_cache_stats(monkeypatch)
    files = add_router_files(state_path, spec)
    files.log_file.write_text(COMMIT_LOG)  # an earlier commit's
    expected = [conntrackd_command(files, "-c"),
                nft_command(files, "guard_lift"),
                *(conntrackd_command(files, flag) for flag in ("-f", "-R", "-B"))]
    # conntrackd -c logs its own block, as the real one does
    fp.register(expected[0], callback=lambda process: append_commit_log(files))
    for command in expected[1:]:
        fp.register(command)
    status = run(state_path, "--config-file", cold_config, "notify", "r1", "INSTANCE", "VR_7", "MASTER", "100",
                 "--arrived", "1234.5")
    assert status == 0
    assert list(fp.calls) == expected
    record = statedir.read_json(files.last_transition)
    assert (record["role"], record["outcome"], record["arrived"]) == (
        "primary", "done", 1234.5)
    assert record["commit"] == {"committed": 3, "already_present": 0, "failed": 0,
                                "seconds": 0.00001, "expected": 3}


def test_notify_with_the_hook_steps_skips_them(state_path, spec, fp, cold_config, monkeypatch):
    answer_cache_stats(monkeypatch)
    files = add_router_files(state_path, spec)
    files.log_file.write_text(COMMIT_LOG)
    for flag in ("-f", "-R", "-B"):
        fp.register(conntrackd_command(files, flag))
    status = run(state_path, "--config-file", cold_config, "notify", "r1", "INSTANCE", "VR_7", "MASTER", "100",
                 "--arrived", "1000.0", "--hook-step", "commit,1000.1,1000.3,0",
                 "--hook-step", "lift-guard,1000.3,1000.305,0")
    assert status == 0
    assert list(fp.calls) == [conntrackd_command(files, flag)
                              for flag in ("-f", "-R", "-B")]
    steps = statedir.read_json(files.last_transition)["steps"]
    assert [(step["name"], step["run_by"]) for step in steps[:2]] == [
        ("commit", "notify-hook"), ("lift-guard", "notify-hook")]
    assert steps[0]["duration_ms"] == pytest.approx(200, abs=0.01)
    assert steps[1]["duration_ms"] == pytest.approx(5, abs=0.01)


def test_notify_backup_raises_the_guard(state_path, spec, fp, cold_config, monkeypatch):
    files = add_router_files(state_path, spec)
    monkeypatch.setattr(manager.conntrackd.Conntrackd, "start",
                        lambda daemon, policy="other": False)
    expected = [nft_command(files, "guard_raise"), conntrackd_command(files, "-t"),
                conntrackd_command(files, "-n")]
    for command in expected:
        fp.register(command)
    assert run(state_path, "--config-file", cold_config, "notify", "r1", "BACKUP") == 0
    assert list(fp.calls) == expected


def test_notify_exits_1_when_the_transition_fails(state_path, spec, fp, cold_config):
    files = add_router_files(state_path, spec)
    fp.register(conntrackd_command(files, "-c"), returncode=1)
    fp.register(conntrackd_command(files, "-s", "cache"), returncode=1)
    fp.register(nft_command(files, "guard_lift"))
    for flag in ("-R", "-B"):
        fp.register(conntrackd_command(files, flag))
    assert run(state_path, "--config-file", cold_config, "notify", "r1", "MASTER") == 1
    record = statedir.read_json(files.last_transition)
    assert record["outcome"] == "failed"
    assert [step["ok"] for step in record["steps"]] == [False, True, False, True, True]


# -- router add -----------------------------------------------------------------------



def test_notify_primary_with_warm_standby_commits_nothing(state_path, spec, fp,
                                                          monkeypatch):
    """conntrackd already runs the primary's configuration: it reads the table."""
    files = add_router_files(state_path, spec, running_as=Role.PRIMARY)
    monkeypatch.setattr(manager.conntrackd.Conntrackd, "is_running",
                        lambda daemon: True)
    expected = [conntrackd_command(files, "-R")]
    for command in expected:
        fp.register(command)
    assert run(state_path, "notify", "r1", "INSTANCE", "VR_7", "MASTER", "100") == 0
    assert list(fp.calls) == expected
    record = statedir.read_json(files.last_transition)
    assert (record["outcome"], record["commit"]) == ("done", None)


def test_notify_backup_with_warm_standby_empties_the_table_and_asks_for_it(
        state_path, spec, fp, monkeypatch, no_table_server):
    """No peer daemon serves the table: the peer is asked on its report port, then
    conntrackd's resync."""
    files = add_router_files(state_path, spec, running_as=Role.BACKUP)
    monkeypatch.setattr(manager.conntrackd.Conntrackd, "is_running",
                        lambda daemon: True)
    enter = ["nsenter", "--net=/run/netns/qrouter-r1"]
    expected = [conntrackd_command(files, "-f", "internal"),
                [*enter, "conntrack", "-F", "-f", "ipv4"],
                [*enter, "conntrack", "-F", "-f", "ipv6"],
                conntrackd_command(files, "-n")]
    for command in expected:
        fp.register(command)
    assert run(state_path, "notify", "r1", "BACKUP") == 0
    assert list(fp.calls) == expected
    assert no_table_server == [("169.254.192.2", 4780 + spec.vrid)]

def router_add(state_path, **overrides):
    arguments = {"--namespace": "qrouter-r1", "--ha-interface": "ha-x",
                 "--local-address": "169.254.192.1",
                 "--peer-address": "169.254.192.2", "--vrid": "7"}
    arguments.update(overrides)
    flat = [item for pair in arguments.items() for item in pair]
    return run(state_path, "router", "add", "r1", *flat)


@pytest.mark.parametrize("vrid", ["0", "255", "7a"])
def test_router_add_with_a_bad_vrid_exits_2_and_creates_nothing(
        state_path, capsys, vrid):
    assert router_add(state_path, **{"--vrid": vrid}) == 2
    assert f"invalid VRID '{vrid}'" in capsys.readouterr().err
    assert not state_path.exists()


def test_router_add_for_a_missing_namespace_exits_2_and_creates_nothing(
        state_path, capsys):
    namespace = f"snat-sync-test-absent-{secrets.token_hex(4)}"
    assert router_add(state_path, **{"--namespace": namespace}) == 2
    err = capsys.readouterr().err
    assert f"invalid namespace '{namespace}'" in err
    assert "no such network namespace" in err
    assert not state_path.exists()


# -- render ---------------------------------------------------------------------------


def test_render_prints_the_config_and_touches_nothing(state_path, capsys):
    assert run(state_path, *RENDER) == 0
    out = capsys.readouterr().out
    assert out.startswith("# conntrackd configuration for router r1")
    assert "\tUDP {\n" in out
    assert "Port 3787" in out
    assert "IPv4_Destination_Address 169.254.192.2" in out
    assert "HashLimit 524288" in out
    assert "IPv4_address 169.254.192.0/18" in out
    router_directory = state_path.absolute() / "routers" / "r1"
    assert f"LockFile {router_directory / 'conntrackd.lock'}" in out
    assert out.endswith("}\n")
    assert not state_path.exists()


def test_render_with_a_bad_ha_network_exits_2(state_path, capsys):
    arguments = list(RENDER)
    arguments[arguments.index("169.254.192.0/18")] = "not-a-network"
    assert run(state_path, *arguments) == 2
    assert "invalid HA network 'not-a-network'" in capsys.readouterr().err


def test_render_refuses_a_state_path_conntrackd_cannot_parse(tmp_path, capsys):
    assert run(tmp_path / "snat sync", *RENDER) == 2
    err = capsys.readouterr().err
    assert "invalid state path" in err
    assert "snat sync" in err


def test_render_refuses_a_state_path_too_long_for_the_socket(tmp_path, capsys):
    assert run(tmp_path / ("x" * 100), *RENDER) == 2
    assert "UNIX socket paths must stay under 108 bytes" in capsys.readouterr().err


# -- status ---------------------------------------------------------------------------


def test_status_without_routers(state_path, capsys):
    assert run(state_path, "status") == 0
    assert capsys.readouterr().out == "no routers\n"


def test_status_json_without_routers(state_path, capsys):
    assert run(state_path, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_status_json_of_a_router_whose_daemon_is_down(state_path, spec, capsys,
                                                      monkeypatch):
    monkeypatch.setattr("snat_sync.namespace.namespace_inode", lambda name: None)
    files = add_router_files(state_path, spec)
    statedir.write_json(files.last_transition, {
        "router": "r1", "role": "backup", "arrived": 1000.0, "started": 1000.0,
        "finished": 1000.1, "outcome": "done", "steps": [], "commit": None,
        "errors": []})
    assert run(state_path, "status", "--json") == 0
    (router,) = json.loads(capsys.readouterr().out)
    assert router["router"] == "r1"
    assert router["namespace"] == "qrouter-r1"
    assert (router["role"], router["role_source"]) == ("backup", "last-transition")
    assert router["peers"] == [{"address": "169.254.192.2", "role": "unknown",
                                "last_seen": None, "internal_cache": None,
                                "external_cache": None, "kernel_entries": None,
                                "figures_age_seconds": None}]
    assert router["conntrackd_alive"] is False
    assert router["conntrackd_pid"] is None
    assert router["replication"] is None
    assert router["last_transition"]["outcome"] == "done"
    assert (router["verdict"], router["reason"]) == (
        "broken", "namespace qrouter-r1 does not exist")


def test_status_of_an_unknown_router_exits_2(state_path, capsys):
    assert run(state_path, "status", "r9") == 2
    assert "invalid router 'r9'" in capsys.readouterr().err


def router_status(**overrides):
    values = {
        "router": "r1", "namespace": "qrouter-r1", "role": "primary",
        "role_source": "address",
        "peers": (manager.PeerStatus("169.254.192.2", "backup", 1000.0, 0, 20200),),
        "conntrackd_pid": 4242, "conntrackd_alive": True,
        "conntrackd_started": 1000.0, "conntrackd_uptime_seconds": 3 * 3600 + 720.5,
        "kernel_entries": 20210, "internal_cache": 20203, "external_cache": 0,
        "replication": manager.ReplicationStats(
            packets_sent=36, packets_received=1282, messages_lost=12,
            messages_malformed=3, resend_queue=0, cache_full_drops=0),
        "last_transition": None, "last_repair": None, "problems": (),
        "checked": 1000.0, "verdict": "in-sync",
        "reason": "peer 169.254.192.2 holds 20200 of 20203 entries",
    }
    values.update(overrides)
    return manager.RouterStatus(**values)


def test_format_status_shows_one_line_per_router_in_sync():
    arrived = time.time() - 60
    record = {"role": "primary", "outcome": "done", "arrived": arrived,
              "finished": arrived + 0.48125, "steps": [], "commit": None}
    text = cli.format_status([router_status(last_transition=record)])
    header, row, summary = text.splitlines()
    when = time.strftime("%H:%M:%S", time.localtime(arrived))
    cells = {"ROUTER": "r1", "ROLE": "primary (addr)", "VERDICT": "in-sync",
             "CONNTRACKD": "pid 4242 up 3h12m", "KERNEL": "20210",
             "INTERNAL": "20203", "EXTERNAL": "0", "PEERS": "169.254.192.2 backup",
             "LOST/MALFORMED": "12/3",
             "LAST TRANSITION": f"primary done {when} in 481ms"}
    starts = [header.index(column) for column in cells]
    assert starts == sorted(starts)
    ends = [*starts[1:], len(row)]
    assert {column: row[start:end].strip() for column, start, end
            in zip(cells, starts, ends)} == cells
    assert summary == "1 router: 1 in-sync, 0 degraded, 0 broken"


def test_format_status_gives_the_reason_under_a_router_not_in_sync():
    text = cli.format_status([
        router_status(router="r1"),
        router_status(router="a-much-longer-router-name", role="unknown",
                      role_source="none", conntrackd_pid=None,
                      conntrackd_alive=False, conntrackd_started=None,
                      conntrackd_uptime_seconds=None, kernel_entries=None,
                      internal_cache=None, external_cache=None, replication=None,
                      peers=(manager.PeerStatus("169.254.192.2", "unknown", None,
                                                None, None),),
                      verdict="broken", reason="conntrackd is not running"),
        router_status(router="r3", role="backup", role_source="last-transition",
                      verdict="degraded",
                      reason="external cache holds 0 of the primary's 20200 entries"),
    ])
    lines = text.splitlines()
    assert len(lines) == 7
    header, first, down, down_reason, third, third_reason, summary = lines
    assert "reason" not in first
    assert down.split() == ["a-much-longer-router-name", "unknown", "BROKEN", "DOWN",
                            "-", "-", "-", "169.254.192.2", "unknown", "-", "none"]
    assert down_reason == "    reason: conntrackd is not running"
    assert third.split()[:3] == ["r3", "backup", "(last)"]
    assert third_reason == ("    reason: external cache holds 0 of the primary's "
                            "20200 entries")
    # columns line up: every header starts where its cells start
    for column, cell in (("ROLE", "unknown"), ("VERDICT", "BROKEN"),
                         ("CONNTRACKD", "DOWN"), ("PEERS", "169.254.192.2")):
        assert header.index(column) == down.index(cell)
    assert header.index("VERDICT") == third.index("degraded")
    assert summary == "3 routers: 1 in-sync, 1 degraded, 1 broken"


def test_format_status_of_an_old_or_damaged_transition_record():
    old = router_status(last_transition={"role": "backup", "outcome": "failed",
                                         "arrived": 86400.0 * 365})
    assert cli.format_status([old]).splitlines()[1].endswith(
        "backup failed " + time.strftime("%Y-%m-%d", time.localtime(86400.0 * 365)))
    damaged = router_status(last_transition={"role": ["primary"], "arrived": "x",
                                             "outcome": "\x1b[31mdone"})
    assert cli.format_status([damaged]).splitlines()[1].endswith("-  [31mdone")


def test_format_status_of_250_routers_is_one_line_each_and_a_reason_line():
    statuses = [router_status(router=f"router-{index:03d}",
                              verdict="degraded" if index % 10 == 0 else "in-sync",
                              reason="no health check from the node daemon in 9 s")
                for index in range(250)]
    lines = cli.format_status(statuses).splitlines()
    assert len(lines) == 1 + 250 + 25 + 1
    assert max(len(line) for line in lines) < 200
    assert lines[-1] == "250 routers: 225 in-sync, 25 degraded, 0 broken"


@pytest.mark.parametrize("seconds, shown", [
    (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"),
    (3 * 3600 + 720, "3h12m"), (86400 * 4 + 3 * 3600 + 5, "4d3h")])
def test_uptime_is_short(seconds, shown):
    row = cli.format_status([router_status(conntrackd_uptime_seconds=seconds)])
    assert f"pid 4242 up {shown} " in row.splitlines()[1]


def test_format_status_without_routers():
    assert cli.format_status([]) == "no routers"
