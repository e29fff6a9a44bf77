"""The two ways snat-sync fails, and the exit status each one gets."""


class SnatSyncError(Exception):
    """Something went wrong while acting on the system (exit status 1)."""

    exit_status = 1


class InvalidInput(SnatSyncError):
    """Input was rejected before anything was touched (exit status 2).

    The message names the field and the offending value.
    """

    exit_status = 2

    def __init__(self, field, value, reason):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r}: {reason}")
