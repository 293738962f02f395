class PayloadError(ValueError):
    """A message from a peer (or a user) that does not follow the wire contract.

    `reason` is a short machine-readable label (used in metrics and ban decisions); the message
    says what exactly was wrong so the sender can fix it.
    """

    REASONS = ("malformed", "codec", "dtype", "shape", "size", "nonfinite", "token_range",
               "version", "fingerprint", "method", "forbidden", "uid", "metadata", "banned", "deadline",
               "unavailable", "busy",
               "downstream")  # a later stage of the route failed: not this replica's fault, nor the caller's

    def __init__(self, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class RemoteError(RuntimeError):
    """The peer answered, and refused: `reason` says why (a PayloadError reason or "internal")."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class PeerUnavailable(ConnectionError):
    """The peer did not answer (gone, unreachable, or too slow)."""


class NoRoute(RuntimeError):
    """No replica of the next stage finished the call: `reason` is "deadline", "unavailable" (no usable
    replica of this hop's stage) or "downstream" (the replica says a later stage had none)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
