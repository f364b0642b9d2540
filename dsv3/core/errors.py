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


def read_document(path, error: type[Dsv3Error], what: str, language: str = "JSON", max_bytes: int | None = None,
                  hint: str = "", mapping: bool = True):
    """Read and parse a small UTF-8 JSON or YAML file a user gave us (a config.json, a tokenizer config, a
    profile), every way it can be wrong an `error` that names the file: too large (when `max_bytes`),
    not UTF-8, not valid `language`, nested too deeply, or (when `mapping`) not an object at the top.
    `what` names the document in messages ("a model config"); `hint` ends the syntax error ("; restore
    ..."). YAML: the safe loader (libyaml's when present, which bounds nesting); an empty file is {}."""
    from pathlib import Path
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise error(f"{path}: {size} bytes is too large for {what} (at most {max_bytes}); is it the right file?")
    if language == "YAML":
        import yaml
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        parse, syntax_error = (lambda text: yaml.load(text, Loader=loader) or {}), yaml.YAMLError
    else:
        import json
        # ValueError: JSONDecodeError, and what json.loads raises for an integer literal past Python's
        # 4300-digit conversion limit
        parse, syntax_error = json.loads, ValueError
    try:
        value = parse(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {what} is a UTF-8 {language} file") from e
    except RecursionError as e:
        raise error(f"{path}: {language} nested too deeply to be {what}") from e
    except syntax_error as e:
        raise error(f"{path}: not valid {language} ({brief(str(e), 300)}){hint}") from e
    if mapping and not isinstance(value, dict):
        raise error(f"{path}: expected a {language} object at the top level, got {type(value).__name__}")
    return value
