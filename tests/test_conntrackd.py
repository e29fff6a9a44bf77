"""conntrackd: the output and log parsers, and the commands sent to the daemon
(faked with pytest-subprocess; no real conntrackd runs)."""

import signal
import socket
import struct
import subprocess
import threading
import time

import psutil
import pytest

from snat_sync import conntrackd
from snat_sync.conntrackd import (CacheStats, CommitResult, Conntrackd,
                                  ConntrackdError, NetworkStats, QueueStats)
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.roles import Role

# conntrackd would make itself SCHED_RR 99 while it reads the table; without
# CAP_SYS_NICE it cannot.
WITHOUT_SYS_NICE = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice"]

CACHE_STATS = """\
cache:internal	active objects:		           0
	active/total entries:		           0/           0
	creation OK/failed:		           0/           0
		no memory available:	           0
		no space left in cache:	           0
	update OK/failed:		           0/           0
		entry not found:	           0
	deletion created/failed:	           0/           0
		entry not found:	           0

cache:external	active objects:		           1
	active/total entries:		           1/           1
	creation OK/failed:		           1/           0
		no memory available:	           0
		no space left in cache:	           0
	update OK/failed:		           0/           0
		entry not found:	           0
	deletion created/failed:	           0/           0
		entry not found:	           0
"""


def commit_block(committed, seconds, failed=None, time="20:13:56",
                 already_present=None):
    prefix = f"[Tue Nov 24 {time} 2026] (pid=3092) [notice] "
    lines = [f"{prefix}committing all external caches",
             f"{prefix}Committed {committed} new entries"]
    if already_present is not None:
        lines.append(f"{prefix}{already_present} entries ignored, already exist")
    if failed is not None:
        lines.append(f"{prefix}{failed} entries can't be committed")
    lines.append(f"{prefix}commit has taken {seconds} seconds")
    return "\n".join(lines) + "\n"


# -- parse_cache_stats --------------------------------------------------------------


def test_parse_cache_stats_of_real_output():
    assert conntrackd.parse_cache_stats(CACHE_STATS) == CacheStats(
        internal_active=0, external_active=1, internal_no_space=0, external_no_space=0)


def cache_stats_text(internal, internal_no_space, external, external_no_space):
    """`conntrackd -s cache` output, in the layout of CACHE_STATS."""
    def section(name, active, no_space):
        return (f"cache:{name}\tactive objects:\t\t{active:12d}\n"
                f"\tactive/total entries:\t\t{active:12d}/{active:12d}\n"
                f"\tcreation OK/failed:\t\t{active:12d}/{0:12d}\n"
                f"\t\tno memory available:\t{0:12d}\n"
                f"\t\tno space left in cache:\t{no_space:12d}\n"
                f"\tupdate OK/failed:\t\t{0:12d}/{0:12d}\n"
                f"\t\tentry not found:\t{0:12d}\n"
                f"\tdeletion created/failed:\t{0:12d}/{0:12d}\n"
                f"\t\tentry not found:\t{0:12d}\n")
    return (section("internal", internal, internal_no_space) + "\n"
            + section("external", external, external_no_space))


def test_parse_cache_stats_reports_dropped_entries_per_cache():
    assert cache_stats_text(0, 0, 1, 0) == CACHE_STATS  # same layout as the sample
    text = cache_stats_text(131072, 69000, 42, 5)
    assert conntrackd.parse_cache_stats(text) == CacheStats(131072, 42, 69000, 5)


def test_parse_cache_stats_of_nothing_is_zero():
    assert conntrackd.parse_cache_stats("") == CacheStats(0, 0, 0, 0)


# -- parse_network_stats, parse_queue_stats -------------------------------------------

# `conntrackd -s network` of a backup (conntrackd 1.4.7)
NETWORK_STATS = """\
network statistics:
	recv:
		Malformed messages:	                   0
		Wrong protocol version:	                   0
		Malformed header:	                   0
		Malformed payload:	                   0
		Bad message type:	                   0
		Truncated message:	                   0
		Bad message size:	                   0
	send:
		Malformed messages:	                   0

sequence tracking statistics:
	recv:
		Packets lost:		               20012
		Packets before:		                   0

UDP traffic (active device=ha-418ee3-r2):
                1424 Bytes sent              1778016 Bytes recv
                  36 Pckts sent                 1282 Pckts recv
                   0 Error send                    0 Error recv
"""

