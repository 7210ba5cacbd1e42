"""Errors a user can fix.

Everything raised as a :class:`DualStpmError` carries a message that names the file,
key or value at fault and says how to fix it. The CLI prints these messages without a
traceback; any other exception is a bug and keeps its traceback.
"""


NOT_DONE_EXIT = 3
"""The CLI's exit status for "judged, and the answer is no": not promoted (`promote`), a bound
crossed (`monitor`), verdicts not applied (`feedback apply`). 0 is yes, 2 an error (nothing judged)."""


class DualStpmError(Exception):
    """Base class of user-facing errors (printed by the CLI without a traceback)."""

    exit_code = 2  # of the CLI


class ConfigError(DualStpmError):
    """A bad `params.yaml` key or value, or a bad `--set` override."""


class DataError(DualStpmError):
    """An unreadable image, a missing mask, a bad dataset layout or a bad download."""


class NetworkError(DataError):
    """A download that failed for a while (no connection, a timeout, a server error): the
    one kind of data error worth retrying as is. The CLI exits with 75 (EX_TEMPFAIL)."""

    exit_code = 75


class WeightsError(DualStpmError):
    """Teacher weights that cannot be obtained or do not fit the architecture."""


class TrainingError(DualStpmError):
    """Training cannot go on (NaN loss, incompatible checkpoint to resume from)."""


class RunError(DualStpmError):
    """A run directory that is missing, incomplete or from an incompatible version."""


class TrackingError(DualStpmError):
    """The MLflow tracking store or registry cannot be reached or refuses a request."""


class PipelineError(DualStpmError):
    """Some categories of a pipeline run failed; the other categories' results were kept."""


class ExportError(DualStpmError):
    """An export or a backend that is not supported, missing or does not fit (names the fix)."""
