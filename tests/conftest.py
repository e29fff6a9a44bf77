"""Shared fixtures: a real oslo ConfigOpts, a router's files, a sample router spec.

Everything lives under pytest's tmp_path; nothing here needs root, a namespace or
a real conntrackd.
"""

import pytest

from snat_sync import cli
from snat_sync import options
from snat_sync import statedir
from snat_sync import table_transfer
from snat_sync.router import RouterSpec


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch):
    """Never let /etc/snat-sync or ~/.snat-sync leak into a test."""
    monkeypatch.setattr(cli, "_default_config_files", lambda: [])


@pytest.fixture
def state_path(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def write_config(tmp_path):
    """Write a snat-sync config file; returns its path."""
    counter = iter(range(1000))

    def write(text, name=None):
        path = tmp_path / (name or f"snat-sync-{next(counter)}.conf")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


@pytest.fixture
def make_conf(state_path):
    """Build the CLI's ConfigOpts and load it exactly as `snat-sync status` would."""

    def make(*config_files, extra=()):
        conf = cli.build_conf()
        argv = []
        for path in config_files:
            argv += ["--config-file", str(path)]
        argv += ["--state-path", str(state_path), *extra, "status"]
        options.load(conf, argv, default_config_files=[])
        return conf

    return make


@pytest.fixture
def conf(make_conf):
    return make_conf()


@pytest.fixture
def spec():
    return RouterSpec.create(
        "r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1", ["169.254.192.2"], 7
    )


@pytest.fixture
def router_files(state_path):
    """RouterFiles of router r1, with its directory created."""
    files = statedir.RouterFiles.under(state_path, "r1")
    statedir.ensure_directory(files.directory)
    return files



@pytest.fixture
def events_reading_backup_conf(make_conf, write_config):
    """Warm standby whose backups' conntrackd reads conntrack events, as a primary's
    does: one conntrackd configuration for both roles."""
    return make_conf(write_config("[failover]\nbackup_reads_events = true\n"))


@pytest.fixture
def cold_conf(make_conf, write_config):
    """The options with cold standby, for what only it has: the commit, the guard."""
    return make_conf(write_config("[failover]\nstandby_mode = cold\n"))


@pytest.fixture
def no_table_server(monkeypatch):
    """No peer's daemon serves the table (unit tests open no sockets): a warm
    backup's resync falls back to conntrackd's -n. The peers asked, in order."""
    asked = []

    def refuse(spec, peer, port):
        asked.append((peer, port))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(table_transfer, "fetch", refuse)
    return asked