QUEUE_STATS = """\
allocated queue nodes:		           0

queue txqueue:
current elements:		           0
maximum elements:		  2147483647
not enough space errors:	           0

queue errorq:
current elements:		           5
maximum elements:		         128
not enough space errors:	           9

queue rsqueue:
current elements:		          17
maximum elements:		      524288
not enough space errors:	           2
"""


def test_parse_network_stats_of_real_output():
    assert conntrackd.parse_network_stats(NETWORK_STATS) == NetworkStats(
        packets_sent=36, packets_received=1282, bytes_sent=1424,
        bytes_received=1778016, send_errors=0, receive_errors=0,
        messages_lost=20012, messages_malformed=0)


def test_parse_network_stats_adds_up_every_malformed_counter():
    counters = ["Malformed messages", "Wrong protocol version", "Malformed header",
                "Malformed payload", "Bad message type", "Truncated message",
                "Bad message size"]
    text = NETWORK_STATS
    for value, name in enumerate(counters, start=1):  # recv: 1 + ... + 7 = 28
        text = text.replace(f"\t\t{name}:\t                   0",
                            f"\t\t{name}:\t                   {value}", 1)
    text = text.replace("\tsend:\n\t\tMalformed messages:\t                   0",
                        "\tsend:\n\t\tMalformed messages:\t                 100")
    assert conntrackd.parse_network_stats(text).messages_malformed == 128


def test_parse_network_stats_of_multicast_and_errors():
    text = NETWORK_STATS.replace("UDP traffic", "Multicast traffic").replace(
        "0 Error send                    0 Error recv",
        "3 Error send                    4 Error recv")
    stats = conntrackd.parse_network_stats(text)
    assert (stats.packets_sent, stats.send_errors, stats.receive_errors) == (36, 3, 4)


def test_parse_queue_stats_reads_the_resend_queue_only():
    assert conntrackd.parse_queue_stats(QUEUE_STATS) == QueueStats(
        resend_queue=17, resend_queue_max=524288, resend_queue_full_errors=2)


@pytest.mark.parametrize("text", ["", "garbage\n\x00\xff", "queue rsqueue:\n",
                                  NETWORK_STATS[:40], QUEUE_STATS[:60]])
def test_stats_parsers_read_garbage_as_zeros(text):
    assert conntrackd.parse_network_stats(text) == NetworkStats(0, 0, 0, 0, 0, 0, 0, 0)
    assert conntrackd.parse_queue_stats(text) == QueueStats(0, 0, 0)


def test_stats_parsers_refuse_huge_digit_runs():
    huge = "9" * 19
    network = NETWORK_STATS.replace("20012", huge).replace("1424 Bytes",
                                                           f"{huge} Bytes")
    stats = conntrackd.parse_network_stats(network)
    assert stats.messages_lost == 0
    assert stats.bytes_sent == stats.bytes_received == 0
    assert stats.packets_sent == 36  # the other lines still count
    queue = QUEUE_STATS.replace("          17", huge)
    assert conntrackd.parse_queue_stats(queue).resend_queue == 0
    eighteen = "9" * 18
    assert conntrackd.parse_queue_stats(
        QUEUE_STATS.replace("          17", eighteen)).resend_queue == int(eighteen)


# -- parse_last_commit --------------------------------------------------------------


def test_parse_last_commit_of_the_sample():
    assert conntrackd.parse_last_commit(commit_block(0, "0.000022")) == CommitResult(
        committed=0, already_present=0, failed=0, seconds=0.000022)


def test_parse_last_commit_takes_the_last_of_several():
    log = (commit_block(10, "0.000100", time="20:10:00")
           + "[Tue Nov 24 20:11:00 2026] (pid=3092) [notice] resync requested\n"
           + commit_block(99993, "0.461250", failed=7, time="20:12:00")
           + commit_block(123, "0.001500", time="20:13:00")
           + "[Tue Nov 24 20:13:01 2026] (pid=3092) [notice] flushing caches\n")
    assert conntrackd.parse_last_commit(log) == CommitResult(123, 0, 0, 0.0015)


