"""The per-router state directory: paths, socket length, atomic writes."""

import os
import stat

import pytest

from snat_sync import statedir
from snat_sync.errors import InvalidInput

SOCKET_SUFFIX = "/routers/r1/conntrackd.ctl"


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_router_files_paths(tmp_path):
    files = statedir.RouterFiles.under(tmp_path / "state", "r1")
    assert files.directory == tmp_path / "state" / "routers" / "r1"
    names = {
        "spec": "spec.json",
        "conntrackd_config": "conntrackd.conf",
        "lock_file": "conntrackd.lock",
        "control_socket": "conntrackd.ctl",
        "log_file": "conntrackd.log",
        "notify_hook": "notify.sh",
        "notify_log": "notify.log",
        "transition_lock": "transition.lock",
        "last_transition": "last-transition.json",
    }
    for attribute, name in names.items():
        assert getattr(files, attribute) == files.directory / name


def test_router_files_are_absolute_for_a_relative_state_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = statedir.RouterFiles.under("state", "r1")
    assert files.directory == tmp_path / "state" / "routers" / "r1"
    assert statedir.routers_directory("state") == tmp_path / "state" / "routers"


def state_path_of_socket_length(tmp_path, length, filler="x"):
    padding = length - len(os.fsencode(tmp_path)) - 1 - len(SOCKET_SUFFIX)
    assert padding >= 1, "tmp_path is too long for this test"
    return tmp_path / (filler * padding)


def test_socket_path_of_107_bytes_is_accepted(tmp_path):
    state = state_path_of_socket_length(tmp_path, 107)
    files = statedir.RouterFiles.under(state, "r1")
    assert len(os.fsencode(files.control_socket)) == 107
    files.check_socket_path()


def test_socket_path_over_107_bytes_is_rejected_naming_the_state_path(tmp_path):
    state = state_path_of_socket_length(tmp_path, 108)
    files = statedir.RouterFiles.under(state, "r1")
    with pytest.raises(InvalidInput) as caught:
        files.check_socket_path()
    assert caught.value.field == "state path"
    assert caught.value.value == str(state)
    assert "108 bytes" in str(caught.value)


def test_socket_path_length_counts_bytes_not_characters(tmp_path):
    # 'é' is two bytes: fewer than 107 characters, more than 107 bytes.
    state = state_path_of_socket_length(tmp_path, 107, filler="x")
    state = state.with_name("é" * (len(state.name) // 2 + 1))
    files = statedir.RouterFiles.under(state, "r1")
    assert len(str(files.control_socket)) <= 107
    with pytest.raises(InvalidInput, match="state path"):
        files.check_socket_path()


# -- write_atomically ---------------------------------------------------------------


def test_write_atomically_creates_a_0600_file(tmp_path):
    target = tmp_path / "conntrackd.conf"
    old_umask = os.umask(0o022)
    try:
        statedir.write_atomically(target, "General {\n}\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "General {\n}\n"
    assert mode(target) == 0o600
    assert os.listdir(tmp_path) == ["conntrackd.conf"]


def test_write_atomically_with_a_given_mode(tmp_path):
    target = tmp_path / "notify.sh"
    statedir.write_atomically(target, "#!/bin/bash\n", 0o700)
    assert mode(target) == 0o700


def test_write_atomically_replaces_the_file_and_its_mode(tmp_path):
    target = tmp_path / "spec.json"
    target.write_text("old content that is longer than the new one\n")
    target.chmod(0o644)
    inode = target.stat().st_ino
    statedir.write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert mode(target) == 0o600
    assert target.stat().st_ino != inode, "must be a rename, not an in-place write"
    assert os.listdir(tmp_path) == ["spec.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path, monkeypatch):
    target = tmp_path / "spec.json"
    target.write_text("old\n")

    def refuse(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statedir.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        statedir.write_atomically(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["spec.json"]


def test_a_failed_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "spec.json"
    with pytest.raises(TypeError):
        statedir.write_atomically(target, b"bytes are not text")
    assert os.listdir(tmp_path) == []


def test_json_round_trip(tmp_path):
    path = tmp_path / "last-transition.json"
    statedir.write_json(path, {"b": [1, 2.5], "a": None})
    assert statedir.read_json(path) == {"a": None, "b": [1, 2.5]}
    assert path.read_text().endswith("}\n")
    assert mode(path) == 0o600


def test_read_json_and_read_text_tolerate_missing_or_broken_files(tmp_path):
    assert statedir.read_json(tmp_path / "missing.json") is None
    assert statedir.read_text(tmp_path / "missing.log") is None
    broken = tmp_path / "broken.json"
    broken.write_text('{"half": ')
    assert statedir.read_json(broken) is None
    assert statedir.read_text(broken) == '{"half": '


# -- ensure_directory ---------------------------------------------------------------


def test_ensure_directory_creates_a_0700_directory(tmp_path):
    target = tmp_path / "state" / "routers" / "r1"
    old_umask = os.umask(0o022)
    try:
        statedir.ensure_directory(target)
    finally:
        os.umask(old_umask)
    assert target.is_dir()
    assert mode(target) == 0o700


def test_ensure_directory_creates_missing_parents_0700_too(tmp_path):
    """The docstring promises "path (and parents) as root-only directories"."""
    target = tmp_path / "state" / "routers" / "r1"
    old_umask = os.umask(0o022)
    try:
        statedir.ensure_directory(target)
    finally:
        os.umask(old_umask)
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "routers") == 0o700


def test_ensure_directory_tightens_an_existing_directory(tmp_path):
    target = tmp_path / "r1"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    statedir.ensure_directory(target)
    assert mode(target) == 0o700


def test_ensure_directory_refuses_a_symlinked_component(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(InvalidInput) as caught:
        statedir.ensure_directory(tmp_path / "state" / "routers" / "r1")
    assert caught.value.field == "state path"
    assert caught.value.value == str(tmp_path / "state")
    assert "symbolic link" in str(caught.value)
    assert os.listdir(real) == []


def test_ensure_directory_refuses_a_symlink_as_the_directory_itself(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    real.chmod(0o755)
    (tmp_path / "r1").symlink_to(real)
    with pytest.raises(InvalidInput, match="symbolic link"):
        statedir.ensure_directory(tmp_path / "r1")
    assert mode(real) == 0o755, "the link's target must not be chmod'ed"


def test_a_log_over_its_limit_is_copied_and_emptied_in_place(tmp_path):
    log = tmp_path / "conntrackd.log"
    log.write_text("old\n")
    assert not statedir.rotate_log(log, 100, 3)
    writer = open(log, "a")  # conntrackd keeps its log open with O_APPEND
    for generation in range(4):
        writer.write(f"generation {generation}\n" * 20)
        writer.flush()
        assert statedir.rotate_log(log, 100, 3)
        assert log.stat().st_size == 0
    writer.write("after\n")
    writer.flush()
    assert log.read_text() == "after\n"  # appended at the start, no hole
    assert (tmp_path / "conntrackd.log.1").read_text().startswith("generation 3")
    assert (tmp_path / "conntrackd.log.3").read_text().startswith("generation 1")
    assert not (tmp_path / "conntrackd.log.4").exists()
    assert oct((tmp_path / "conntrackd.log.1").stat().st_mode & 0o777) == "0o600"
    writer.close()


def test_a_missing_log_or_a_zero_limit_never_rotates(tmp_path):
    assert not statedir.rotate_log(tmp_path / "absent.log", 100, 3)
    log = tmp_path / "conntrackd.log"
    log.write_text("x" * 1000)
    assert not statedir.rotate_log(log, 0, 3)
