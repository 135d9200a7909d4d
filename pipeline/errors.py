"""Small exception hierarchy. Every message is one line naming the offending file/value and the fix.

The CLI maps :class:`PipelineError` subclasses to exit codes (see ``EXIT_CODES``) and prints
``cellsam: error: <message>`` on stderr without a traceback (unless ``--debug``).
"""


class PipelineError(Exception):
    """Base class for all expected, user-facing errors."""

    exit_code = 1


class InputError(PipelineError):
    """A missing/unreadable input file or a bad argument value."""

    exit_code = 2


class SlideReadError(InputError):
    """A slide that cannot be opened or read (corrupt, unsupported, missing µm/px)."""

    exit_code = 3


class ConfigError(PipelineError):
    """An invalid configuration value or sample sheet."""

    exit_code = 4


class ModelError(PipelineError):
    """A missing, corrupt or incompatible model checkpoint."""

    exit_code = 5


class StoreError(PipelineError):
    """A missing, incomplete or incompatible OME-Zarr tile store."""

    exit_code = 6


class StitchError(PipelineError):
    """A violated stitching precondition (e.g. halo smaller than the largest nucleus)."""

    exit_code = 7


class OutputError(PipelineError):
    """An output that cannot be written (unwritable directory, disk full)."""

    exit_code = 8
