"""The pure parts of snat_sync.lab.topology and snat_sync.lab.demo (no root, no namespaces)."""

import dataclasses

import pytest

from snat_sync.lab import demo
from snat_sync.lab import flows
from snat_sync.lab import rolling
from snat_sync.lab import topology as lab


def fake_lab(prefix="ss-a1b2c3"):
    tag = prefix.rsplit("-", 1)[-1]
    routers = tuple(
        lab.Router(
            name, f"{prefix}-{name}", *lab.router_legs(tag, name), local, peer, priority
        )
        for name, local, peer, priority in (
            ("r1", *lab.HA_ADDRESSES, 150),
            ("r2", *reversed(lab.HA_ADDRESSES), 100),
        )
    )
    return lab.Lab(prefix, tag, "/nonexistent", f"router-{tag}", 7, f"{prefix}-sw",
                   f"{prefix}-client", f"{prefix}-server", routers)


def test_interface_names_fit_ifnamsiz():
    for name in ("r1", "r2"):
        for leg in lab.router_legs("ffffff", name):
            assert len(leg.device.encode()) <= 15
            assert len(leg.switch_port.encode()) <= 15
    with pytest.raises(ValueError):
        lab.check_interface_name("qr-0123456789abc")


def test_prefixes_are_unique_and_short():
    prefixes = {lab.new_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    assert all(prefix.startswith("ss-") and len(prefix) == 9 for prefix in prefixes)


def test_qr_and_qg_share_a_mac_across_routers_but_not_with_each_other():
    assert lab.port_mac("a1b2c3", 1) != lab.port_mac("a1b2c3", 2)
    assert lab.port_mac("a1b2c3", 1).startswith("fa:16:3e:")
    r1, r2 = (lab.router_legs("a1b2c3", name) for name in ("r1", "r2"))
    assert r1[0].device == r2[0].device and r1[2].device == r2[2].device
    assert r1[1].device != r2[1].device


def test_keepalived_config():
    built = fake_lab()
    r1 = built.routers[0]

    text = lab.keepalived_config(built, r1, notify_command="/state/notify.sh")

    assert "enable_script_security" in text and "script_user root" in text
    assert "virtual_router_id 7" in text and "priority 150" in text
    assert "advert_int 1" in text and "nopreempt" in text
    assert "unicast_src_ip 169.254.192.1" in text
    assert "        169.254.192.2\n" in text
    assert f"192.168.100.1/24 dev {r1.internal.device}" in text
    assert f"203.0.113.10/24 dev {r1.external.device}" in text
    assert '    notify "/state/notify.sh"' in text
    assert text.count("{") == text.count("}")
    assert "notify" not in lab.keepalived_config(built, r1)
    with pytest.raises(ValueError):
        lab.keepalived_config(built, r1, notify_command='x "y"')


def test_the_lab_routers_of_a_pair_are_r1_and_r2_as_ever():
    r1, r2 = lab.lab_routers("ss-a1b2c3", "a1b2c3")
    assert (r1.name, r1.ha_address, r1.peer_ha_address, r1.priority) == (
        "r1", "169.254.192.1", "169.254.192.2", 150)
    assert (r2.name, r2.ha_address, r2.peer_ha_address, r2.priority) == (
        "r2", "169.254.192.2", "169.254.192.1", 100)
    assert r1.peer_ha_addresses == ("169.254.192.2",)
    assert r2.peer_ha_addresses == ("169.254.192.1",)
    assert fake_lab().routers[0].peer_ha_addresses == ("169.254.192.2",)


def test_three_lab_routers_each_list_the_two_others():
    routers = lab.lab_routers("ss-a1b2c3", "a1b2c3", lab.NODE_HA_ADDRESSES)
    assert [(router.name, router.namespace, router.ha_address, router.priority)
            for router in routers] == [
        ("r1", "ss-a1b2c3-r1", "169.254.192.1", 150),
        ("r2", "ss-a1b2c3-r2", "169.254.192.2", 100),
        ("r3", "ss-a1b2c3-r3", "169.254.192.3", 50)]
    assert [router.peer_ha_addresses for router in routers] == [
        ("169.254.192.2", "169.254.192.3"), ("169.254.192.1", "169.254.192.3"),
        ("169.254.192.1", "169.254.192.2")]
    assert all(router.peer_ha_address == router.peer_ha_addresses[0]
               for router in routers)
    assert routers[2].ha.device == "ha-a1b2c3-r3"
    with pytest.raises(ValueError):
        lab.lab_routers("ss-a1b2c3", "a1b2c3", lab.NODE_HA_ADDRESSES[:1])
    with pytest.raises(ValueError):
        lab.Router("r1", "x", *lab.router_legs("a", "r1"), "169.254.192.1",
                   "169.254.192.2", 1, peer_ha_addresses=("169.254.192.3",))


def test_keepalived_config_lists_every_peer():
    built = fake_lab()
    built.routers = lab.lab_routers("ss-a1b2c3", "a1b2c3", lab.NODE_HA_ADDRESSES)
    text = lab.keepalived_config(built, built.routers[1])
    assert ("    unicast_src_ip 169.254.192.2\n    unicast_peer {\n"
            "        169.254.192.1\n        169.254.192.3\n    }\n") in text
    assert "priority 100" in text


def test_keepalived_config_preempting_with_extra_lines():
    built = fake_lab()
    r1 = built.routers[0]
    r1.preempt = True
    r1.keepalived_global_lines = ("track_file t {", '    file "/x"', "}")
    r1.keepalived_instance_lines = ("    track_file {", "        t", "    }")
    text = lab.keepalived_config(built, r1, notify_command="/state/notify.sh")
    assert "nopreempt" not in text
    assert text.index('}\ntrack_file t {\n    file "/x"\n}\nvrrp_instance') > 0
    assert '    notify "/state/notify.sh"\n    track_file {\n        t\n    }\n}\n' in text


LISTED = (
    "tcp      6 297 ESTABLISHED src=192.168.100.12 dst=203.0.113.100 sport=40001 "
    "dport=9000 src=203.0.113.100 dst=203.0.113.10 sport=9000 dport=52001 [ASSURED] "
    "mark=0 use=1"
)
CACHED = (
    "tcp      6 ESTABLISHED src=192.168.100.12 dst=203.0.113.100 sport=40001 "
    "dport=9000 [ASSURED] mark=0 [active since 2s]"
)


def test_conntrack_tuples():
    original, reply = lab.conntrack_tuples(LISTED)
    assert original == {"src": "192.168.100.12", "dst": "203.0.113.100",
                        "sport": "40001", "dport": "9000"}
    assert reply == {"src": "203.0.113.100", "dst": "203.0.113.10",
                     "sport": "9000", "dport": "52001"}


def test_snat_entry_matching():
    entry = lab.SnatEntry("tcp", "192.168.100.12", 40001, 52001)
    assert entry.matches(LISTED)
    assert entry.matches_original(CACHED) and not entry.matches(CACHED)
    assert not lab.SnatEntry("tcp", "192.168.100.12", 40001, 52002).matches(LISTED)
    udp = lab.SnatEntry("udp", "192.168.100.12", 40001, 52001)
    assert not udp.matches_original(LISTED)
    arguments = entry.insert_arguments()
    assert arguments[:4] == ["conntrack", "-I", "-p", "tcp"]
    assert "203.0.113.10:52001" in arguments and "ESTABLISHED" in arguments


def scenario(name, tcp_alive, udp_same, with_snat_sync):
    summary = flows.TrafficSummary(16, tcp_alive, 16, 16, udp_same, udp_same == 16,
                                   3450.0 if tcp_alive else 0.0, 3100.0)
    transition = {"role": "primary", "outcome": "done",
                  "steps": [{"name": "commit", "duration_ms": 4.6}],
                  "commit": {"committed": 32, "failed": 0}}
    status = {"last_transition": transition} if with_snat_sync else None
    return demo.ScenarioResult(name, with_snat_sync, (), summary, 3.2, status)


def test_table_and_transition_line():
    results = [scenario("keepalived only", 0, 0, False),
               scenario("with snat-sync", 16, 16, True)]

    lines = demo.format_table(results).splitlines()

    assert len(lines) == 3
    assert lines[1].split()[2:4] == ["0/16", "0/16"]
    assert "-" in lines[1] and "3.45 s / 3.10 s" in lines[2]
    assert demo.describe_transition(results[0]) is None
    assert demo.describe_transition(results[1]) == (
        "r2 primary transition done: commit 4.6 ms; committed 32 entries, 0 failed"
    )


# -- the sandbox config every lab call of the CLI gets ---------------------------------


def test_the_sandbox_keeps_the_host_config_out(tmp_path, monkeypatch):
    """Parsed as the CLI parses it: the sandbox file and directory replace the
    default files (/etc/snat-sync/snat-sync.conf, ~/.snat-sync/...) and the
    default directories (...conf.d), both faked here with a port of 9787."""
    from oslo_config import cfg

    from snat_sync import cli
    from snat_sync import options

    host = tmp_path / "host"
    (host / "snat-sync.conf.d").mkdir(parents=True)
    for path in (host / "snat-sync.conf", host / "snat-sync.conf.d" / "x.conf"):
        path.write_text("[metrics]\nlisten_port = 9787\n")
    monkeypatch.setattr(cfg, "find_config_dirs",
                        lambda *args, **kwargs: [str(host / "snat-sync.conf.d")])
    state = tmp_path / "r1"
    argv = lab.snat_sync_argv(state, "status", "--json")
    assert argv[:3] == [lab.sys.executable, "-m", "snat_sync"]

    def parsed(arguments):
        conf = cli.build_conf()
        options.load(conf, arguments,
                     default_config_files=[str(host / "snat-sync.conf")])
        return conf

    assert parsed(["--state-path", str(state), "status"]).metrics.listen_port == 9787
    conf = parsed(argv[3:])
    assert conf.metrics.listen_port == 0
    assert conf.config_file == [str(tmp_path / "r1.sandbox.conf")]
    assert conf.config_dir == [str(tmp_path / "r1.sandbox.conf.d")]
    assert not list((tmp_path / "r1.sandbox.conf.d").iterdir())
    assert not state.exists()  # the sandbox lives beside the state path


def test_the_sandbox_leaves_a_callers_config_alone(tmp_path):
    own = tmp_path / "own.conf"
    argv = lab.snat_sync_argv(tmp_path / "r1", "--config-file", own, "router", "add")
    assert [str(a) for a in argv].count("--config-file") == 1
    assert str(own) in map(str, argv)
    assert "--config-dir" in argv  # the default directories stay out all the same
    argv = lab.snat_sync_argv(tmp_path / "r1", f"--config-dir={tmp_path}", "status")
    assert "--config-dir" not in argv and "--config-file" in argv


def test_dead_before_failure_names_the_flows_silent_before_the_crash():
    def flow(flow_id, times):
        return flows.FlowResult(flow_id, "udp", "192.168.100.11:40001", False, 0.0,
                                0.0, (), None, tuple(times))

    result = demo.ScenarioResult(
        "keepalived only", False,
        (flow("udp-00", [1.0, 2.8]), flow("udp-01", []), flow("udp-02", [0.5])),
        None, 3.0, None, failure_at=3.0)
    assert [each.flow_id for each in result.dead_before_failure()] == [
        "udp-01", "udp-02"]


def test_link_local_is_the_macs_eui64():
    assert lab.link_local("fa:16:3e:42:3a:02") == "fe80::f816:3eff:fe42:3a02"


def test_the_dual_stack_variant_puts_its_vips_in_the_excluded_block():
    built = fake_lab()
    built.variant = lab.Variant(routed_ipv4=True, ipv6=True)
    r1 = built.routers[0]
    text = lab.keepalived_config(built, r1)
    excluded = text.split("virtual_ipaddress_excluded {\n", 1)[1].split("    }", 1)[0]
    assert f"192.168.101.1/24 dev {r1.internal.device}" in excluded
    assert f"2001:db8:100::1/64 dev {r1.internal.device}" in excluded
    assert f"2001:db8:203::10/64 dev {r1.external.device}" in excluded
    mac = lab.port_mac(built.tag, 2)
    assert f"{lab.link_local(mac)}/64 dev {r1.external.device} scope link" in excluded
    assert text.count("{") == text.count("}")
    assert "virtual_ipaddress_excluded" not in lab.keepalived_config(fake_lab(), r1)


def test_the_firewall_accepts_new_connections_from_inside_only():
    r1 = fake_lab().routers[0]
    rules = lab.firewall_rules(r1)
    assert "policy drop;" in rules and "ct state invalid drop" in rules
    assert "ct state established,related accept" in rules
    assert (f'iifname "{r1.internal.device}" oifname "{r1.external.device}" '
            "ct state new accept") in rules


def test_a_flow_is_alive_after_a_failover_if_it_answered_before_the_next():
    def flow(flow_id, protocol, replies, endpoints=("203.0.113.10:40001",),
             alive=True):
        return flows.FlowResult(flow_id, protocol, "192.168.100.11:40001", alive,
                                0.0, 0.0, endpoints, None, tuple(replies))

    started = 1000.0
    failovers = [rolling.Failover("r1", "r2", started + 10, 3.0),
                 rolling.Failover("r2", "r3", started + 20, 3.0)]
    steady = [at / 10 for at in range(0, 300)]
    observed = rolling.Observed([
        flow("tcp-00", "tcp", steady),
        # silent from the first failover to the second: lost after the first
        flow("tcp-01", "tcp", [at for at in steady if not 10 <= at < 25]),
        flow("udp-00", "udp", steady, ("203.0.113.10:40001", "203.0.113.10:1024")),
        flow("udp-01", "udp", steady[:250], alive=False),  # dead at the end
    ], started, failovers, 40.0)
    assert observed.failure_moments() == [10.0, 20.0]
    assert observed.lost_after(0) == ["tcp-01", "udp-00"]
    assert observed.lost_after(1) == ["udp-00", "udp-01"]
    assert observed.alive_counts() == [(1, 1), (2, 0)]


def test_tables_agree_only_without_difference_stale_entry_or_mark():
    agreeing = rolling.Failover("r1", "r2", 0.0, 3.0, differences={"r1": (0, 0)},
                                stale_left={"r1": []}, marked_left={"r1": 0})
    assert agreeing.tables_agree
    for change in ({"differences": {"r1": (1, 0)}}, {"stale_left": {"r1": [0]}},
                   {"marked_left": {"r1": 25}}):
        assert not dataclasses.replace(agreeing, **change).tables_agree