def test_parse_last_commit_reports_entries_that_could_not_be_committed():
    log = commit_block(99993, "0.461250", failed=7)
    assert conntrackd.parse_last_commit(log) == CommitResult(99993, 0, 7, 0.46125)
    singular = log.replace("7 entries can't", "1 entry can't")
    assert conntrackd.parse_last_commit(singular).failed == 1


def test_parse_last_commit_counts_entries_already_present():
    log = commit_block(90, "0.001000", failed=3, already_present=7)
    assert conntrackd.parse_last_commit(log) == CommitResult(90, 7, 3, 0.001)
    singular = log.replace("7 entries ignored", "1 entry ignored")
    assert conntrackd.parse_last_commit(singular).already_present == 1


@pytest.mark.parametrize("line", [
    "7 entries updated, already exist",   # not the wording the regex knows
    "7 entries ignored",
    "entries ignored, already exist",
])
def test_parse_last_commit_ignores_other_already_present_wordings(line):
    """Only "N entr(y|ies) ignored, already exist" fills already_present.

    (conntrackd 1.4.7 logs no such line at all: it destroys and re-creates an
    entry that exists, and counts it as committed.)
    """
    log = commit_block(90, "0.001000") + f"[Tue Nov 24 20:13:56 2026] (pid=3092) " \
        f"[notice] {line}\n"
    assert conntrackd.parse_last_commit(log).already_present == 0


def test_parse_last_commit_counts_only_the_last_commits_already_present():
    log = (commit_block(1, "0.1", already_present=5, time="20:10:00")
           + commit_block(2, "0.2", time="20:11:00"))
    assert conntrackd.parse_last_commit(log) == CommitResult(2, 0, 0, 0.2)


@pytest.mark.parametrize("log", ["", "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] "
                                     "-- starting in daemon mode --\n"])
def test_parse_last_commit_without_a_commit(log):
    assert conntrackd.parse_last_commit(log) is None


def test_parse_last_commit_of_a_commit_still_running_or_truncated():
    earlier = commit_block(10, "0.000100", time="20:10:00")
    running = earlier + commit_block(5, "0.1").splitlines(keepends=True)[0]
    assert conntrackd.parse_last_commit(running) == CommitResult(None, 0, 0, None)
    cut = earlier + commit_block(5, "0.1")[:-len("0.1 seconds\n") - 20]
    result = conntrackd.parse_last_commit(cut)
    assert result.committed == 5
    assert result.seconds is None


# -- control requests ---------------------------------------------------------------


@pytest.fixture
def daemon(router_files):
    return Conntrackd(binary="/usr/sbin/conntrackd", namespace="qrouter-r1",
                      files=router_files, control_timeout=10, start_timeout=2,
                      stop_timeout=0.05, table_timeout=30)


def cmd(daemon, *arguments):
    return ["/usr/sbin/conntrackd", "-C", str(daemon.files.conntrackd_config),
            *arguments]


def test_command_names_the_routers_config(daemon):
    assert daemon.command("-s", "cache") == cmd(daemon, "-s", "cache")


def test_control_runs_exactly_one_command(daemon, fp):
    fp.register(cmd(daemon, "-c"), stdout="")
    result = daemon.control("-c", timeout=60)
    assert result.returncode == 0
    assert list(fp.calls) == [cmd(daemon, "-c")]


