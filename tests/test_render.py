"""Rendering conntrackd.conf, the notify hook and the keepalived snippet."""

import ipaddress
import os
import shlex
import shutil
import subprocess

import pytest

from snat_sync import failover
from snat_sync import render
from snat_sync import statedir
from snat_sync.errors import InvalidInput
from snat_sync.roles import Role
from snat_sync.router import NamespaceFacts, RouterSpec

HA_NETWORK = ipaddress.ip_network("169.254.192.0/18")
FACTS = NamespaceFacts(HA_NETWORK, 262144)


def parse_blocks(text):
    """conntrackd.conf as nested dicts: {"Sync": {"UDP": {"_lines": [...]}}}.

    Raises AssertionError on an unbalanced brace, so every parse checks balance.
    """
    root = {"_lines": []}
    stack = [root]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            name = line[:-1].strip()
            block = {"_lines": []}
            assert name not in stack[-1], f"line {number}: block {name} twice"
            stack[-1][name] = block
            stack.append(block)
        elif line == "}":
            assert len(stack) > 1, f"line {number}: '}}' closes nothing"
            stack.pop()
        else:
            assert "{" not in line and "}" not in line, f"line {number}: {raw!r}"
            stack[-1]["_lines"].append(line)
    assert len(stack) == 1, "unclosed block at end of file"
    return root


def make_spec(peers=("169.254.192.2",), local="169.254.192.1", vrid=7,
              router_id="r1"):
    return RouterSpec.create(router_id, f"qrouter-{router_id}", "ha-1a2b3c4d-5e",
                             local, list(peers), vrid)


def render_config(conf, spec, facts=FACTS, role=Role.PRIMARY):
    files = statedir.RouterFiles.under(conf.state_path, spec.router_id)
    settings = render.conntrackd_settings(
        spec, conf.conntrackd, facts, files,
        warm_standby=conf.failover.standby_mode == "warm", role=role,
        backup_reads_events=conf.failover.backup_reads_events)
    return render.render_conntrackd_config(settings), files


def test_templates_are_found_in_the_source_tree():
    directory = render.templates_directory()
    assert directory.is_dir()
    for name in ("conntrackd.conf.j2", "notify.sh.j2", "keepalived.conf.j2"):
        assert (directory / name).is_file()


def test_udp_config(cold_conf):
    text, files = render_config(cold_conf, make_spec())
    blocks = parse_blocks(text)
    assert set(blocks) == {"_lines", "Sync", "General"}
    sync = blocks["Sync"]
    assert set(sync) == {"_lines", "Mode FTFW", "UDP", "Options"}
    assert "DisableExternalCache Off" in sync["Mode FTFW"]["_lines"]
    assert "PurgeTimeout 60" in sync["Mode FTFW"]["_lines"]
    udp = sync["UDP"]["_lines"]
    assert "IPv4_address 169.254.192.1" in udp
    assert "IPv4_Destination_Address 169.254.192.2" in udp
    assert "Port 3787" in udp
    assert "Interface ha-1a2b3c4d-5e" in udp
    assert not any(line.startswith(("Group", "IPv6")) for line in udp)


def test_udp_config_over_ipv6(conf):
    text, _files = render_config(conf, make_spec(local="fd00:a::1",
                                                 peers=["fd00:a::2"]),
                                 NamespaceFacts(
                                     ipaddress.ip_network("fd00:a::/64"), 1000))
    blocks = parse_blocks(text)
    udp = blocks["Sync"]["UDP"]["_lines"]
    assert "IPv6_address fd00:a::1" in udp
    assert "IPv6_Destination_Address fd00:a::2" in udp
    assert "IPv6_address fd00:a::/64" in blocks["General"]["Filter From Kernelspace"][
        "Address Ignore"]["_lines"]


def test_multicast_config_for_several_peers(conf):
    text, _files = render_config(conf, make_spec(peers=["169.254.192.2",
                                                        "169.254.192.3"], vrid=9))
    sync = parse_blocks(text)["Sync"]
    assert "UDP" not in sync
    multicast = sync["Multicast"]["_lines"]
    assert "IPv4_address 225.0.0.50" in multicast
    assert "Group 3789" in multicast
    assert "IPv4_interface 169.254.192.1" in multicast
    assert "Interface ha-1a2b3c4d-5e" in multicast
    assert not any("169.254.192.2" in line or "169.254.192.3" in line
                   for line in multicast)


