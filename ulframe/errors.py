"""Errors a person can act on.

Every error that the CLI turns into exit code 2 with one short message derives from
`UserError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, data, workdir): exit code 2, no traceback."""


class ConfigError(UserError):
    """A gin file or override that does not parse or does not resolve."""


class PluginError(UserError):
    """A plugin that cannot be found, loaded, or does not provide its kind's protocol."""


class DataError(UserError):
    """A dataset that is missing, empty or unreadable."""


class WorkdirError(UserError):
    """A workdir that cannot be written."""