def test_control_passes_the_timeout(daemon, monkeypatch):
    seen = []

    def fake_run(command, **kwargs):
        seen.append((command, kwargs["timeout"]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(conntrackd.subprocess, "run", fake_run)
    daemon.control("-c", timeout=60)
    daemon.control("-f")
    assert seen == [(cmd(daemon, "-c"), 60), (cmd(daemon, "-f"), 10)]


def raise_timeout(process):
    raise subprocess.TimeoutExpired(process.args, 0.2)


def test_a_request_that_does_not_answer_becomes_a_conntrackd_error(daemon, fp):
    fp.register(cmd(daemon, "-c"), callback=raise_timeout)
    with pytest.raises(ConntrackdError) as caught:
        daemon.control("-c", timeout=0.2)
    assert str(caught.value) == "conntrackd -c did not answer within 0.2 s"
    assert isinstance(caught.value, SnatSyncError)


def test_an_unanswered_request_without_check_reads_as_exit_124(daemon, fp):
    fp.register(cmd(daemon, "-s", "cache"), callback=raise_timeout)
    result = daemon.control("-s", "cache", check=False)
    assert result.returncode == 124


def test_a_failed_request_names_it_and_says_why(daemon, fp):
    fp.register(cmd(daemon, "-f"), returncode=1,
                stderr="[ERROR] connect: No such file or directory\n"
                       "[ERROR] cannot connect to conntrackd\n")
    with pytest.raises(ConntrackdError) as caught:
        daemon.control("-f")
    message = str(caught.value)
    assert message.startswith("conntrackd -f failed (exit 1): ")
    assert "cannot connect to conntrackd" in message


def test_a_failed_request_without_check_returns_the_result(daemon, fp):
    fp.register(cmd(daemon, "-k"), returncode=1)
    assert daemon.control("-k", check=False).returncode == 1


def test_a_missing_binary_is_a_conntrackd_error(router_files, tmp_path):
    """A wrong [conntrackd] binary must fail like any other request (and so be
    recorded as a failed step), not escape as FileNotFoundError."""
    daemon = Conntrackd(binary=str(tmp_path / "no-such-conntrackd"),
                        namespace="qrouter-r1", files=router_files,
                        control_timeout=1, start_timeout=1, stop_timeout=1,
                        table_timeout=1)
    with pytest.raises(ConntrackdError, match="no-such-conntrackd"):
        daemon.control("-c")


# -- running a role's configuration ----------------------------------------------------


class RunAsJournal:
    """Stands in for the process: is_running, stop and start are recorded."""

    def __init__(self, monkeypatch, running):
        self.calls = []
        self.running = running
        monkeypatch.setattr(Conntrackd, "is_running", lambda daemon: self.running)
        monkeypatch.setattr(Conntrackd, "stop", lambda daemon: self.stop())
        monkeypatch.setattr(Conntrackd, "start",
                            lambda daemon, policy="other": self.start(daemon))

    def stop(self):
        self.calls.append("stop")
        self.running = False

    def start(self, daemon):
        self.calls.append(("start", daemon.files.conntrackd_config.read_text()))
        started, self.running = not self.running, True
        return started


@pytest.fixture
def variants(router_files):
    router_files.conntrackd_variant(Role.PRIMARY).write_text("# reads events\n")
    router_files.conntrackd_variant(Role.BACKUP).write_text("# reads none\n")
    return router_files


def test_run_as_restarts_conntrackd_with_the_roles_configuration(daemon, variants,
                                                                 monkeypatch):
    variants.conntrackd_config.write_text("# reads none\n")
    journal = RunAsJournal(monkeypatch, running=True)
    assert daemon.run_as(Role.PRIMARY) is True
    assert journal.calls == ["stop", ("start", "# reads events\n")]
    assert variants.conntrackd_config.read_text() == "# reads events\n"


def test_run_as_the_role_conntrackd_already_runs_changes_nothing(daemon, variants,
                                                                 monkeypatch):
    variants.conntrackd_config.write_text("# reads events\n")
    journal = RunAsJournal(monkeypatch, running=True)
    assert daemon.run_as(Role.PRIMARY) is False
    assert journal.calls == []


def test_run_as_starts_a_conntrackd_that_is_not_running(daemon, variants,
                                                        monkeypatch):
    variants.conntrackd_config.write_text("# reads events\n")
    journal = RunAsJournal(monkeypatch, running=False)
    assert daemon.run_as(Role.BACKUP) is True
    assert journal.calls == ["stop", ("start", "# reads none\n")]


def test_run_as_without_the_variant_names_it_and_touches_nothing(daemon, router_files,
                                                                 monkeypatch):
    router_files.conntrackd_config.write_text("# old\n")
    journal = RunAsJournal(monkeypatch, running=True)
    with pytest.raises(ConntrackdError, match=r"conntrackd\.backup\.conf is missing"):
        daemon.run_as(Role.BACKUP)
    assert journal.calls == []
    assert router_files.conntrackd_config.read_text() == "# old\n"


class FakeControlSocket:
    """conntrackd's control socket: answers each request code with the text of
    `answers` (or nothing), once per connection, then closes; records the codes."""

    def __init__(self, path, answers, delay=0.0):
        self.answers = answers
        self.delay = delay
        self.requests = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            with client:
                (code,) = struct.unpack("=i", client.recv(4))
                self.requests.append(code)
                time.sleep(self.delay)
                answer = self.answers.get(code, "")
                try:
                    client.sendall(answer.encode() if isinstance(answer, str)
                                   else answer)
                except OSError:  # the client gave up
                    pass

    def close(self):
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def control_socket(router_files):
    servers = []

    def serve(answers, delay=0.0):
        servers.append(FakeControlSocket(router_files.control_socket, answers, delay))
        return servers[-1]

    yield serve
    for server in servers:
        server.close()


def test_query_stats_sends_the_request_code_and_reads_to_the_end(router_files,
                                                                 control_socket):
    server = control_socket({28: NETWORK_STATS, 29: CACHE_STATS, 30: "runtime",
                             36: QUEUE_STATS})
    path = router_files.control_socket
    assert conntrackd.query_stats(path, "network", 5) == NETWORK_STATS
    assert conntrackd.query_stats(path, "cache", 5) == CACHE_STATS
    assert conntrackd.query_stats(path, "runtime", 5) == "runtime"
    assert conntrackd.query_stats(path, "queue", 5) == QUEUE_STATS
    assert server.requests == [28, 29, 30, 36]


def test_query_stats_of_a_daemon_that_is_not_there(router_files):
    assert conntrackd.query_stats(router_files.control_socket, "cache", 5) is None
    router_files.control_socket.write_text("")  # a stale file, no listener
    assert conntrackd.query_stats(router_files.control_socket, "cache", 5) is None


def test_query_stats_gives_up_at_the_timeout(router_files, control_socket):
    control_socket({29: CACHE_STATS}, delay=1)
    started = time.monotonic()
    assert conntrackd.query_stats(router_files.control_socket, "cache", 0.2) is None
    assert time.monotonic() - started < 1.5


def test_query_stats_refuses_an_endless_answer(router_files, control_socket):
    control_socket({29: b"x" * (conntrackd.MAX_STATS_SIZE + 1)})
    assert conntrackd.query_stats(router_files.control_socket, "cache", 5) is None


def test_query_stats_of_an_unknown_kind(router_files):
    with pytest.raises(InvalidInput, match="statistics kind"):
        conntrackd.query_stats(router_files.control_socket, "link; rm", 5)


def test_stats_and_cache_stats_ask_the_control_socket(daemon, control_socket, fp):
    server = control_socket({29: CACHE_STATS, 36: QUEUE_STATS})
    assert daemon.cache_stats() == CacheStats(0, 1, 0, 0)
    assert daemon.stats("queue") == QUEUE_STATS
    assert server.requests == [29, 36]
    assert list(fp.calls) == []  # no conntrackd -s forked


def test_cache_stats_of_a_daemon_that_does_not_answer(daemon):
    assert daemon.cache_stats() is None


def test_log_tail(daemon):
    assert daemon.log_tail() == "(no log)"
    daemon.files.log_file.write_text("".join(f"line {n}\n" for n in range(10)))
    assert daemon.log_tail(2) == "line 8 | line 9"


# -- lifecycle ------------------------------------------------------------------------


class FakeProcess:
    """Enough of a psutil.Process for start and stop."""

    def __init__(self, exits_on=("-k",)):
        self.pid = 4242
        self.exits_on = exits_on
        self.running = True
        self.signals = []

    def status(self):
        return psutil.STATUS_SLEEPING if self.running else psutil.STATUS_ZOMBIE

    def send_signal(self, number):
        self.signals.append(number)
        if number in self.exits_on:
            self.running = False

    def threads(self):
        return []


def leave_stale_files(files):
    files.lock_file.write_text("")
    files.control_socket.write_text("")


def test_start_cleans_up_daemonises_and_waits_for_an_answer(daemon, fp, monkeypatch):
    process = FakeProcess()
    found = []
    monkeypatch.setattr(conntrackd, "find_daemon",
                        lambda config, namespace: found[-1] if found else None)
    leave_stale_files(daemon.files)

    def daemonise(fake):
        # conntrackd would refuse to start with the old lock file still there
        assert not daemon.files.lock_file.exists()
        daemon.files.lock_file.write_text("")
        daemon.files.control_socket.write_text("")
        found.append(process)

    start = ["ip", "netns", "exec", "qrouter-r1", *WITHOUT_SYS_NICE, *cmd(daemon, "-d")]
    fp.register(start, callback=daemonise)
    fp.register(cmd(daemon, "-s", "cache"), stdout=CACHE_STATS)
    assert daemon.start() is True
    assert list(fp.calls) == [start, cmd(daemon, "-s", "cache")]


def test_start_keeps_the_capability_for_a_real_time_scheduler(daemon, fp, monkeypatch):
    process = FakeProcess()
    calls = iter([None, process])
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: next(calls, process))
    start = ["ip", "netns", "exec", "qrouter-r1", *cmd(daemon, "-d")]
    fp.register(start, callback=lambda fake: daemon.files.control_socket.write_text(""))
    fp.register(cmd(daemon, "-s", "cache"))
    assert daemon.start("rr") is True
    assert list(fp.calls)[0] == start


def test_start_does_nothing_when_already_running(daemon, fp, monkeypatch):
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: FakeProcess())
    assert daemon.start() is False
    assert list(fp.calls) == []


