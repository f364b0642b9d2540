"""User-facing errors: each says what is wrong and what to do next.

The CLI prints `error: <message>` for these and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class Dsv3Error(Exception):
    """Base for every error a user can cause (bad file, bad flag, bad profile)."""


class ConfigError(Dsv3Error):
    """config.json describes a model this runtime cannot run."""


class CheckpointError(Dsv3Error):
    """A checkpoint file is missing, malformed, or does not match config.json."""


class ProfileError(Dsv3Error):
    """A YAML profile or a CLI override is invalid."""


class PluginError(Dsv3Error):
    """A backend plugin failed to load or declared something inconsistent."""


class RequestError(Dsv3Error):
    """A generation request cannot be served (e.g. the prompt is longer than the context)."""
