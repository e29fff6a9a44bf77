"""Liberal TCP window tracking in the router namespaces (snat_sync.tcp_tracking)."""

import subprocess

import pytest

from snat_sync import tcp_tracking


def test_liberal_tracking_is_on_by_default(conf):
    assert tcp_tracking.settings(conf.failover) == {
        "net.netfilter.nf_conntrack_tcp_be_liberal": "1"}


def test_turned_off_it_leaves_the_kernel_setting_alone(make_conf, write_config):
    conf = make_conf(write_config("[failover]\nliberal_tcp_tracking = false\n"))
    assert tcp_tracking.settings(conf.failover) == {}


def test_apply_runs_sysctl_inside_the_namespace(monkeypatch):
    commands = []

    def run(command, **_):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    tcp_tracking.apply("qrouter-r1", {tcp_tracking.BE_LIBERAL: "1"})
    tcp_tracking.apply("qrouter-r1", {})
    assert commands == [["nsenter", "--net=/run/netns/qrouter-r1", "sysctl", "-q",
                         "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=1"]]


def test_a_failed_sysctl_says_where(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda command, **_:
                        subprocess.CompletedProcess(command, 255, "",
                                                    "permission denied\n"))
    with pytest.raises(tcp_tracking.TcpTrackingError,
                       match="qrouter-r1: permission denied"):
        tcp_tracking.apply("qrouter-r1", {tcp_tracking.BE_LIBERAL: "1"})