def test_auto_sync_mode_is_ftfw_between_two_nodes_only(conf):
    """FTFW drops the messages of a sender whose sequence is behind another's:
    a router with several peers, or with peers learned by multicast, gets
    NOTRACK, which drops nothing by sequence (render.sync_mode)."""
    assert conf.conntrackd.sync_mode == "auto"

    def mode(spec):
        return next(name for name in parse_blocks(render_config(conf, spec)[0])["Sync"]
                    if name.startswith("Mode "))

    assert mode(make_spec()) == "Mode FTFW"
    assert mode(make_spec(peers=["169.254.192.2", "169.254.192.3"])) == "Mode NOTRACK"
    learned = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                                [], 7, "169.254.0.7/24")
    assert mode(learned) == "Mode NOTRACK"
    three = make_spec(peers=["169.254.192.2", "169.254.192.3"])
    assert render.sync_mode("auto", three) == "notrack"
    assert render.sync_mode("ftfw", three) == "ftfw"  # what the operator asked for
    assert render.sync_mode("notrack", make_spec()) == "notrack"


def test_multicast_config_over_ipv6(conf):
    """conntrackd 1.4.7 joins an IPv6 group on Interface, read after
    IPv6_address; it ignores IPv6_interface (src/read_config_yy.y)."""
    text, _files = render_config(conf, make_spec(local="fd00:a::1",
                                                 peers=["fd00:a::2", "fd00:a::3"],
                                                 vrid=9),
                                 NamespaceFacts(
                                     ipaddress.ip_network("fd00:a::/64"), 1000))
    multicast = parse_blocks(text)["Sync"]["Multicast"]["_lines"]
    assert multicast[:3] == ["IPv6_address ff12::3780", "Group 3789",
                             "Interface ha-1a2b3c4d-5e"]
    assert not any(line.startswith(("IPv4", "IPv6_interface")) for line in multicast)


def test_ipv6_multicast_group_comes_from_the_options(make_conf, write_config):
    conf = make_conf(write_config(
        "[conntrackd]\ntransport = multicast\nipv6_multicast_group = ff02::1:3\n"))
    text, _files = render_config(conf, make_spec(local="fd00:a::1",
                                                 peers=["fd00:a::2"]),
                                 NamespaceFacts(
                                     ipaddress.ip_network("fd00:a::/64"), 1000))
    assert "IPv6_address ff02::1:3" in parse_blocks(text)["Sync"]["Multicast"][
        "_lines"]


def test_multicast_group_and_base_port_come_from_the_options(make_conf, write_config):
    conf = make_conf(write_config(
        "[conntrackd]\ntransport = multicast\nmulticast_group = 239.1.2.3\n"
        "base_port = 6000\n"))
    multicast = parse_blocks(render_config(conf, make_spec(vrid=7))[0])["Sync"][
        "Multicast"]["_lines"]
    assert "IPv4_address 239.1.2.3" in multicast
    assert "Group 6007" in multicast


def test_general_uses_the_routers_own_files(conf):
    text, files = render_config(conf, make_spec())
    general = parse_blocks(text)["General"]
    assert f"LogFile {files.log_file}" in general["_lines"]
    assert f"LockFile {files.lock_file}" in general["_lines"]
    assert general["UNIX"]["_lines"] == [f"Path {files.control_socket}"]
    for path in (files.log_file, files.lock_file, files.control_socket):
        assert path.parent == files.directory
        assert path.is_absolute()
    assert files.directory == statedir.routers_directory(conf.state_path) / "r1"


def test_two_routers_share_no_file_and_no_port(conf):
    first = parse_blocks(render_config(conf, make_spec(router_id="r1", vrid=1))[0])
    second = parse_blocks(render_config(conf, make_spec(router_id="r2", vrid=2))[0])
    for key in ("LogFile", "LockFile"):
        lines = [next(line for line in blocks["General"]["_lines"]
                      if line.startswith(key)) for blocks in (first, second)]
        assert lines[0] != lines[1]
    assert first["General"]["UNIX"] != second["General"]["UNIX"]
    assert "Port 3781" in first["Sync"]["UDP"]["_lines"]
    assert "Port 3782" in second["Sync"]["UDP"]["_lines"]


def test_filter_syncs_tcp_udp_icmp_sctp_dccp_and_ignores_local_and_ha_traffic(conf):
    filter_block = parse_blocks(render_config(conf, make_spec())[0])["General"][
        "Filter From Kernelspace"]
    assert filter_block["Protocol Accept"]["_lines"] == ["TCP", "UDP", "ICMP",
                                                         "IPv6-ICMP", "SCTP", "DCCP"]
    assert filter_block["Address Ignore"]["_lines"] == [
        "IPv4_address 127.0.0.0/8",
        "IPv6_address ::1/128",
        "IPv4_address 169.254.192.0/18",
    ]


def test_expectations_of_every_helper_are_synced_by_default(conf):
    blocks = parse_blocks(render_config(conf, make_spec())[0])
    assert blocks["Sync"]["Options"]["_lines"] == ["ExpectationSync On"]


