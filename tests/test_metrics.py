"""Prometheus metrics: families, exposition, textfile, HTTP endpoint, CLI."""

import errno
import os
import socket
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snat_sync import cli
from snat_sync import history
from snat_sync import manager
from snat_sync import metrics
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError

# Stand-ins of the shape of manager.RouterStatus, PeerStatus and ReplicationStats.


def peer(**overrides):
    values = {"address": "169.254.192.2", "role": "backup", "last_seen": 1000.5,
              "internal_cache": 3, "external_cache": 120}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def replication(**overrides):
    values = {"packets_sent": 500, "packets_received": 40, "messages_lost": 2,
              "messages_malformed": 1, "resend_queue": 7, "cache_full_drops": 0}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def router_status(**overrides):
    values = {
        "router": "r1", "namespace": "qrouter-r1", "role": "primary",
        "role_source": "transition", "peers": (peer(),),
        "conntrackd_pid": 4242, "conntrackd_alive": True,
        "conntrackd_started": 900.0, "conntrackd_uptime_seconds": 100.0,
        "kernel_entries": 121, "internal_cache": 120, "external_cache": 3,
        "replication": replication(),
        "last_transition": {"role": "primary", "outcome": "done",
                            "arrived": 950.0, "finished": 950.25},
        "last_repair": None, "problems": (), "checked": 999.0,
        "verdict": "in-sync", "reason": "",
        "replica_entries": 118, "primary_entries": 121, "missing_entries": 3,
    }
    values.update(overrides)
    return types.SimpleNamespace(**values)


PRIMARY = router_status()
BACKUP = router_status(
    router="r2", namespace="qrouter-r2", role="backup",
    peers=(peer(address="169.254.192.9", role="primary", internal_cache=80,
                external_cache=0),),
    kernel_entries=5, internal_cache=0, external_cache=80,
    replication=replication(packets_sent=10, packets_received=900, resend_queue=0,
                            cache_full_drops=4),
    last_transition={"role": "backup", "outcome": "failed", "arrived": 800.0,
                     "finished": 801.5},
    verdict="degraded", reason="replica short")
DOWN = router_status(
    router="r3", namespace="qrouter-r3", role="unknown",
    peers=(peer(last_seen=None, internal_cache=None, external_cache=None),),
    conntrackd_pid=None, conntrackd_alive=False, conntrackd_started=None,
    conntrackd_uptime_seconds=None, kernel_entries=None, internal_cache=None,
    external_cache=None, replication=None, last_transition=None, checked=None,
    verdict="broken", reason="conntrackd down", replica_entries=None,
    primary_entries=None, missing_entries=None)


def counters(**overrides):
    buckets = {str(bound): 0 for bound in history.COMMIT_BUCKETS}
    buckets.update({"0.005": 1, "0.01": 1, "0.025": 3, "0.05": 3, "0.1": 4})
    for bound in history.COMMIT_BUCKETS:
        if bound > 0.1:
            buckets[str(bound)] = 4
    buckets["+Inf"] = 5
    values = {
        "transitions": {"primary": {"done": 4, "failed": 1}, "backup": {"done": 6}},
        "repairs": {"resync-from-primary": {"done": 2}},
        "commit_seconds": {"buckets": buckets, "sum": 61.25, "count": 5},
    }
    values.update(overrides)
    return values


SNAPSHOT = metrics.Snapshot([PRIMARY, BACKUP, DOWN],
                            {"r1": counters(), "r2": counters(repairs={})})

