"""The errors of `alexprep build-shards` that are the input's or the user's, not a bug: each one line.

The CLI prints them as `Error: ...` and exits 1. Their own module, so that sources, stores and the build
raise them without importing each other.
"""


class SourceError(Exception):
    """A source that cannot be opened or read as asked (nothing is written yet); the message says what to do."""


class FetchError(Exception):
    """A source file that could not be fetched or read mid-build; one line naming it (finished shards are kept)."""


class BuildError(Exception):
    """A build that cannot go ahead as asked (bad options, a folder that is not ours, a held lock)."""
