"""snat_sync.lab.flows: the flow plan, the verdicts, and a short run over loopback."""

import json
import socket
import struct
import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies

from snat_sync.lab import flows

ADDRESSES = tuple(f"192.168.100.{host}" for host in range(11, 19))


def test_plan_shares_source_ports_across_addresses():
    plan = flows.plan_flows(ADDRESSES, tcp_flows=16, udp_flows=16)

    tcp = [spec for spec in plan if spec.protocol == "tcp"]
    assert len(tcp) == 16 and len(plan) == 32
    assert {spec.client_port for spec in tcp} == {40001, 40002}
    first_port = {spec.client_address for spec in tcp if spec.client_port == 40001}
    assert first_port == set(ADDRESSES)
    endpoints = {
        (spec.protocol, spec.client_address, spec.client_port) for spec in plan
    }
    assert len(endpoints) == len(plan)
    assert len({spec.flow_id for spec in plan}) == len(plan)


def test_longest_gap_counts_the_silence_after_the_last_reply():
    assert flows.longest_gap(0.0, [0.1, 0.2, 3.2, 3.3], 10.0) == (10.0 - 3.3, 3.3)
    assert flows.longest_gap(0.0, [0.5, 1.0, 4.0, 6.0, 8.0, 9.5], 10.0) == (3.0, 1.0)
    assert flows.longest_gap(0.0, [], 5.0) == (5.0, 0.0)


@given(
    strategies.lists(strategies.floats(0, 100, allow_nan=False), max_size=50),
    strategies.floats(0, 100, allow_nan=False),
)
def test_longest_gap_bounds(times, extra):
    end = max(times, default=0.0) + extra
    length, start = flows.longest_gap(0.0, sorted(times), end)
    assert 0.0 <= length <= end
    assert 0.0 <= start <= end - length + 1e-9


def test_alive_needs_a_recent_reply_and_no_error():
    assert flows.is_alive([1.0, 9.5], 10.0, None)
    assert not flows.is_alive([1.0, 8.5], 10.0, None)
    assert not flows.is_alive([9.9], 10.0, "ConnectionResetError")
    assert not flows.is_alive([], 10.0, None)


def test_reply_round_trip():
    message = flows.encode_message("udp-03", 17)
    reply = flows.encode_reply(message, "203.0.113.10:52002")
    assert flows.decode_reply(reply) == ("udp-03", 17, "203.0.113.10:52002")


def client_flow(flow_id, protocol, alive, gap=80.0, error=None):
    return {
        "flow_id": flow_id,
        "protocol": protocol,
        "client_endpoint": "192.168.100.11:40001",
        "alive": alive,
        "longest_gap_ms": gap,
        "longest_gap_start": 3.0,
        "error": error,
    }


def test_merge_and_summarize():
    client = {"flows": [
        client_flow("tcp-00", "tcp", True, gap=3400.0),
        client_flow("tcp-01", "tcp", False, gap=9000.0, error="ConnectionResetError"),
        client_flow("udp-00", "udp", True, gap=3100.0),
        client_flow("udp-01", "udp", True),
    ]}
    server = {"flows": [
        {"flow_id": "tcp-00", "public_endpoints": ["203.0.113.10:40001"]},
        {"flow_id": "tcp-01", "public_endpoints": ["203.0.113.10:50001"]},
        {"flow_id": "udp-00", "public_endpoints": ["203.0.113.10:40001"]},
        {"flow_id": "udp-01", "public_endpoints": ["203.0.113.10:5", "203.0.113.10:6"]},
    ]}

    results = flows.merge_reports(client, server)
    summary = flows.summarize(results)

    same = [result.same_public_endpoint for result in results]
    assert same == [True, True, True, False]
    assert (summary.tcp_alive, summary.tcp_total) == (1, 2)
    assert (summary.udp_alive, summary.udp_alive_same_endpoint) == (2, 1)
    assert not summary.all_same_endpoint
    assert summary.tcp_longest_gap_ms == 3400.0
    assert summary.udp_longest_gap_ms == 3100.0


def test_flow_without_server_sighting_is_not_same_endpoint():
    results = flows.merge_reports({"flows": [client_flow("udp-00", "udp", True)]}, {})
    assert not results[0].same_public_endpoint


def free_port(kind):
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_loopback_server(tmp_path, port, duration, *extra):
    """The lab's flow server on 127.0.0.1:port, its report in server.json, once it
    says it is ready."""
    ready = tmp_path / "ready"
    server = subprocess.Popen([
        sys.executable, "-m", "snat_sync.lab.flows", "server", "--address", "127.0.0.1",
        "--port", str(port), "--duration", str(duration), "--ready-file", str(ready),
        "--output", str(tmp_path / "server.json"), *extra,
    ])
    for _ in range(100):
        if ready.exists():
            break
        time.sleep(0.05)
    return server


