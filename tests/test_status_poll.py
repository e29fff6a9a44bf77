"""snat_sync.lab.status_poll's reading and arguments: pure, no root."""

from snat_sync.lab import status_poll


def test_a_reading_holds_the_status_or_why_there_is_none():
    assert status_poll.reading(5.0, 0, '[{"verdict": "in-sync"}]', "") == {
        "taken": 5.0, "exit": 0, "status": [{"verdict": "in-sync"}], "stderr": ""}
    failed = status_poll.reading(6.0, 2, "", "x" * 400 + "unknown here\n")
    assert failed["status"] is None and failed["exit"] == 2
    assert failed["stderr"].endswith("unknown here\n") and len(failed["stderr"]) == 300


def test_the_command_is_everything_after_the_double_dash():
    arguments = status_poll.parse_arguments(
        ["--output", "/tmp/s.json", "--interval", "0.25", "--", "--state-path", "/s",
         "status", "router-1", "--json"])
    assert arguments.interval == 0.25
    assert arguments.command == ["--state-path", "/s", "status", "router-1", "--json"]