def test_start_failure_reports_conntrackds_complaint(daemon, fp, monkeypatch):
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: None)
    fp.register(["ip", "netns", "exec", "qrouter-r1", *WITHOUT_SYS_NICE, *cmd(daemon, "-d")],
                returncode=1,
                stderr="[ERROR] lockfile `x' exists, perhaps conntrackd already "
                       "running?\n")
    with pytest.raises(ConntrackdError) as caught:
        daemon.start()
    assert "failed to start (exit 1)" in str(caught.value)
    assert "perhaps conntrackd already running" in str(caught.value)


def test_start_that_never_daemonises(daemon, fp, monkeypatch):
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: None)
    fp.register(["ip", "netns", "exec", "qrouter-r1", *WITHOUT_SYS_NICE, *cmd(daemon, "-d")],
                callback=raise_timeout)
    with pytest.raises(ConntrackdError,
                       match=r"did not daemonise within 30 s \(table_timeout\)"):
        daemon.start()


def test_stop_asks_then_cleans_up(daemon, fp, monkeypatch):
    process = FakeProcess()
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: process)
    leave_stale_files(daemon.files)
    fp.register(cmd(daemon, "-k"),
                callback=lambda fake: setattr(process, "running", False))
    assert daemon.stop() is True
    assert list(fp.calls) == [cmd(daemon, "-k")]
    assert process.signals == []
    assert not daemon.files.lock_file.exists()
    assert not daemon.files.control_socket.exists()


