"""`snat-sync wait`: the decision, the loop on a fake clock, and the exit statuses."""

import types

import pytest

from snat_sync import cli
from snat_sync import manager
from snat_sync import statedir
from snat_sync import wait
from snat_sync.errors import InvalidInput
from snat_sync.router import RouterSpec


def status(router, verdict="in-sync", reason="replica holds 10 of the primary's 10"):
    return types.SimpleNamespace(router=router, verdict=verdict, reason=reason)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_done_only_when_every_router_is_in_sync():
    assert wait.decide([status("a"), status("b")]) == wait.Decision(True, ())
    decision = wait.decide([status("a"), status("b", "degraded", "resyncing, 1 of 9")])
    assert not decision.done
    assert decision.waiting == (("b", "degraded", "resyncing, 1 of 9"),)
    assert wait.decide([]).done  # no routers: nothing to wait for


def test_returns_at_the_first_poll_that_finds_them_in_sync():
    clock = FakeClock()
    polls = iter([[status("a", "degraded", "resyncing, 0 of 9")]] * 3
                 + [[status("a")]])
    printed = []
    assert wait.run(lambda: next(polls), 60, 0.25, clock, clock.sleep,
                    printed.append) == 0
    assert clock.sleeps == [0.25] * 3 and clock.now == 0.75
    assert printed == []


def test_times_out_naming_each_router_that_is_not_in_sync_and_why():
    clock = FakeClock()
    printed = []
    source = lambda: [status("a"), status("b", "degraded", "resyncing, 5 of 9"),  # noqa
                      status("c", "broken", "conntrackd is not running")]
    assert wait.run(source, 2, 0.5, clock, clock.sleep, printed.append) == 1
    assert clock.now == 2.0
    assert printed == ["b: degraded: resyncing, 5 of 9",
                       "c: broken: conntrackd is not running",
                       "snat-sync wait: 2 routers not in sync after 2 s"]


def test_the_last_sleep_ends_at_the_deadline():
    clock = FakeClock()
    wait.run(lambda: [status("a", "degraded", "x")], 1, 0.4, clock, clock.sleep,
             lambda line: None)
    assert clock.sleeps == [0.4, 0.4, pytest.approx(0.2)]


def test_a_zero_timeout_polls_once():
    clock = FakeClock()
    assert wait.run(lambda: [status("a", "degraded", "x")], 0, 1, clock,
                    clock.sleep, lambda line: None) == 1
    assert clock.sleeps == []


def test_the_source_asks_status_for_the_named_routers_with_a_short_timeout():
    asked = []

    def fake_status(conf, router_id=None, stats_timeout=None):
        asked.append((router_id, stats_timeout))
        if router_id == "nope":
            raise InvalidInput("router", router_id, "unknown here")
        return [status(router_id or "all")]

    source = wait.status_source("conf", ["a", "b", "a"], fake_status)
    assert [each.router for each in source()] == ["a", "b"]
    assert {timeout for _router, timeout in asked} == {wait.STATS_TIMEOUT}
    assert [each.router for each in wait.status_source("conf", [], fake_status)()] \
        == ["all"]
    with pytest.raises(InvalidInput):
        wait.status_source("conf", ["a", "nope"], fake_status)


# -- the command line -----------------------------------------------------------------


def run(state_path, *arguments):
    return cli.main(["--state-path", str(state_path), *arguments])


def add_router(state_path, name):
    spec = RouterSpec.create(name, f"qrouter-{name}", "ha-1a2b3c4d-5e",
                             "169.254.192.1", ["169.254.192.2"], 7)
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, spec.to_dict())


def test_cli_an_unknown_router_exits_2_naming_it(state_path, capsys):
    assert run(state_path, "wait", "nosuch", "--timeout", "1") == 2
    assert "nosuch" in capsys.readouterr().err


def test_cli_no_routers_is_in_sync_at_once(state_path):
    assert run(state_path, "wait", "--timeout", "5") == 0


def test_cli_a_router_that_is_not_in_sync_exits_1_with_its_reason(state_path,
                                                                   capsys):
    add_router(state_path, "r1")  # no namespace, no conntrackd: broken
    assert run(state_path, "wait", "r1", "--timeout", "0.3",
               "--interval", "0.1") == 1
    out = capsys.readouterr().out
    assert out.startswith("r1: broken: namespace qrouter-r1 does not exist")
    assert "1 router not in sync after 0.3 s" in out


def test_cli_exits_0_once_the_status_turns_in_sync(state_path, monkeypatch):
    add_router(state_path, "r1")
    verdicts = iter(["degraded", "degraded", "in-sync"])

    def fake_status(conf, router_id=None, read_addresses=True, stats_timeout=None):
        return [status("r1", next(verdicts, "in-sync"))]

    monkeypatch.setattr(manager, "status", fake_status)
    assert run(state_path, "wait", "r1", "--interval", "0.01") == 0
    assert next(verdicts, None) is None


@pytest.mark.parametrize("arguments", [["--timeout", "-1"], ["--interval", "0"],
                                       ["--timeout", "nan"]])
def test_cli_bad_timeouts_exit_2(state_path, arguments):
    assert run(state_path, "wait", *arguments) == 2
