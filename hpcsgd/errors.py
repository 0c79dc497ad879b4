"""Every error hpcsgd raises on bad input names its cause; they all derive from HpcsgdError."""

from __future__ import annotations


class HpcsgdError(Exception):
    """Base class of hpcsgd's own errors."""


class ConfigError(HpcsgdError, ValueError):
    """A bad configuration value; the message names the key."""


class DataError(HpcsgdError):
    """A missing, unreadable or corrupt input file; the message names the file."""


class ParameterMismatchError(HpcsgdError, ValueError):
    """Ranks disagree on the parameter set, a shape or a dtype; names the parameter."""


class NonFiniteGradientError(HpcsgdError, FloatingPointError):
    """The averaged gradients contain inf or nan: training diverged.

    Raised identically on every rank (the reduced buffer is bitwise identical),
    so a caller that skips the step keeps all ranks in lock-step.
    """

    def __init__(self, message: str, count: int = 0, overflow: bool = False):
        super().__init__(message)
        self.count = count  # number of non-finite elements, when known
        self.overflow = overflow


class GradientOverflowError(NonFiniteGradientError):
    """Non-finite values after a float16 (or bfloat16) reduction: a wire-format overflow."""

    def __init__(self, message: str, count: int = 0):
        super().__init__(message, count=count, overflow=True)


class CheckpointError(HpcsgdError):
    """A checkpoint could not be written or failed its checksum; names the file."""
