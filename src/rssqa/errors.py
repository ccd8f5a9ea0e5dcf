"""The one exception type users see: a one-line message naming the file, key or sample at fault."""


class RSSQAError(Exception):
    """Bad input or configuration, reported as one line (the CLI prints it without a traceback)."""


class BadSample(RSSQAError):
    """One sample of a long job is unusable; the job skips it, counts it and goes on.

    Args:
        key: the sample's ``__key__``.
        source: the shard or file the sample came from.
        reason: what was wrong, in a few words.
    """

    def __init__(self, key: str, source: str, reason: str):
        self.key, self.source, self.reason = key, source, reason
        super().__init__(f"{source}: sample {key!r}: {reason}")