FAMILIES = {
    # name (as parsed back, counters without _total): (type, label names)
    "snat_sync_router_info": ("gauge", {"router", "namespace", "role"}),
    "snat_sync_router_verdict": ("gauge", {"router", "verdict"}),
    "snat_sync_health_check_timestamp_seconds": ("gauge", {"router"}),
    "snat_sync_conntrackd_up": ("gauge", {"router"}),
    "snat_sync_conntrackd_start_time_seconds": ("gauge", {"router"}),
    "snat_sync_kernel_entries": ("gauge", {"router"}),
    "snat_sync_cache_entries": ("gauge", {"router", "cache"}),
    "snat_sync_replica_entries": ("gauge", {"router"}),
    "snat_sync_replica_primary_entries": ("gauge", {"router"}),
    "snat_sync_replica_missing_entries": ("gauge", {"router"}),
    "snat_sync_sync_packets_sent": ("counter", {"router"}),
    "snat_sync_sync_packets_received": ("counter", {"router"}),
    "snat_sync_sync_messages_lost": ("counter", {"router"}),
    "snat_sync_sync_messages_malformed": ("counter", {"router"}),
    "snat_sync_resend_queue_entries": ("gauge", {"router"}),
    "snat_sync_cache_full_drops": ("counter", {"router"}),
    "snat_sync_peer_info": ("gauge", {"router", "peer", "role"}),
    "snat_sync_peer_last_seen_timestamp_seconds": ("gauge", {"router", "peer"}),
    "snat_sync_peer_cache_entries": ("gauge", {"router", "peer", "cache"}),
    "snat_sync_transitions": ("counter", {"router", "role", "outcome"}),
    "snat_sync_repairs": ("counter", {"router", "repair", "outcome"}),
    "snat_sync_commit_duration_seconds": ("histogram", {"router", "le"}),
    "snat_sync_last_transition_timestamp_seconds": ("gauge", {"router"}),
    "snat_sync_last_transition_duration_seconds": ("gauge", {"router"}),
}


def parse(exposition):
    text = exposition.decode("utf-8") if isinstance(exposition, bytes) else exposition
    return {family.name: family for family in text_string_to_metric_families(text)}


def values(family, sample_name=None, **labels):
    """{tuple of the other label values: value} of the samples matching labels."""
    found = {}
    for sample in family.samples:
        if sample_name is not None and sample.name != sample_name:
            continue
        if all(sample.labels.get(key) == value for key, value in labels.items()):
            rest = tuple(value for key, value in sorted(sample.labels.items())
                         if key not in labels)
            found[rest] = sample.value
    return found


@pytest.fixture(scope="module")
def parsed():
    return parse(metrics.render(SNAPSHOT))


# -- the families ---------------------------------------------------------------------


def test_every_family_parses_back_with_its_type_labels_and_help(parsed):
    assert set(parsed) == set(FAMILIES)
    for name, (kind, labels) in FAMILIES.items():
        family = parsed[name]
        assert family.type == kind, name
        assert family.documentation.endswith("."), name
        assert len(family.documentation) > 40, name
        assert family.samples, name
        for sample in family.samples:
            wanted = labels if sample.name.endswith("_bucket") else labels - {"le"}
            assert set(sample.labels) == wanted, (name, sample)


def test_names_follow_the_prometheus_conventions():
    text = metrics.render(SNAPSHOT).decode()
    types_ = [line.split()[2:] for line in text.splitlines()
              if line.startswith("# TYPE")]
    for name, kind in types_:
        assert name.startswith("snat_sync_")
        assert name == name.lower()
        assert name.endswith("_total") == (kind == "counter"), name


def test_router_info_and_verdict(parsed):
    assert values(parsed["snat_sync_router_info"]) == {
        ("qrouter-r1", "primary", "r1"): 1,
        ("qrouter-r2", "backup", "r2"): 1,
        ("qrouter-r3", "unknown", "r3"): 1,
    }
    verdict = parsed["snat_sync_router_verdict"]
    assert values(verdict, router="r1") == {
        ("in-sync",): 1, ("degraded",): 0, ("broken",): 0}
    assert values(verdict, router="r2") == {
        ("in-sync",): 0, ("degraded",): 1, ("broken",): 0}
    assert values(verdict, router="r3") == {
        ("in-sync",): 0, ("degraded",): 0, ("broken",): 1}