def test_short_run_over_loopback(tmp_path):
    """Server and client as the lab runs them, on loopback addresses (no root)."""
    port, base_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    server = start_loopback_server(tmp_path, port, 10,
                                   "--snapshot", str(tmp_path / "server-snapshot.json"))
    try:
        client = subprocess.run(
            [
                sys.executable, "-m", "snat_sync.lab.flows", "client",
                "--server", "127.0.0.1",
                "--port", str(port), "--addresses", "127.0.0.11,127.0.0.12",
                "--tcp-flows", "2", "--udp-flows", "2", "--base-port", str(base_port),
                "--duration", "1.5", "--snapshot", str(tmp_path / "snapshot.json"),
            ],
            capture_output=True, text=True, timeout=20, check=True,
        )
        server.terminate()
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()

    # The snapshots' last versions, written as each program ended, agree with the
    # reports and carry no reply times.
    snapshot = json.loads((tmp_path / "snapshot.json").read_text())
    report = json.loads(client.stdout)
    assert [flow["replies"] for flow in snapshot["flows"]] == [
        flow["replies"] for flow in report["flows"]]
    assert all(flow["replies"] > 5 and flow["error"] is None
               and "reply_times" not in flow for flow in snapshot["flows"])
    assert json.loads((tmp_path / "server-snapshot.json").read_text()) == json.loads(
        (tmp_path / "server.json").read_text())

    results = flows.merge_reports(
        json.loads(client.stdout), json.loads((tmp_path / "server.json").read_text())
    )
    assert len(results) == 4
    for result in results:
        assert result.alive, result
        client_address = result.client_endpoint.split(":")[0]
        assert result.public_endpoints[0].startswith(client_address + ":")
        assert result.same_public_endpoint, result
        assert result.longest_gap_ms < 1000, result


def test_a_client_stopped_by_sigterm_reports_at_once(tmp_path):
    """The lab stops a client whose run length it cannot know in advance (a
    rolling restart) with SIGTERM: it ends long before --duration and its
    report holds the flows alive until then."""
    port, base_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    server = start_loopback_server(tmp_path, port, 60)
    try:
        client = subprocess.Popen([
            sys.executable, "-m", "snat_sync.lab.flows", "client",
            "--server", "127.0.0.1", "--port", str(port),
            "--addresses", "127.0.0.11", "--tcp-flows", "1", "--udp-flows", "1",
            "--base-port", str(base_port), "--duration", "60",
            "--output", str(tmp_path / "client.json")])
        try:
            subprocess.run(["sleep", "2"], check=True)
            client.terminate()
            assert client.wait(timeout=10) == 0
        finally:
            client.kill()
            client.wait()
    finally:
        server.kill()
        server.wait()
    report = json.loads((tmp_path / "client.json").read_text())
    assert len(report["flows"]) == 2
    for flow in report["flows"]:
        assert flow["alive"] and flow["error"] is None, flow
        assert flow["last_reply_at"] < 10, flow


def test_reply_times_before_a_fault():
    flow = flows.merge_reports({"flows": [dict(
        client_flow("udp-00", "udp", False), reply_times=[0.1, 0.2, 2.5, 2.9, 9.0])]},
        {})[0]
    assert flow.replies_before(3.0) == 4
    assert flow.last_reply_before(3.0) == 2.9
    assert flow.was_alive_at(3.0)
    assert not flow.was_alive_at(5.0)  # silent for 2.1 s before it
    assert flow.last_reply_before(0.1) is None and not flow.was_alive_at(0.1)


def test_a_report_without_reply_times_was_alive_at_no_moment():
    """Reports of an older client carry no reply_times: nothing is proven alive."""
    flow = flows.merge_reports({"flows": [client_flow("tcp-00", "tcp", True)]}, {})[0]
    assert flow.reply_times == ()
    assert not flow.was_alive_at(3.0)


def test_the_client_reports_every_reply_time():
    clock = flows.FlowClock(flows.FlowSpec("udp-00", "udp", "192.168.100.11", 40001),
                            started=0.0)
    clock.reply_times = [0.12345, 1.5]
    report = clock.report(end=2.0)
    assert report.reply_times == [0.123, 1.5]
    assert report.replies == 2 and report.last_reply_at == 1.5


def test_plan_adds_ping_sessions_and_the_flow_prefix():
    plan = flows.plan_flows(["10.0.0.1", "10.0.0.2"], 1, 0, 40001, icmp_flows=3,
                            flow_prefix="snat-")
    assert [(spec.flow_id, spec.client_address, spec.client_port) for spec in plan] == [
        ("snat-tcp-00", "10.0.0.1", 40001), ("snat-icmp-00", "10.0.0.1", 40001),
        ("snat-icmp-01", "10.0.0.2", 40001), ("snat-icmp-02", "10.0.0.1", 40002)]


def test_port_unreachable_quotes_the_datagram_with_valid_checksums():
    message = flows.port_unreachable("203.0.113.10", 52001, "203.0.113.100", 9000)
    assert message[:2] == bytes([3, 3])
    assert flows.checksum(message) == 0
    quoted = message[8:]
    assert flows.checksum(quoted[:20]) == 0
    assert socket.inet_ntoa(quoted[12:16]) == "203.0.113.10"
    assert socket.inet_ntoa(quoted[16:20]) == "203.0.113.100"
    assert struct.unpack("!HH", quoted[20:24]) == (52001, 9000)


def test_echo_request_sighting_reads_source_and_identifier():
    icmp = struct.pack("!BBHHH", 8, 0, 0, 4242, 7) + b"snat-icmp-03 7"
    packet = (bytes([0x45]) + bytes(11) + socket.inet_aton("203.0.113.10")
              + socket.inet_aton("203.0.113.100") + icmp)
    assert flows.echo_request_sighting(packet) == ("snat-icmp-03",
                                                   "203.0.113.10:4242")
    reply = packet[:20] + bytes([0]) + icmp[1:]
    assert flows.echo_request_sighting(reply) is None


def test_icmp_errors_received_reach_the_result():
    flow = dict(client_flow("udp-00", "udp", True),
                errors_received=[[2.5, "ConnectionRefusedError"]])
    result = flows.merge_reports({"flows": [flow]}, {})[0]
    assert result.errors_after(2.0) == ["ConnectionRefusedError"]
    assert result.errors_after(3.0) == []