def test_stop_escalates_to_sigterm_then_sigkill(daemon, fp, monkeypatch):
    stubborn = FakeProcess(exits_on=(signal.SIGKILL,))
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: stubborn)
    fp.register(cmd(daemon, "-k"), returncode=1)
    assert daemon.stop() is True
    assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL]


def test_stop_stops_escalating_once_it_exits(daemon, fp, monkeypatch):
    process = FakeProcess(exits_on=(signal.SIGTERM,))
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: process)
    fp.register(cmd(daemon, "-k"))
    daemon.stop()
    assert process.signals == [signal.SIGTERM]


def test_stop_when_not_running_only_cleans_up(daemon, fp, monkeypatch):
    monkeypatch.setattr(conntrackd, "find_daemon", lambda *_: None)
    leave_stale_files(daemon.files)
    assert daemon.stop() is False
    assert list(fp.calls) == []
    assert not daemon.files.lock_file.exists()


def test_remove_stale_files_removes_lock_and_socket_only(daemon):
    files = daemon.files
    leave_stale_files(files)
    files.conntrackd_config.write_text("General {\n}\n")
    files.log_file.write_text("log\n")
    daemon.remove_stale_files()
    assert not files.lock_file.exists()
    assert not files.control_socket.exists()
    assert files.conntrackd_config.exists() and files.log_file.exists()


def test_remove_stale_files_removes_a_dangling_symlink(daemon, tmp_path):
    daemon.files.control_socket.symlink_to(tmp_path / "gone")
    daemon.remove_stale_files()
    assert not daemon.files.control_socket.is_symlink()
    daemon.remove_stale_files()  # nothing left: no error