def test_conntrackd_and_cache_figures_of_a_primary_and_a_backup(parsed):
    assert values(parsed["snat_sync_conntrackd_up"]) == {
        ("r1",): 1, ("r2",): 1, ("r3",): 0}
    assert values(parsed["snat_sync_conntrackd_start_time_seconds"]) == {
        ("r1",): 900.0, ("r2",): 900.0}
    assert values(parsed["snat_sync_kernel_entries"]) == {("r1",): 121, ("r2",): 5}
    # what a failover now would lose; unknown figures (r3) are left out
    assert values(parsed["snat_sync_replica_missing_entries"]) == {
        ("r1",): 3, ("r2",): 3}
    assert values(parsed["snat_sync_replica_entries"]) == {("r1",): 118, ("r2",): 118}
    assert values(parsed["snat_sync_replica_primary_entries"]) == {
        ("r1",): 121, ("r2",): 121}
    caches = parsed["snat_sync_cache_entries"]
    assert values(caches, router="r1") == {("internal",): 120, ("external",): 3}
    assert values(caches, router="r2") == {("internal",): 0, ("external",): 80}
    assert values(parsed["snat_sync_health_check_timestamp_seconds"]) == {
        ("r1",): 999.0, ("r2",): 999.0}


def test_replication_counters(parsed):
    expected = {
        "snat_sync_sync_packets_sent": {("r1",): 500, ("r2",): 10},
        "snat_sync_sync_packets_received": {("r1",): 40, ("r2",): 900},
        "snat_sync_sync_messages_lost": {("r1",): 2, ("r2",): 2},
        "snat_sync_sync_messages_malformed": {("r1",): 1, ("r2",): 1},
        "snat_sync_resend_queue_entries": {("r1",): 7, ("r2",): 0},
        "snat_sync_cache_full_drops": {("r1",): 0, ("r2",): 4},
    }
    for name, figures in expected.items():
        assert values(parsed[name]) == figures, name
    assert {sample.name for sample in parsed["snat_sync_sync_packets_sent"].samples} \
        == {"snat_sync_sync_packets_sent_total"}


def test_peer_figures(parsed):
    assert values(parsed["snat_sync_peer_info"]) == {
        ("169.254.192.2", "backup", "r1"): 1,
        ("169.254.192.9", "primary", "r2"): 1,
        ("169.254.192.2", "backup", "r3"): 1,
    }
    assert values(parsed["snat_sync_peer_last_seen_timestamp_seconds"]) == {
        ("169.254.192.2", "r1"): 1000.5, ("169.254.192.9", "r2"): 1000.5}
    caches = parsed["snat_sync_peer_cache_entries"]
    assert values(caches, router="r2", peer="169.254.192.9") == {
        ("internal",): 80, ("external",): 0}
    assert values(caches, router="r3") == {}


def test_transition_and_repair_counters(parsed):
    assert values(parsed["snat_sync_transitions"], router="r1") == {
        ("done", "primary"): 4, ("failed", "primary"): 1, ("done", "backup"): 6}
    assert values(parsed["snat_sync_repairs"]) == {
        ("done", "resync-from-primary", "r1"): 2}


def test_last_transition(parsed):
    assert values(parsed["snat_sync_last_transition_timestamp_seconds"]) == {
        ("r1",): 950.0, ("r2",): 800.0}
    assert values(parsed["snat_sync_last_transition_duration_seconds"]) == {
        ("r1",): 0.25, ("r2",): 1.5}


def test_unknown_figures_are_left_out_not_zero():
    text = metrics.render(metrics.Snapshot([DOWN], {})).decode()
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(line.split("{")[0] for line in samples) == sorted([
        "snat_sync_router_info",
        *["snat_sync_router_verdict"] * 3,
        "snat_sync_conntrackd_up",
        "snat_sync_peer_info",
    ])
    assert 'snat_sync_conntrackd_up{router="r3"} 0.0' in samples


def test_a_transition_without_an_end_has_no_duration():
    record = {"role": "primary", "outcome": "failed", "arrived": 950.0,
              "finished": None}
    parsed = parse(metrics.render(metrics.Snapshot(
        [router_status(last_transition=record)], {})))
    assert values(parsed["snat_sync_last_transition_timestamp_seconds"]) == {
        ("r1",): 950.0}
    assert values(parsed["snat_sync_last_transition_duration_seconds"]) == {}


