"""Errors a user can fix. Each message names the problem and the fix; the CLI prints it in one line."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by input or setup rather than by a bug."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work."""


class AudioFormatError(UserError, ValueError):
    """Audio that cannot be used as given."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model file or checkpoint is missing, or not in the local cache while offline."""


class DependencyError(UserError, ImportError):
    """A package duplex needs is not installed, or is too old for the API duplex calls."""
