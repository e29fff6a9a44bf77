"""Demotion while resyncing: a keepalived track file that lowers a node's priority
while its replica is incomplete ([failover] demote_while_resyncing).

For keepalived set-ups that preempt (Neutron's use nopreempt and need none of
this): a node that returns with the higher priority would take the addresses
back as soon as keepalived runs, while its replica, emptied when it became
backup (warm standby), is still growing from 0. The router's directory holds
`demotion`, an integer keepalived reads whenever it changes (track_file): 1 while
this node is not primary and its replica is incomplete or not yet known, 0
otherwise. keepalived adds value x weight to the priority; the weight is
negative, so a demoted node still becomes primary when it is alone (weight 0
would put it into FAULT instead and could leave no primary at all).

Like pfsync, which demotes CARP for its bulk update on boot and gives up after a
bounded time, the demotion is lifted after [failover] demotion_timeout seconds
since the node became backup, complete or not.

Who writes it: the backup transition sets 1 as its first step and the primary
transition 0 (failover.plan), so a returning node is demoted from its first
BACKUP moment; the node daemon's health check rewrites it when the decision
changes (health_check.py). `decide` is pure; `read` and `write` are the file.
"""

from snat_sync import statedir

DEMOTED = 1
NOT_DEMOTED = 0


def decide(role, replica, backup_since, now, timeout):
    """DEMOTED or NOT_DEMOTED.

    role: "primary", "backup", ... (the last transition's); replica: the
    health.Replica of this node (its problem is None when the replica is
    complete); backup_since: when the node left the primary role (the last
    transition's arrival), None if unknown; timeout: demotion_timeout.
    A primary never demotes itself.
    """
    if role == "primary":
        return NOT_DEMOTED
    if backup_since is not None and now - backup_since >= timeout:
        return NOT_DEMOTED
    if replica is not None and replica.problem is None:
        return NOT_DEMOTED
    return DEMOTED


def read(path):
    """The value in the demotion file; None if it is missing or not 0 or 1."""
    text = statedir.read_text(path)
    value = text.strip() if text is not None else None
    return int(value) if value in ("0", "1") else None


def write(path, value):
    """Replace the demotion file with value, atomically (keepalived reads the file
    when it is renamed into place)."""
    statedir.write_atomically(path, f"{int(value)}\n", 0o600)
