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


def brief(value, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters without building the whole repr: a value from a
    user's file may be a huge string or a YAML alias bomb that expands to billions of items."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."