def test_expectation_sync_lists_the_configured_helpers(make_conf, write_config):
    conf = make_conf(write_config(
        "[conntrackd]\nexpectation_helpers = ftp,sip,Q.931\n"))
    blocks = parse_blocks(render_config(conf, make_spec())[0])
    options_block = blocks["Sync"]["Options"]
    assert options_block["_lines"] == []
    assert options_block["ExpectationSync"]["_lines"] == ["ftp", "sip", "Q.931"]


def test_no_expectation_sync_when_no_helper_is_configured(make_conf, write_config):
    conf = make_conf(write_config("[conntrackd]\nexpectation_helpers =\n"))
    text = render_config(conf, make_spec())[0]
    assert "Options" not in parse_blocks(text)["Sync"]
    assert "ExpectationSync" not in text


def test_protocols_come_from_the_options(make_conf, write_config):
    conf = make_conf(write_config("[conntrackd]\nprotocols = TCP,SCTP\n"))
    filter_block = parse_blocks(render_config(conf, make_spec())[0])["General"][
        "Filter From Kernelspace"]
    assert filter_block["Protocol Accept"]["_lines"] == ["TCP", "SCTP"]


@pytest.mark.parametrize("configured, nf_conntrack_max, expected", [
    (0, 262144, 524288),
    (100000, 262144, 524288),
    (1000000, 262144, 1000000),
    (0, 65536, 131072),
])
def test_hash_limit_is_at_least_twice_nf_conntrack_max(
        make_conf, write_config, configured, nf_conntrack_max, expected):
    assert render.hash_limit(configured, nf_conntrack_max) == expected
    conf = make_conf(write_config(f"[conntrackd]\nhash_limit = {configured}\n"))
    text, _files = render_config(conf, make_spec(),
                                 NamespaceFacts(HA_NETWORK, nf_conntrack_max))
    general = parse_blocks(text)["General"]["_lines"]
    assert f"HashLimit {expected}" in general
    assert "HashSize 65536" in general


def test_hash_size_comes_from_the_options(make_conf, write_config):
    conf = make_conf(write_config("[conntrackd]\nhash_size = 32768\n"))
    general = parse_blocks(render_config(conf, make_spec())[0])["General"]["_lines"]
    assert "HashSize 32768" in general
    assert "HashSize 65536" not in general


def test_no_scheduler_section_by_default(conf):
    general = parse_blocks(render_config(conf, make_spec())[0])["General"]
    assert "Scheduler" not in general
    assert render.conntrackd_settings(make_spec(), conf.conntrackd, FACTS,
                                      None).scheduler is None


@pytest.mark.parametrize("policy", ["rr", "fifo"])
def test_scheduler_section_for_real_time_policies(make_conf, write_config, policy):
    conf = make_conf(write_config(
        f"[conntrackd]\nscheduler = {policy}\nscheduler_priority = 5\n"))
    general = parse_blocks(render_config(conf, make_spec())[0])["General"]
    assert general["Scheduler"]["_lines"] == [f"Type {policy.upper()}", "Priority 5"]


@pytest.mark.parametrize("mode, switch", [("warm", "On"), ("cold", "Off")])
def test_notrack_mode_injects_with_warm_standby(make_conf, write_config, mode, switch):
    conf = make_conf(write_config(f"[conntrackd]\nsync_mode = notrack\n"
                                  f"[failover]\nstandby_mode = {mode}\n"))
    sync = parse_blocks(render_config(conf, make_spec(), role=Role.BACKUP)[0])["Sync"]
    assert sync["Mode NOTRACK"]["_lines"] == [f"DisableExternalCache {switch}",
                                              "PurgeTimeout 60"]


def test_warm_standby_refuses_the_alarm_mode(make_conf, write_config):
    """conntrackd's ALARM mode has no DisableExternalCache: it cannot be warm."""
    with pytest.raises(InvalidInput, match="sync_mode.*alarm.*warm"):
        make_conf(write_config("[conntrackd]\nsync_mode = alarm\n"))
    make_conf(write_config("[conntrackd]\nsync_mode = alarm\n"
                           "[failover]\nstandby_mode = cold\n"))


def test_netlink_max_growth_is_never_below_the_initial_size(make_conf, write_config):
    conf = make_conf(write_config(
        "[conntrackd]\nnetlink_buffer_size = 4194304\n"
        "netlink_buffer_max_size = 1048576\n"))
    general = parse_blocks(render_config(conf, make_spec())[0])["General"]["_lines"]
    assert "NetlinkBufferSize 4194304" in general
    assert "NetlinkBufferSizeMaxGrowth 4194304" in general


@pytest.mark.parametrize("peers", [["169.254.192.2"],
                                   ["169.254.192.2", "169.254.192.3"]])
def test_output_is_clean(make_conf, write_config, peers):
    conf = make_conf(write_config("[conntrackd]\nscheduler = rr\n"))
    text, _files = render_config(conf, make_spec(peers=peers))
    assert text.endswith("}\n")
    assert "\n\n" not in text
    assert all(line.strip() for line in text.splitlines())
    for leftover in ("{{", "}}", "{%", "%}", "{#"):
        assert leftover not in text
    assert text.count("{") == text.count("}")
    parse_blocks(text)