def test_the_commit_histogram_is_cumulative_with_count_and_sum(parsed):
    histogram = parsed["snat_sync_commit_duration_seconds"]
    buckets = [(sample.labels["le"], sample.value) for sample in histogram.samples
               if sample.name.endswith("_bucket") and sample.labels["router"] == "r1"]
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert len(buckets) == len(history.COMMIT_BUCKETS) + 1
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)
    assert dict(buckets)["0.025"] == 3 and dict(buckets)["60.0"] == 4
    assert values(histogram, "snat_sync_commit_duration_seconds_count",
                  router="r1") == {(): 5}
    assert values(histogram, "snat_sync_commit_duration_seconds_sum",
                  router="r1") == {(): 61.25}


def test_a_router_without_counters_has_no_counter_samples(parsed):
    for name in ("snat_sync_transitions", "snat_sync_repairs",
                 "snat_sync_commit_duration_seconds"):
        assert values(parsed[name], router="r3") == {}, name


def test_the_collector_asks_its_source_at_every_collection():
    snapshots = iter([metrics.Snapshot([PRIMARY], {}), metrics.Snapshot([], {})])
    collector = metrics.SnapshotCollector(lambda: next(snapshots))
    first = {family.name: family for family in collector.collect()}
    second = {family.name: family for family in collector.collect()}
    assert first["snat_sync_conntrackd_up"].samples
    assert not second["snat_sync_conntrackd_up"].samples


# -- the textfile ---------------------------------------------------------------------


def test_write_textfile_replaces_the_file_atomically_readable_by_all(
        tmp_path, monkeypatch):
    path = tmp_path / "snat_sync.prom"
    path.write_text("old\n")
    renames = []
    real_replace = os.replace

    def replace(source, target):
        renames.append((source, path.read_text(), open(source).read(),
                        os.stat(source).st_mode & 0o777))
        real_replace(source, target)

    monkeypatch.setattr(statedir.os, "replace", replace)
    old_umask = os.umask(0o077)
    try:
        metrics.write_textfile(path, SNAPSHOT)
    finally:
        os.umask(old_umask)
    ((source, target_then, written, mode),) = renames
    assert os.path.dirname(source) == str(tmp_path)
    assert not source.endswith(".prom")  # node_exporter never reads it half-written
    assert target_then == "old\n"
    assert written == metrics.render(SNAPSHOT).decode()
    assert mode == 0o644
    assert path.read_bytes() == metrics.render(SNAPSHOT)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["snat_sync.prom"]


def test_write_textfile_into_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "missing" / "snat_sync.prom"
    with pytest.raises(SnatSyncError, match=f"{path}: No such file or directory"):
        metrics.write_textfile(path, SNAPSHOT)


@pytest.mark.parametrize("text", ["snat_sync.prom", "/var/lib/node/snat_sync.txt",
                                  "/var/lib/node/.prom", "/var/lib/node/"])
def test_textfile_path_must_be_absolute_and_end_in_prom(text):
    with pytest.raises(InvalidInput) as raised:
        metrics.textfile_path(text)
    assert raised.value.field == "--textfile"
    assert raised.value.value == text


# -- the HTTP endpoint ----------------------------------------------------------------


def scrape(server):
    with urllib.request.urlopen(server.url, timeout=5) as response:
        return response.read()


