"""Errors a person can act on.

Every error that the CLI turns into exit code 2 with one short message derives from
`UserError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_REQUEUE = 75
"""The exit code of a run stopped by the requeue signal after its checkpoint (EX_TEMPFAIL of
sysexits.h: try again later): a batch script requeues the job on it (docs/cluster.md)."""


class UserError(Exception):
    """A problem with the user's input (config, data, workdir): exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A configuration that is wrong: a gin file or override that does not parse or resolve, or
    a value a plugin refuses.

    The one exception type plugins raise for their own parameters, in their constructor (or when
    the stage builds them from the data), naming the parameter as `kind.name.param`:

        raise ConfigError(f"datasets.image_folder.resolution must be >= 1; got {resolution}")

    `ulframe` then prints one line with the file:line that binds the parameter (or the plugin's
    name when the message does not name it); any other exception is a bug and keeps its
    traceback. A `ValueError` too, for callers that catch those.
    """


class PluginError(UserError):
    """A plugin that cannot be found, loaded, or does not provide its kind's protocol."""


class ContractError(PluginError):
    """A plugin's product returned what its kind's contract forbids (a dataset's example that
    is not a float32 C×H×W tensor in [-1, 1], a weighting that is nan): the message names the
    plugin, what it returned and what is expected, as `who` followed by `said`.

    The layer that checks (`ulframe.data`, `ulframe.diffusion`) sees the product, not the
    plugin: it names the product by its class (`who`) and passes the plugin's `kind` and the
    `product`. The engine, which knows the registry, puts the plugin's name in place of `who`
    (`ulframe.registry.naming_plugins`)."""

    def __init__(self, who: str, said: str = "", kind: str = "", product: object = None) -> None:
        super().__init__(f"{who}{said}")
        self.who, self.said, self.kind, self.product = who, said, kind, product


class DataError(UserError):
    """A dataset that is missing, empty or unreadable."""


class WorkdirError(UserError):
    """A workdir that cannot be written."""
