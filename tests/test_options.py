"""Options: every value is checked at start-up, and a bad one is named precisely."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from snat_sync import cli
from snat_sync import options
from snat_sync.errors import InvalidInput

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent


def test_defaults(conf, state_path):
    assert conf.state_path == str(state_path)
    assert conf.conntrackd.binary == "conntrackd"
    assert conf.conntrackd.sync_mode == "auto"
    assert conf.conntrackd.transport == "auto"
    assert conf.conntrackd.base_port == 3780
    assert conf.conntrackd.multicast_group == "225.0.0.50"
    assert conf.conntrackd.protocols == ["TCP", "UDP", "ICMP", "IPv6-ICMP", "SCTP",
                                         "DCCP"]
    assert conf.conntrackd.expectation_helpers == ["all"]
    assert conf.conntrackd.hash_size == 65536
    assert conf.conntrackd.hash_limit == 0
    assert conf.conntrackd.scheduler == "other"
    assert conf.failover.resync_on_backup is True
    assert conf.failover.reset_window_guard is True


def test_config_file_values_are_used(make_conf, write_config):
    conf = make_conf(write_config(
        "[conntrackd]\nhash_size = 32768\ntransport = multicast\n"
        "protocols = TCP,UDP,SCTP\n[failover]\nresync_on_backup = false\n"
        "reset_window_guard = false\n"))
    assert conf.conntrackd.hash_size == 32768
    assert conf.conntrackd.transport == "multicast"
    assert conf.conntrackd.protocols == ["TCP", "UDP", "SCTP"]
    assert conf.failover.resync_on_backup is False
    assert conf.failover.reset_window_guard is False


@pytest.mark.parametrize("hash_size", ["8193", "12289", "1048576"])
def test_hash_size_above_conntrackds_commit_step_is_accepted(
        make_conf, write_config, hash_size):
    conf = make_conf(write_config(f"[conntrackd]\nhash_size = {hash_size}\n"))
    assert conf.conntrackd.hash_size == int(hash_size)


BAD_VALUES = [
    ("conntrackd", "hash_size", "12"),
    # conntrackd 1.4 commits 8192 buckets per step; a commit that ends in one
    # step leaves it refusing every later flush
    ("conntrackd", "hash_size", "8192"),
    ("conntrackd", "hash_size", "4096"),
    ("conntrackd", "hash_size", "1048577"),
    ("conntrackd", "hash_size", "abc"),
    ("conntrackd", "transport", "carrier-pigeon"),
    ("conntrackd", "protocols", "TCP,FOO"),
    ("conntrackd", "expectation_helpers", "ftp,s ip"),
    ("conntrackd", "expectation_helpers", "ftp,{sip}"),
    ("conntrackd", "expectation_helpers", "all,ftp"),   # all covers ftp already
    ("conntrackd", "sync_mode", "fast"),
    ("conntrackd", "base_port", "65500"),       # 65500 + VRID is no port
    ("conntrackd", "multicast_group", "ff02::1"),
    ("conntrackd", "ipv6_multicast_group", "225.0.0.50"),
    ("conntrackd", "scheduler_priority", "100"),
    ("conntrackd", "commit_timeout", "0"),
    ("failover", "lock_timeout", "-5"),
    ("failover", "resync_on_backup", "maybe"),
    ("failover", "reset_window_guard", "sometimes"),
    ("failover", "history_size", "5"),
    ("health", "check_interval", "0.1"),
    ("health", "base_port", "3700"),            # its ports overlap the sync ports
    ("health", "repair", "perhaps"),
    ("metrics", "listen_address", "localhost:80"),
    ("metrics", "listen_port", "70000"),
    ("metrics", "textfile", "relative.prom"),
    ("metrics", "textfile", "/var/lib/node_exporter/snat-sync.txt"),
    ("conntrackd", "log_max_bytes", "-1"),
]


def assert_names_the_option(error, section, name, path, raw):
    message = str(error)
    assert f"[{section}] {name}" in message
    assert str(path) in message
    assert repr(raw) in message
    assert error.value == raw
    assert error.exit_status == 2


@pytest.mark.parametrize("section, name, raw", BAD_VALUES)
def test_a_bad_value_fails_at_load_naming_option_file_and_value(
        make_conf, write_config, section, name, raw):
    path = write_config(f"[{section}]\n{name} = {raw}\n")
    with pytest.raises(InvalidInput) as caught:
        make_conf(path)
    assert_names_the_option(caught.value, section, name, path, raw)


def test_a_multicast_group_must_be_a_multicast_address(make_conf, write_config):
    """The option is "IPv4 multicast group"; a unicast address would only fail
    when conntrackd joins the group, after `router add` has written files."""
    path = write_config("[conntrackd]\nmulticast_group = 10.0.0.1\n")
    with pytest.raises(InvalidInput) as caught:
        make_conf(path)
    assert_names_the_option(caught.value, "conntrackd", "multicast_group", path,
                            "10.0.0.1")


def test_an_ipv6_multicast_group_must_be_a_multicast_address(make_conf,
                                                             write_config):
    path = write_config("[conntrackd]\nipv6_multicast_group = fd00::1\n")
    with pytest.raises(InvalidInput) as caught:
        make_conf(path)
    assert_names_the_option(caught.value, "conntrackd", "ipv6_multicast_group",
                            path, "fd00::1")


def test_the_error_names_the_file_whose_value_is_used(make_conf, write_config):
    good = write_config("[conntrackd]\nhash_size = 16384\n", "good.conf")
    bad = write_config("[conntrackd]\nhash_size = 12\n", "bad.conf")
    assert make_conf(bad, good).conntrackd.hash_size == 16384  # the last file wins
    with pytest.raises(InvalidInput) as caught:
        make_conf(good, bad)
    assert_names_the_option(caught.value, "conntrackd", "hash_size", bad, "12")
    assert str(good) not in str(caught.value)


def test_a_bad_value_in_a_config_dir_names_that_file(make_conf, write_config, tmp_path):
    path = write_config("[conntrackd]\ntransport = carrier-pigeon\n",
                        "snat-sync.d/10-transport.conf")
    with pytest.raises(InvalidInput) as caught:
        make_conf(extra=["--config-dir", str(tmp_path / "snat-sync.d")])
    assert_names_the_option(caught.value, "conntrackd", "transport", path,
                            "carrier-pigeon")


def test_list_opts_covers_every_group():
    groups = {group: [opt.name for opt in opts] for group, opts in options.list_opts()}
    assert set(groups) == {"DEFAULT", "conntrackd", "failover", "health", "metrics"}
    assert "state-path" in groups["DEFAULT"]
    expected = {"hash_size", "hash_limit", "transport", "base_port", "commit_timeout"}
    assert expected <= set(groups["conntrackd"])
    assert {"lock_timeout", "resync_on_backup", "reset_window_guard"} <= set(
        groups["failover"])
    assert {"check_interval", "repair", "base_port"} <= set(groups["health"])
    assert {"listen_address", "listen_port", "textfile"} <= set(groups["metrics"])


# -- through the command line -------------------------------------------------------


def test_cli_reports_a_bad_value_and_exits_2(write_config, state_path, capsys):
    path = write_config("[conntrackd]\nhash_size = 8192\n")
    status = cli.main(["--config-file", str(path), "--state-path", str(state_path),
                       "status"])
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("snat-sync: invalid option [conntrackd] hash_size")
    assert str(path) in captured.err
    assert "'8192'" in captured.err
    assert "8193" in captured.err  # the minimum it must reach


def test_cli_reports_a_missing_config_file_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.conf"
    status = cli.main(["--config-file", str(missing), "--state-path",
                       str(tmp_path / "state"), "status"])
    assert status == 2
    captured = capsys.readouterr()
    assert str(missing) in captured.err
    assert captured.out == ""


def test_cli_reports_an_unparseable_config_file_and_exits_2(write_config, tmp_path,
                                                          capsys):
    path = write_config("this is not ini\n")
    status = cli.main(["--config-file", str(path), "--state-path",
                       str(tmp_path / "state"), "status"])
    assert status == 2
    assert str(path) in capsys.readouterr().err


# -- the committed sample ------------------------------------------------------------


def test_sample_config_is_up_to_date(tmp_path):
    generator = shutil.which("oslo-config-generator")
    command = ([generator] if generator
               else [sys.executable, "-m", "oslo_config.generator"])
    output = tmp_path / "snat-sync.conf.sample"
    subprocess.run(
        [*command, "--config-file", "etc/oslo-config-generator/snat-sync.conf",
         "--output-file", str(output)],
        cwd=REPOSITORY, check=True, capture_output=True, text=True, timeout=60,
    )
    committed = (REPOSITORY / "etc" / "snat-sync.conf.sample").read_text()
    assert output.read_text() == committed, (
        "etc/snat-sync.conf.sample is stale; regenerate it with: oslo-config-generator "
        "--config-file etc/oslo-config-generator/snat-sync.conf")
    assert "[conntrackd]" in committed and "#hash_size = 65536" in committed
    assert "#reset_window_guard = true" in committed