def port_is_free(address, port):
    """Whether a server could listen on address:port now (as a restarted one would,
    with SO_REUSEADDR: the scrapes' closed connections linger in TIME_WAIT)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
            probe.listen()
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_serve_answers_with_the_current_snapshot_and_shutdown_frees_the_port():
    current = [metrics.Snapshot([PRIMARY], {"r1": counters()})]
    server = metrics.serve("127.0.0.1", 0, lambda: current[0])
    try:
        assert server.port > 0
        assert not port_is_free("127.0.0.1", server.port)
        first = parse(scrape(server))
        assert values(first["snat_sync_cache_entries"], router="r1") == {
            ("internal",): 120, ("external",): 3}
        current[0] = metrics.Snapshot([BACKUP], {})
        second = parse(scrape(server))
        assert values(second["snat_sync_router_info"]) == {
            ("qrouter-r2", "backup", "r2"): 1}
    finally:
        server.shutdown()
    assert port_is_free("127.0.0.1", server.port)
    server.close()  # a second stop does nothing
    again = metrics.serve("127.0.0.1", server.port, lambda: SNAPSHOT)
    again.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_an_ipv6_address():
    server = metrics.serve("::1", 0, lambda: SNAPSHOT)
    try:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert "snat_sync_router_info" in parse(scrape(server))
    finally:
        server.close()
    assert port_is_free("::1", server.port)


def test_serve_on_a_port_in_use_names_address_and_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SnatSyncError) as raised:
            metrics.serve("127.0.0.1", port, lambda: SNAPSHOT)
    assert str(raised.value) == (f"cannot serve metrics on 127.0.0.1:{port}: "
                                 "Address already in use")


@pytest.mark.parametrize("address, shown", [("192.0.2.1", "192.0.2.1:9787"),
                                            ("2001:db8::1", "[2001:db8::1]:9787")])
def test_serve_on_an_address_this_node_does_not_have(address, shown):
    with pytest.raises(SnatSyncError, match=rf"cannot serve metrics on "
                       rf"{shown.replace('[', '.').replace(']', '.')}: "):
        metrics.serve(address, 9787, lambda: SNAPSHOT)


# -- gathering and the command line ---------------------------------------------------


def test_gather_takes_each_routers_status_and_counters(conf, state_path, spec,
                                                       monkeypatch):
    files = statedir.RouterFiles.under(state_path, "r1")
    statedir.ensure_directory(files.directory)
    monkeypatch.setattr(manager, "status", lambda conf, read_addresses: [PRIMARY])
    snapshot = metrics.gather(conf)
    assert snapshot.statuses == (PRIMARY,)
    assert snapshot.counters == {"r1": history.read_counters(files)}
    assert snapshot.counters["r1"]["commit_seconds"]["count"] == 0


def run(state_path, *arguments):
    return cli.main(["--state-path", str(state_path), *arguments])


@pytest.fixture
def gathered(monkeypatch):
    monkeypatch.setattr(metrics, "gather", lambda conf: SNAPSHOT)


def test_cli_metrics_prints_the_exposition(state_path, gathered, capsys):
    assert run(state_path, "metrics") == 0
    assert capsys.readouterr().out == metrics.render(SNAPSHOT).decode()


def test_cli_metrics_without_routers(state_path, capsys):
    assert run(state_path, "metrics") == 0
    parsed = parse(capsys.readouterr().out)
    assert "snat_sync_conntrackd_up" in parsed
    assert all(not family.samples for family in parsed.values())


def test_cli_metrics_writes_the_textfile(state_path, tmp_path, gathered, capsys):
    path = tmp_path / "snat_sync.prom"
    assert run(state_path, "metrics", "--textfile", str(path)) == 0
    assert capsys.readouterr().out == ""
    assert path.read_bytes() == metrics.render(SNAPSHOT)
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["snat_sync.prom", "snat_sync.txt"])
def test_cli_metrics_refuses_a_bad_textfile(state_path, tmp_path, gathered, capsys,
                                            monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    text = name if name.endswith(".prom") else str(tmp_path / name)
    assert run(state_path, "metrics", "--textfile", text) == 2
    assert f"invalid --textfile {text!r}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_metrics_help_names_the_daemons_endpoint(state_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run(state_path, "metrics", "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Prometheus" in text
    assert "listen_address:listen_port" in text
    assert "--textfile PATH" in text


def test_cli_metrics_of_a_router_whose_conntrackd_is_down(state_path, spec, capsys):
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, spec.to_dict())
    assert run(state_path, "metrics") == 0
    parsed = parse(capsys.readouterr().out)
    assert values(parsed["snat_sync_router_info"]) == {("qrouter-r1", "unknown",
                                                        "r1"): 1}
    assert values(parsed["snat_sync_conntrackd_up"]) == {("r1",): 0}
    assert values(parsed["snat_sync_cache_entries"]) == {}
    transitions = values(parsed["snat_sync_transitions"], router="r1")
    assert len(transitions) == len(history.TRANSITION_ROLES) * len(
        history.TRANSITION_OUTCOMES)
    assert set(transitions.values()) == {0}
    assert values(parsed["snat_sync_commit_duration_seconds"],
                  "snat_sync_commit_duration_seconds_count") == {("r1",): 0}
