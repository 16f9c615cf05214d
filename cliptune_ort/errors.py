"""Typed errors for cliptune-ort.

Every error the package raises on purpose derives from :class:`CliptuneError`. The CLI catches that
base class, prints the one-line message and exits with status 2. Each message states what was
expected, what was found and how to fix it.
"""

from __future__ import annotations


class CliptuneError(Exception):
    """Base class of every deliberate cliptune error (CLI exit status 2)."""

    exit_code = 2


class ConfigError(CliptuneError):
    """A configuration value (CLI flag, config file, run dir) is invalid."""


class TaskError(CliptuneError):
    """An unknown task, or a task/template/verbalizer that does not fit the tokenizer."""


class DataError(CliptuneError):
    """A data file or split is missing, empty or malformed."""


class ModelDirError(CliptuneError):
    """A model directory is missing, incomplete or not one this version can read."""


class IntegrityError(ModelDirError):
    """A file does not match the sha256 its manifest pins, or files from different exports are mixed."""


class ProviderError(CliptuneError):
    """The asked-for ONNX Runtime execution provider cannot be used."""


class NumericError(CliptuneError):
    """A loss became NaN or inf; the offending candidate is saved."""


class CheckpointError(CliptuneError):
    """A checkpoint cannot be used to resume this run."""
