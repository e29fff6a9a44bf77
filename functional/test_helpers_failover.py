"""FTP and SIP through the kernel's helpers, and SCTP, across a crash of the primary.

Three labs, one crash each (about 25 s each, see snat_sync.lab.helper_failover):
snat-sync with its defaults (every helper's expectations, SCTP replicated), and two
negative controls: snat-sync with expectation sync off and SCTP left out of the
replicated protocols, which keeps what plain entries carry (the running downloads,
and the helper name with which the new primary's helper announces new data
connections) and must lose what only the expectations and the SCTP entries carry;
and keepalived alone, which must lose the running downloads too.
"""

import secrets

import pytest

from snat_sync.lab import helper_failover

CONTROL_CONFIG = (
    "[metrics]\nlisten_port = 0\n"
    "[conntrackd]\nexpectation_helpers =\nprotocols = TCP,UDP,ICMP,IPv6-ICMP\n"
)


def run(tmp_path_factory, name, config):
    return helper_failover.run_scenario(
        tmp_path_factory.mktemp(name), config, prefix=f"hlp-{secrets.token_hex(3)}")


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    return run(tmp_path_factory, "synced", None)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return run(tmp_path_factory, "control", CONTROL_CONFIG)


# The daemons run, but without the table listener that takes what the primary's
# daemon corrects (mapping_sync): what conntrackd's replication alone leaves.
CONNTRACKD_ALONE_CONFIG = "[metrics]\nlisten_port = 0\n[failover]\ntable_transfer = false\n"


@pytest.fixture(scope="module")
def conntrackd_alone(tmp_path_factory):
    return run(tmp_path_factory, "conntrackd-alone", CONNTRACKD_ALONE_CONFIG)


@pytest.fixture(scope="module")
def keepalived_only(tmp_path_factory):
    return run(tmp_path_factory, "alone", False)


def transfer(result, session, what):
    found = [each for each in result.ftp_transfers(session) if each["what"] == what]
    assert len(found) == 1, result.ftp
    return found[0]


def describe(result):
    return (f"ftp={result.ftp}\nsip answered={result.sip['answered']} "
            f"rtp={len(result.sip['rtp_times'])}\nsctp client={result.sctp_client}\n"
            f"sctp server={result.sctp_server}\nr2 expectations before the crash="
            f"{result.replica_expectations}\nr2 sctp entries={result.replica_sctp_entries}")


def sctp_association(result, index):
    """The client's and the server's view of the index-th association: the first
    keeps its client port on the gateway, the second was remapped by SNAT."""
    client = result.sctp_client["associations"][index]
    servers = [each for each in result.sctp_server["associations"]
               if each["endpoint"].endswith(":5001") == (index == 0)]
    assert len(servers) == 1, describe(result)
    return client, servers[0]


def test_ftp_downloads_running_at_the_crash_complete(synced):
    assert not synced.ftp["failures"], describe(synced)
    for session in ("running-passive", "running-active"):
        download = transfer(synced, session, "running download")
        assert download["complete"], describe(synced)


def test_ftp_data_connection_announced_before_the_crash_opens_after_it(synced):
    assert any("helper=ftp" in line for line in synced.replica_expectations), \
        describe(synced)
    assert transfer(synced, "pending-passive",
                    "data connection announced before")["complete"], describe(synced)
    assert transfer(synced, "pending-passive",
                    "data connection announced after")["complete"], describe(synced)


def test_ftp_active_data_connection_announced_before_the_crash_opens_after_it(
        synced):
    """PORT before the crash: its rewrite shifted the control connection's
    sequence numbers on the primary; the new primary shifts them too, and the
    server's data connection to the announced port finds the expectation."""
    assert transfer(synced, "pending-active",
                    "data connection announced before")["complete"], describe(synced)
    assert transfer(synced, "pending-active",
                    "data connection announced after")["complete"], describe(synced)


def test_sctp_association_survives_on_its_public_port(synced):
    assert synced.replica_sctp_entries, describe(synced)
    client, server = sctp_association(synced, 0)
    assert client["established"] and client["alive"], describe(synced)
    assert server["endpoints"] == [server["endpoint"]], describe(synced)


def test_remapped_sctp_association_keeps_its_public_port(synced):
    client, server = sctp_association(synced, 1)
    assert client["alive"] and server["endpoints"] == [server["endpoint"]], \
        describe(synced)


def test_sip_rtp_started_after_the_crash_reaches_the_caller(synced):
    assert synced.sip["answered"], describe(synced)
    assert synced.sip["rtp_times"], describe(synced)


def test_conntrackd_alone_loses_the_media_the_active_data_and_the_remapped_port(
        conntrackd_alone):
    """conntrackd 1.4.7 injects the call's media expectations in class 0, where
    the kernel keeps one per call, the remapped association's entry without its
    NAT port, and the FTP control connection without the sequence shift of its
    rewritten PORT: without the primary's daemon correcting them, RTP started
    after the crash does not reach the caller, the active-mode data connection
    announced before the crash does not open, and the association moves to
    another public port, while the one that kept its port survives."""
    result = conntrackd_alone
    assert result.sip["answered"] and not result.sip["rtp_times"], describe(result)
    assert not transfer(result, "pending-active",
                        "data connection announced before")["complete"], \
        describe(result)
    assert transfer(result, "pending-passive",
                    "data connection announced before")["complete"], describe(result)
    kept_client, kept_server = sctp_association(result, 0)
    assert kept_client["alive"], describe(result)
    assert kept_server["endpoints"] == [kept_server["endpoint"]], describe(result)
    client, server = sctp_association(result, 1)
    assert not (client["alive"] and server["endpoints"] == [server["endpoint"]]), \
        describe(result)


def test_control_without_expectation_sync_loses_the_announced_data_connection(
        control):
    """The same crash with expectation sync off: the data connection announced to
    the old primary finds nothing on the new one; what plain entries carry still
    works (so the lab itself is sound)."""
    assert not control.ftp["failures"], describe(control)
    assert not control.replica_expectations, describe(control)
    assert not transfer(control, "pending-passive",
                        "data connection announced before")["complete"], \
        describe(control)
    for session in ("running-passive", "running-active"):
        assert transfer(control, session, "running download")["complete"], \
            describe(control)
    assert transfer(control, "pending-passive",
                    "data connection announced after")["complete"], describe(control)


def test_control_without_sctp_replication_loses_the_association(control):
    client, server = sctp_association(control, 0)
    assert client["established"] and client["acks"], describe(control)
    assert not control.replica_sctp_entries, describe(control)
    assert not client["alive"], describe(control)


def test_keepalived_alone_loses_the_running_downloads(keepalived_only):
    assert not keepalived_only.ftp["failures"], describe(keepalived_only)
    client, _server = sctp_association(keepalived_only, 0)
    assert client["established"] and client["acks"], describe(keepalived_only)
    for session in ("running-passive", "running-active"):
        download = transfer(keepalived_only, session, "running download")
        assert download["received"] > 0, describe(keepalived_only)
        assert not download["complete"], describe(keepalived_only)
    assert not transfer(keepalived_only, "pending-active",
                        "data connection announced before")["complete"], \
        describe(keepalived_only)
    assert not transfer(keepalived_only, "pending-passive",
                        "data connection announced before")["complete"], \
        describe(keepalived_only)
    assert not client["alive"], describe(keepalived_only)
