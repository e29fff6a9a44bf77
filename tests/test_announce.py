"""Gratuitous ARPs for a survivor's addresses (snat_sync.announce)."""

import ipaddress
import pathlib
import subprocess
import sys

import pytest

from snat_sync import announce, failover, repair

NSENTER = ["nsenter", "--net=/run/netns/qrouter-r1"]
ADDRESSES = [
    ("lo", "127.0.0.1", "host"),
    ("ha-1", "169.254.192.1", "global"),
    ("ha-1", "169.254.0.1", "global"),
    ("qg-1", "198.18.0.1", "global"),
    ("qg-1", "2001:db8::1", "global"),
    ("qr-1", "fe80::1", "link"),
    ("qr-1", "10.0.0.1", "global"),
    ("qr-1", "10.0.0.1", "global"),
]


def test_every_global_address_is_announced_once_on_its_port():
    chosen = announce.announcements(ADDRESSES)
    assert [(each.device, str(each.address)) for each in chosen] == [
        ("ha-1", "169.254.192.1"), ("ha-1", "169.254.0.1"), ("qg-1", "198.18.0.1"),
        ("qg-1", "2001:db8::1"), ("qr-1", "10.0.0.1")]


def test_an_ipv6_only_port_is_announced_by_a_neighbour_advertisement():
    chosen = announce.announcements([("qr-6", "2001:db8:1::1", "global"),
                                     ("qr-6", "fe80::1", "link"),
                                     ("lo", "::1", "host")])
    assert chosen == (announce.Announcement(
        "qr-6", ipaddress.ip_address("2001:db8:1::1")),)
    assert chosen[0].command() == [
        sys.executable, "-m", "snat_sync.neighbour_advertisement", "qr-6",
        "2001:db8:1::1"]
    assert chosen[0].sender == "neighbour advertisement"


def test_a_namespace_with_only_local_addresses_announces_nothing():
    assert announce.announcements([("qr-1", "fe80::1", "link"),
                                   ("lo", "127.0.0.1", "host"),
                                   ("lo", "::1", "host")]) == ()


def test_the_advertisement_sender_finds_this_package_installed_or_not():
    package_parent = pathlib.Path(announce.__file__).resolve().parent.parent
    assert announce.ENVIRONMENT["PYTHONPATH"] == str(package_parent)
    assert (package_parent / "snat_sync" / "neighbour_advertisement.py").is_file()


def test_the_arpings_run_inside_the_namespace(fp):
    chosen = (announce.Announcement("qg-1", ipaddress.ip_address("198.18.0.1")),
              announce.Announcement("qr-1", ipaddress.ip_address("10.0.0.1")))
    for each in chosen:
        fp.register([*NSENTER, "arping", "-q", "-U", "-c", "1", "-I", each.device,
                     str(each.address)])
    announce.send("qrouter-r1", chosen, timeout=5)
    assert fp.call_count([*NSENTER, "arping", fp.any()]) == 2


def test_ipv4_and_ipv6_addresses_are_announced_side_by_side(fp):
    chosen = announce.announcements([("qg-1", "198.18.0.1", "global"),
                                     ("qg-1", "2001:db8::1", "global")])
    fp.register([*NSENTER, "arping", "-q", "-U", "-c", "1", "-I", "qg-1",
                 "198.18.0.1"])
    fp.register([*NSENTER, sys.executable, "-m", "snat_sync.neighbour_advertisement",
                 "qg-1", "2001:db8::1"])
    announce.send("qrouter-r1", chosen, timeout=5)
    assert fp.call_count([*NSENTER, sys.executable, fp.any()]) == 1


def test_a_failed_advertisement_names_its_address(fp):
    fp.register([*NSENTER, sys.executable, "-m", "snat_sync.neighbour_advertisement",
                 "qr-6", "2001:db8:1::1"], returncode=1)
    chosen = announce.announcements([("qr-6", "2001:db8:1::1", "global")])
    with pytest.raises(announce.AnnounceError, match=(
            "2001:db8:1::1 on qr-6: neighbour advertisement exit status 1")):
        announce.send("qrouter-r1", chosen, timeout=5)


def test_a_failed_arping_names_its_address_and_the_others_still_run(fp):
    fp.register([*NSENTER, "arping", "-q", "-U", "-c", "1", "-I", "qg-1",
                 "198.18.0.1"], returncode=2,
                stderr="arping: Device qg-1 not available.\n")
    fp.register([*NSENTER, "arping", "-q", "-U", "-c", "1", "-I", "qr-1",
                 "10.0.0.1"])
    chosen = announce.announcements([("qg-1", "198.18.0.1", "global"),
                                     ("qr-1", "10.0.0.1", "global")])
    with pytest.raises(announce.AnnounceError,
                       match="qrouter-r1: 198.18.0.1 on qg-1: arping: Device qg-1"):
        announce.send("qrouter-r1", chosen, timeout=5)
    assert fp.call_count([*NSENTER, "arping", fp.any()]) == 2


class HangingArping:
    """A Popen whose arping never exits: communicate times out until killed."""

    killed = False

    def __init__(self, argv, **_):
        self.args = argv
        self.returncode = None

    def communicate(self, timeout=None):
        if not self.killed:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return "", ""

    def kill(self):
        self.killed = True
        self.returncode = -9


def test_an_arping_that_hangs_is_killed_and_named(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", HangingArping)
    chosen = announce.announcements([("qg-1", "198.18.0.1", "global")])
    with pytest.raises(announce.AnnounceError,
                       match="198.18.0.1 on qg-1: arping did not finish within 5 s"):
        announce.send("qrouter-r1", chosen, timeout=5)


def test_a_missing_nsenter_is_named(monkeypatch):
    def missing(argv, **_):
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    monkeypatch.setattr(subprocess, "Popen", missing)
    chosen = announce.announcements([("qg-1", "198.18.0.1", "global")])
    with pytest.raises(announce.AnnounceError, match="cannot run nsenter"):
        announce.send("qrouter-r1", chosen, timeout=5)


def test_the_survivor_announces_its_addresses_before_it_resyncs():
    assert [step.name for step in repair.REPAIR_STEPS[repair.SURVIVOR_RESYNC]] == [
        failover.ANNOUNCE_ADDRESSES.name, failover.RESYNC_FROM_KERNEL.name,
        failover.BULK_SEND.name]