# -- the notify hook ----------------------------------------------------------------


def render_hook(files, binary="/usr/sbin/conntrackd", command=None, lock_timeout=120,
                commit_timeout=60, guard_namespace=None):
    command = command or render.snat_sync_command([], [], files.directory.parent.parent)
    return render.render_notify_hook(files.directory.name, files, binary, command,
                                     lock_timeout, commit_timeout,
                                     guard_namespace=guard_namespace)


@pytest.mark.parametrize("guard_namespace", [None, "qrouter-r1"])
def test_hook_is_a_bash_script_that_bash_accepts(state_path, guard_namespace):
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render_hook(files, guard_namespace=guard_namespace)
    assert hook.startswith("#!/bin/bash\n")
    result = subprocess.run(["bash", "-n"], input=hook, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert "{{" not in hook and "{%" not in hook
    assert "--timeout 120" in hook
    assert "timeout 60 /usr/sbin/conntrackd" in hook
    assert f"-C {files.conntrackd_config} -c" in hook
    assert '--hook-step "commit,' in hook
    assert f">>{files.notify_log} 2>&1" in hook


def test_warm_hook_forgets_its_own_entries_on_every_state_but_master(state_path):
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render.render_notify_hook("r1", files, "/usr/sbin/conntrackd",
                                     ["python3", "-m", "snat_sync"], 120, 60,
                                     commits=False, forgets=True, control_timeout=7)
    result = subprocess.run(["bash", "-n"], input=hook, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in hook.splitlines()]
    condition = lines.index('if [ "${3:-${1:-}}" != MASTER ]; then')
    forget = lines.index(f"timeout 7 /usr/sbin/conntrackd -C {files.conntrackd_config} "
                         "-f internal >/dev/null 2>&1")
    assert condition < lines.index(f'flock --timeout 120 "$lock"; then'.join(
        ("if ", ""))) < forget
    assert '--hook-step "forget-own-entries,' in hook
    assert " -c " not in hook and "nft" not in hook


@pytest.mark.parametrize("state, forgets", [("MASTER", False), ("BACKUP", True),
                                            ("FAULT", True), ("STOP", True)])
def test_warm_hook_runs_the_forget_for_the_states_keepalived_passes(
        tmp_path, state, forgets):
    """Run the rendered hook with bash, with conntrackd and snat-sync replaced by
    scripts that log their arguments."""
    files = statedir.RouterFiles(tmp_path / "r1")
    files.directory.mkdir()
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake"
    fake.write_text(f'#!/bin/bash\necho "$0 $*" >>{log}\n')
    fake.chmod(0o755)
    hook = render.render_notify_hook("r1", files, str(fake), [str(fake)], 5, 60,
                                     commits=False, forgets=True)
    result = subprocess.run(["bash", "-c", hook, "notify.sh", "INSTANCE", "VR_7",
                             state, "100"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    forget_calls = [call for call in calls if call.endswith("-f internal")]
    assert len(forget_calls) == int(forgets), calls
    assert calls[-1].startswith(f"{fake} notify --arrived ")
    assert ("--hook-step forget-own-entries," in calls[-1]) is forgets


def test_hook_without_guard_never_touches_nftables(state_path):
    hook = render_hook(statedir.RouterFiles.under(state_path, "r1"))
    assert "nsenter" not in hook
    assert "nft" not in hook
    assert "lift-guard" not in hook


def test_hook_with_guard_lifts_it_right_after_the_commit_on_master_only(state_path):
    files = statedir.RouterFiles.under(state_path, "r1")
    lines = [line.strip() for line in
             render_hook(files, guard_namespace="qrouter-r1").splitlines()]
    lift = f"nsenter --net=/run/netns/qrouter-r1 nft -f {files.guard_lift} >/dev/null 2>&1"
    assert lines.count(lift) == 1
    master = lines.index('if [ "${3:-${1:-}}" = MASTER ]; then')
    commit = next(number for number, line in enumerate(lines)
                  if line.endswith(f"-C {files.conntrackd_config} -c >/dev/null 2>&1"))
    commit_step = lines.index('hook_steps+=(--hook-step "commit,$started,$EPOCHREALTIME,'
                              '$status,$log_offset")')
    lift_step = lines.index('hook_steps+=(--hook-step "lift-guard,$started,'
                            '$EPOCHREALTIME,$status")')
    end_of_master = lines.index("fi", master)
    assert master < commit < commit_step < lines.index(lift) < lift_step < end_of_master
    # the lift is timed on its own, not from the start of the commit
    assert lines[commit_step + 1] == "started=$EPOCHREALTIME"
    assert "guard_raise" not in "\n".join(lines)
    assert str(files.guard_raise) not in "\n".join(lines)


def test_cold_hook_records_the_log_offset_right_before_the_commit(state_path):
    """The commit's block is what conntrackd.log gains after the offset."""
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render_hook(files, guard_namespace="qrouter-r1")
    subprocess.run(["bash", "-n"], input=hook, text=True, check=True)
    lines = [line.strip() for line in hook.splitlines()]
    offset = lines.index(f"log_offset=$(stat -c %s {files.log_file} 2>/dev/null "
                         "|| echo 0)")
    commit = next(number for number, line in enumerate(lines)
                  if line.endswith(f"-C {files.conntrackd_config} -c >/dev/null 2>&1"))
    assert offset < commit
    assert lines[offset + 1:commit] == ["started=$EPOCHREALTIME"]
    assert lines[commit + 2] == ('hook_steps+=(--hook-step "commit,$started,'
                                 '$EPOCHREALTIME,$status,$log_offset")')
    assert hook.count("stat -c") == 1


def test_warm_hook_keeps_the_forget_step_to_four_fields(state_path):
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render.render_notify_hook("r1", files, "conntrackd", ["snat-sync"], 5, 60,
                                     commits=False, forgets=True)
    assert "log_offset" not in hook and "stat -c" not in hook
    assert ('hook_steps+=(--hook-step "forget-own-entries,$started,$EPOCHREALTIME,'
            '$status")') in hook


def test_hook_quotes_the_guard_namespace_path(state_path):
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render_hook(files, guard_namespace="qrouter-$(reboot)")
    assert "--net='/run/netns/qrouter-$(reboot)'" in hook


@pytest.mark.parametrize("path", ["/var/lib/snat sync", "/tmp/a\tb", "/tmp/a{b",
                                  "/tmp/a}b", '/tmp/a"b', "/tmp/a#b", "/tmp/a;b"])
def test_check_state_path_rejects_what_conntrackd_cannot_parse(path):
    with pytest.raises(InvalidInput) as caught:
        statedir.check_state_path(path)
    assert caught.value.field == "state path"
    assert repr(path) in str(caught.value)


def test_check_state_path_accepts_an_ordinary_path(tmp_path):
    statedir.check_state_path(tmp_path / "state")
    statedir.check_state_path("/var/lib/snat-sync")


SPECIAL = "st$te'(x)&`y`!"


def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def hook_setup(tmp_path):
    """A hook rendered for a state path full of shell characters, with a fake
    conntrackd and a fake snat-sync that record their arguments.

    The hook sets its own PATH, so only what it names by an absolute path (the
    conntrackd binary) can be faked; nsenter cannot, so the hook that runs here has
    no guard unless a test renders one itself.
    """
    state = tmp_path / SPECIAL
    # Built directly: the state path checks may refuse such a path, but the hook
    # must quote whatever path it is given.
    files = statedir.RouterFiles(state / "routers" / "r1")
    files.directory.mkdir(parents=True)
    conntrackd_calls = tmp_path / "conntrackd-calls"
    fake_conntrackd = write_executable(
        tmp_path / "fake conntrackd$1",
        f"#!/bin/bash\nprintf '%s\\n' \"$@\" >> '{conntrackd_calls}'\n"
        "exit ${FAKE_CONNTRACKD_STATUS:-0}\n")
    fake_snat_sync = write_executable(
        tmp_path / "fake snat-sync", "#!/bin/bash\nprintf '%s\\0' \"$0\" \"$@\"\n")
    command = [str(fake_snat_sync), "--state-path", str(state)]
    hook = write_executable(files.notify_hook,
                            render_hook(files, str(fake_conntrackd), command))
    return files, hook, conntrackd_calls, command


def run_hook(hook, *arguments, env=None):
    environment = dict(os.environ, **(env or {}))
    subprocess.run([str(hook), *arguments], check=True, timeout=10, env=environment)


def hook_handover(files):
    """The arguments the hook passed to snat-sync (what it wrote to notify.log)."""
    return files.notify_log.read_text().split("\0")[:-1]


def hook_steps(rest):
    """The --hook-step values among the arguments after --arrived T."""
    steps = []
    index = 3
    while rest[index] == "--hook-step":
        steps.append(failover.HookStep.parse(rest[index + 1]))
        index += 2
    return steps, rest[index:]


@pytest.mark.skipif(not shutil.which("flock") or not shutil.which("timeout"),
                    reason="needs util-linux flock and coreutils timeout")
class TestHookRuns:
    def test_backup_hands_over_without_committing(self, hook_setup):
        files, hook, conntrackd_calls, command = hook_setup
        run_hook(hook, "INSTANCE", "VR_7", "BACKUP", "100")
        arguments = hook_handover(files)
        assert arguments[:len(command)] == command
        rest = arguments[len(command):]
        assert rest[:2] == ["notify", "--arrived"]
        float(rest[2])
        assert rest[3:] == ["r1", "INSTANCE", "VR_7", "BACKUP", "100"]
        assert not conntrackd_calls.exists()

    def test_master_commits_first_and_reports_it(self, hook_setup):
        files, hook, conntrackd_calls, command = hook_setup
        run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100",
                 env={"FAKE_CONNTRACKD_STATUS": "3"})
        assert conntrackd_calls.read_text().splitlines() == [
            "-C", str(files.conntrackd_config), "-c"]
        rest = hook_handover(files)[len(command):]
        assert rest[0:2] == ["notify", "--arrived"]
        arrived = float(rest[2])
        steps, after = hook_steps(rest)
        assert [step.name for step in steps] == ["commit"]
        assert arrived <= steps[0].started <= steps[0].finished
        assert steps[0].exit_status == 3
        assert steps[0].log_offset == 0  # no conntrackd.log yet
        assert after == ["r1", "INSTANCE", "VR_7", "MASTER", "100"]

    def test_master_reports_the_log_size_before_its_commit(self, tmp_path,
                                                          hook_setup):
        files, _hook, _conntrackd_calls, command = hook_setup
        files.log_file.write_text("x" * 1234)
        # a conntrackd that logs: the offset is the size before it ran
        fake_conntrackd = write_executable(
            tmp_path / "logging conntrackd",
            f"#!/bin/bash\necho committed >> {shlex.quote(str(files.log_file))}\n")
        hook = write_executable(files.notify_hook, render_hook(
            files, str(fake_conntrackd), command))
        run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100")
        steps, _after = hook_steps(hook_handover(files)[len(command):])
        assert [(step.name, step.log_offset) for step in steps] == [("commit", 1234)]
        assert files.log_file.stat().st_size > 1234

    def test_master_records_its_arrival_for_later_transitions(self, hook_setup):
        files, hook, _conntrackd_calls, command = hook_setup
        run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100")
        arrived = float(hook_handover(files)[len(command) + 2])
        assert statedir.read_latest_arrival(files.latest_arrival) == \
            statedir.LatestArrival(arrived)

    @pytest.mark.parametrize("latest, commits", [
        ("9999999999.000000", False),  # a newer transition has run
        ("9999999999.000000 already-done", False),
        ("1000000000.000000", True),
        ("garbage", True),
    ])
    def test_master_older_than_the_newest_transition_commits_nothing(
            self, hook_setup, latest, commits):
        files, hook, conntrackd_calls, command = hook_setup
        files.latest_arrival.write_text(latest + "\n")
        run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100")
        steps, _after = hook_steps(hook_handover(files)[len(command):])
        assert conntrackd_calls.exists() is commits
        assert [step.name for step in steps] == (["commit"] if commits else [])
        if not commits:
            assert files.latest_arrival.read_text() == latest + "\n"

    def test_master_waits_for_the_transition_lock(self, tmp_path, hook_setup):
        files, _hook, conntrackd_calls, command = hook_setup
        fake_conntrackd = tmp_path / "fake conntrackd$1"
        hook = write_executable(files.notify_hook, render_hook(
            files, str(fake_conntrackd), command, lock_timeout=0))
        with failover.transition_lock(files.transition_lock, 5):
            run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100")
        rest = hook_handover(files)[len(command):]
        steps, _after = hook_steps(rest)
        assert [(step.name, step.exit_status) for step in steps] == [("commit", 1)]
        assert not conntrackd_calls.exists()

    @pytest.mark.skipif(not any(os.access(f"{directory}/nsenter", os.X_OK)
                                for directory in ("/usr/sbin", "/usr/bin", "/sbin",
                                                  "/bin")),
                        reason="needs nsenter in the hook's PATH")
    def test_master_with_guard_reports_the_lift_after_the_commit(self, tmp_path,
                                                                 hook_setup):
        """The real nsenter runs, for a namespace that does not exist: it fails
        without touching anything, and the hook must report that as the
        lift-guard step, after the commit, without failing itself."""
        files, _hook, conntrackd_calls, command = hook_setup
        namespace = f"snat-sync-test-absent-{os.getpid()}"
        assert not os.path.exists(f"/run/netns/{namespace}")
        hook = write_executable(files.notify_hook, render_hook(
            files, str(tmp_path / "fake conntrackd$1"), command,
            guard_namespace=namespace))
        run_hook(hook, "INSTANCE", "VR_7", "MASTER", "100")
        assert conntrackd_calls.read_text().splitlines() == [
            "-C", str(files.conntrackd_config), "-c"]
        rest = hook_handover(files)[len(command):]
        steps, after = hook_steps(rest)
        assert [step.name for step in steps] == ["commit", "lift-guard"]
        commit, lift = steps
        assert commit.exit_status == 0
        assert lift.exit_status != 0
        assert commit.finished <= lift.started <= lift.finished
        assert after == ["r1", "INSTANCE", "VR_7", "MASTER", "100"]

    def test_backup_with_guard_hands_over_without_any_step(self, tmp_path,
                                                          hook_setup):
        files, _hook, conntrackd_calls, command = hook_setup
        hook = write_executable(files.notify_hook, render_hook(
            files, str(tmp_path / "fake conntrackd$1"), command,
            guard_namespace="qrouter-r1"))
        run_hook(hook, "INSTANCE", "VR_7", "BACKUP", "100")
        rest = hook_handover(files)[len(command):]
        assert rest[3:] == ["r1", "INSTANCE", "VR_7", "BACKUP", "100"]
        assert not conntrackd_calls.exists()


# -- the reset-window guard ---------------------------------------------------------


def rules(text):
    """The ruleset without comments and blank lines."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_guard_raise_drops_what_conntrack_cannot_place():
    spec = make_spec()
    raise_text, _lift = render.render_guard(spec, "snat_sync_guard")
    lines = rules(raise_text)
    assert lines[:2] == ["add table inet snat_sync_guard",
                         "delete table inet snat_sync_guard"]
    assert "table inet snat_sync_guard {" in lines
    assert 'iifname { "lo", "ha-1a2b3c4d-5e" } accept' in lines
    assert "ct state { new, invalid } counter drop" in lines
    assert lines.index('iifname { "lo", "ha-1a2b3c4d-5e" } accept') < lines.index(
        "ct state { new, invalid } counter drop")
    assert "reject" not in raise_text
    assert any(line.startswith("type filter hook prerouting") for line in lines)
    assert raise_text.count("{") == raise_text.count("}")
    assert "r1" in raise_text


def test_guard_lift_only_removes_the_table():
    lift_text = render.render_guard(make_spec(), "snat_sync_guard")[1]
    assert rules(lift_text) == ["add table inet snat_sync_guard",
                                "delete table inet snat_sync_guard"]


def test_guard_uses_the_table_and_interface_it_is_given():
    spec = RouterSpec.create("r2", "qrouter-r2", "ha-99999999-00", "169.254.192.1",
                             ["169.254.192.2"], 8)
    raise_text, lift_text = render.render_guard(spec, "other_table")
    assert rules(raise_text)[:2] == rules(lift_text) == [
        "add table inet other_table", "delete table inet other_table"]
    assert '"ha-99999999-00"' in raise_text
    assert "ha-1a2b3c4d-5e" not in raise_text
    assert "snat_sync_guard" not in raise_text + lift_text


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft")
                    or not shutil.which("unshare"),
                    reason="needs root, nft and unshare")
def test_guard_rulesets_load_in_any_order_in_a_throwaway_namespace(tmp_path):
    """Raise twice, lift twice, in a network namespace that dies with the shell."""
    raise_text, lift_text = render.render_guard(make_spec(), "snat_sync_guard")
    raise_file = tmp_path / "guard-raise.nft"
    lift_file = tmp_path / "guard-lift.nft"
    raise_file.write_text(raise_text)
    lift_file.write_text(lift_text)
    script = (f"set -e; nft -f {lift_file}; nft -f {raise_file}; nft -f {raise_file}; "
              "nft list table inet snat_sync_guard; echo ---; "
              f"nft -f {lift_file}; nft -f {lift_file}; nft list ruleset")
    result = subprocess.run(["unshare", "--net", "sh", "-c", script],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    while_up, after_lift = result.stdout.split("---\n")
    assert while_up.count("chain prerouting") == 1  # raised twice, present once
    assert "ha-1a2b3c4d-5e" in while_up
    assert "snat_sync_guard" not in after_lift


# -- keepalived snippet and the command line the hook uses ------------------------


def test_keepalived_snippet_names_the_hook(spec, state_path):
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    snippet = render.render_keepalived_snippet(spec, str(files.notify_hook))
    assert "vrrp_instance VR_7 {" in snippet
    assert f'notify "{files.notify_hook}"' in snippet
    assert "enable_script_security" in snippet
    assert snippet.count("{") == snippet.count("}")


def test_snat_sync_command_uses_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = render.snat_sync_command(["a.conf"], ["conf.d"], "state")
    assert command[1:3] == ["-m", "snat_sync"]
    assert command[3:] == [
        "--config-file", str(tmp_path / "a.conf"),
        "--config-dir", str(tmp_path / "conf.d"),
        "--state-path", str(tmp_path / "state"),
    ]


def test_a_warm_backup_injects_what_it_receives_and_a_primary_does_not(conf):
    """A primary's table is the live one: what a peer sends (only a node that was
    primary at the same time sends anything) stays in its external cache."""
    backup = parse_blocks(render_config(conf, make_spec(), role=Role.BACKUP)[0])
    primary = parse_blocks(render_config(conf, make_spec(), role=Role.PRIMARY)[0])
    assert "DisableExternalCache On" in backup["Sync"]["Mode FTFW"]["_lines"]
    assert "DisableExternalCache Off" in primary["Sync"]["Mode FTFW"]["_lines"]


def test_with_backups_that_read_events_both_roles_inject(make_conf, write_config):
    conf = make_conf(write_config("[failover]\nbackup_reads_events = true\n"))
    for role in (Role.PRIMARY, Role.BACKUP):
        sync = parse_blocks(render_config(conf, make_spec(), role=role)[0])["Sync"]
        assert "DisableExternalCache On" in sync["Mode FTFW"]["_lines"], role


def test_the_old_inject_option_is_refused_by_name(make_conf, write_config):
    """Warm standby replaced it; a config that still sets it must not silently run
    something else."""
    with pytest.raises(InvalidInput, match="inject_replicated_entries"):
        make_conf(write_config("[conntrackd]\ninject_replicated_entries = true\n"))


@pytest.mark.parametrize("interval, first_tick, last_tick", [
    (1, "00:00:01", "00:02:08"), (4, "00:00:04", "00:08:32"),
    (64, "00:01:04", "02:16:32")])
def test_refresh_copies_the_tick_number_into_eight_bits_of_the_mark(
        interval, first_tick, last_tick):
    text = render.render_refresh(make_spec(), "snat_sync_refresh",
                                 render.RefreshSettings(interval, 8))
    rules = [line.strip() for line in text.splitlines() if "meta hour" in line]
    assert len(rules) == 2 * render.REFRESH_COUNTER_BITS
    assert rules[:2] == [
        f'meta hour & "{first_tick}" == "00:00:00" ct mark set ct mark & 0xfffffeff',
        f'meta hour & "{first_tick}" != "00:00:00" ct mark set ct mark | 0x00000100',
    ]
    assert rules[-2:] == [
        f'meta hour & "{last_tick}" == "00:00:00" ct mark set ct mark & 0xffff7fff',
        f'meta hour & "{last_tick}" != "00:00:00" ct mark set ct mark | 0x00008000',
    ]
    assert 'iifname { "lo", "ha-1a2b3c4d-5e" } accept' in text
    assert text.index("delete table inet snat_sync_refresh") < text.index(
        "table inet snat_sync_refresh {")


def test_the_refresh_counter_changes_in_every_tick_of_its_cycle():
    """Regression: one flipped bit let every packet an even number of ticks after
    the last one through unreported (a keepalive every 8 s at 4-s ticks)."""
    settings = render.RefreshSettings(4, 8)

    def mark(seconds_of_day):
        value = 0
        for bit in settings.counter:
            hours, minutes, seconds = map(int, bit.tick.split(":"))
            if seconds_of_day & (hours * 3600 + minutes * 60 + seconds):
                value |= bit.mark
        return value

    start = 7 * 3600 + 3
    marks = [mark(start + 4 * ticks) for ticks in range(257)]
    assert len(set(marks[:256])) == 256 and marks[256] == marks[0]


@pytest.mark.parametrize("bit, first, last", [(0, "0x00000001", "0x00000080"),
                                              (24, "0x01000000", "0x80000000")])
def test_refresh_uses_the_eight_bits_from_the_configured_one(bit, first, last):
    text = render.render_refresh(make_spec(), "t", render.RefreshSettings(8, bit))
    marks = {int(word, 16) for line in text.splitlines() if "ct mark |" in line
             for word in [line.split("|")[1].strip()]}
    assert marks == {1 << (bit + index) for index in range(8)}
    assert f"ct mark | {first}" in text and f"ct mark | {last}" in text


def test_refresh_off_or_cold_standby_only_removes_the_table(make_conf, write_config):
    for config in ("[failover]\nrefresh_interval = 0\n",
                   "[failover]\nstandby_mode = cold\n"):
        settings = render.refresh_settings(make_conf(write_config(config)).failover)
        text = render.render_refresh(make_spec(), "t", settings)
        assert not settings.enabled
        assert [line for line in text.splitlines() if not line.startswith("#")] == [
            "add table inet t", "delete table inet t"]


def test_refresh_interval_must_be_a_power_of_two(make_conf, write_config):
    with pytest.raises(InvalidInput, match="refresh_interval"):
        make_conf(write_config("[failover]\nrefresh_interval = 5\n"))


def test_hook_with_injected_entries_commits_nothing(state_path):
    files = statedir.RouterFiles.under(state_path, "r1")
    hook = render.render_notify_hook("r1", files, "/usr/sbin/conntrackd",
                                     ["python3", "-m", "snat_sync"], 120, 60,
                                     guard_namespace=None, commits=False)
    assert " -c" not in hook and "--hook-step" not in hook.split("hook_steps=()")[1]
    result = subprocess.run(["bash", "-n"], input=hook, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
