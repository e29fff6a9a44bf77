"""What happened to a router over time: its latest transitions and repairs, counters.

Two files in the router's directory (see statedir.RouterFiles):

    history.jsonl   one JSON object per line, oldest first: every transition (also
                    the superseded and already-done ones) and every repair, each
                    with "kind" "transition" or "repair"; only the newest `limit`
                    entries ([failover] history_size) are kept.
    counters.json   how many transitions and repairs ended how, and a histogram of
                    commit durations; the numbers only grow, so the metrics can
                    export them as Prometheus counters.

Both are replaced whole with statedir.write_atomically, never appended to: a
reader (or a crash) sees the old file or the new one, never half a line. Rewriting
a few hundred lines per transition costs about a millisecond, after the
transition's steps have run.

Writers hold the router's transition lock (failover.transition_lock), so there is
one writer at a time and read-modify-write needs no lock of its own.
"""

import collections
import json
import os
import stat

from snat_sync import statedir

# Buckets, in seconds, of the commit duration histogram; "+Inf" follows them.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0)
BUCKET_KEYS = (*(str(bound) for bound in COMMIT_BUCKETS), "+Inf")

# The step whose duration the histogram observes (failover.COMMIT.name), whether
# snat-sync ran it or the notify hook did.
COMMIT_STEP = "commit"
TRANSITION_ROLES = ("primary", "backup", "fault", "stop")
TRANSITION_OUTCOMES = ("done", "failed", "superseded", "already-done")

# A longer line is no line we wrote: skipped, like any other unreadable line.
MAX_LINE_BYTES = 1024 * 1024


def record_transition(files, record_dict, limit):
    """Add a transition (TransitionRecord.to_dict()) to the history and counters.

    The caller holds the router's transition lock.
    """
    _append(files, {"kind": "transition", **record_dict}, limit)
    counters = read_counters(files)
    _bump(counters["transitions"], record_dict["role"], record_dict["outcome"])
    seconds = commit_seconds(record_dict)
    if seconds is not None:
        observe(counters["commit_seconds"], seconds)
    statedir.write_json(files.counters, counters)


def record_repair(files, repair_dict, limit):
    """Add a repair to the history and count it by its name ("repair") and outcome.

    repair_dict holds at least repair, router, started, finished, outcome ("done" or
    "failed"), reason and steps (each {name, duration_ms, ok, error}). The caller
    holds the router's transition lock.
    """
    _append(files, {"kind": "repair", **repair_dict}, limit)
    counters = read_counters(files)
    _bump(counters["repairs"], repair_dict["repair"], repair_dict["outcome"])
    statedir.write_json(files.counters, counters)


def read_history(files, limit=None):
    """The newest `limit` entries (all without a limit), oldest first.

    A line that is not a JSON object, or is longer than MAX_LINE_BYTES, is skipped.
    """
    entries = collections.deque(maxlen=limit)
    for line in _lines(files.history):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return list(entries)


def zero_counters():
    """Counters of a router that has done nothing yet, every histogram bucket in."""
    return {
        "transitions": {role: dict.fromkeys(TRANSITION_OUTCOMES, 0)
                        for role in TRANSITION_ROLES},
        "repairs": {},
        "commit_seconds": {"buckets": dict.fromkeys(BUCKET_KEYS, 0), "sum": 0.0,
                           "count": 0},
    }


def read_counters(files):
    """The router's counters, in zero_counters()'s structure.

    An absent or unreadable file reads as zero_counters(); so does any part of it
    that does not have the expected shape. (Counters that start over from zero are
    what Prometheus knows as a counter reset.)
    """
    counters = zero_counters()
    stored = statedir.read_json(files.counters)
    if not isinstance(stored, dict):
        return counters
    for group in ("transitions", "repairs"):
        for name, outcomes in _items(stored.get(group)):
            for outcome, count in _items(outcomes):
                if _is_count(count):
                    counters[group].setdefault(name, {})[outcome] = count
    histogram = stored.get("commit_seconds")
    if isinstance(histogram, dict):
        buckets = histogram.get("buckets")
        total = histogram.get("sum")
        if (isinstance(buckets, dict) and set(buckets) == set(BUCKET_KEYS)
                and all(_is_count(count) for count in buckets.values())
                and _is_count(histogram.get("count"))
                and isinstance(total, (int, float)) and not isinstance(total, bool)):
            counters["commit_seconds"] = {
                "buckets": {key: buckets[key] for key in BUCKET_KEYS},
                "sum": float(total), "count": histogram["count"]}
    return counters


def commit_seconds(record_dict):
    """How long the transition's commit took, in seconds; None unless it ran ok."""
    for step in record_dict.get("steps") or ():
        if step.get("name") == COMMIT_STEP and step.get("ok"):
            return step["duration_ms"] / 1000
    return None


def observe(histogram, seconds):
    """Count seconds into a commit_seconds histogram; its buckets are cumulative."""
    for bound, key in zip(COMMIT_BUCKETS, BUCKET_KEYS):
        if seconds <= bound:
            histogram["buckets"][key] += 1
    histogram["buckets"]["+Inf"] += 1
    histogram["sum"] += seconds
    histogram["count"] += 1


def _append(files, entry, limit):
    entries = read_history(files, limit - 1) if limit > 1 else []
    lines = (json.dumps(each, sort_keys=True) + "\n" for each in [*entries, entry])
    statedir.write_atomically(files.history, "".join(lines))


def _bump(counts, name, outcome):
    outcomes = counts.setdefault(name, {})
    outcomes[outcome] = outcomes.get(outcome, 0) + 1


def _items(value):
    return value.items() if isinstance(value, dict) else ()


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _lines(path):
    """The lines of the regular file at path, each at most MAX_LINE_BYTES long.

    Like statedir.read_text, a symlink, FIFO or device is not read. The rest of an
    overlong line is skipped.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return
        overlong = False
        for line in iter(lambda: stream.readline(MAX_LINE_BYTES + 1), b""):
            ends = line.endswith(b"\n")
            if not overlong and (ends or len(line) <= MAX_LINE_BYTES):
                yield line
            overlong = not ends
