"""gin configuration, T5X style: --gin_file (repeatable) and --gin.NAME=VALUE overrides.

Every mistake in a config is turned into a one-line UserError naming the file or binding.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tokenize
import types
import typing
from collections.abc import Sequence

import gin

from safejax import errors

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # shipped in the package


def register_configurables() -> None:
    """Imports every module that defines gin configurables, so bindings can name them."""
    from safejax import parallel  # noqa: F401
    from safejax.data import pipeline, tasks  # noqa: F401
    from safejax.evals import gsm8k  # noqa: F401
    from safejax.models import decoder  # noqa: F401
    from safejax.train import finetune, optim, trainer  # noqa: F401


def _find(path: str) -> str:
    for candidate in (path, os.path.join(CONFIG_DIR, path)):
        if os.path.isfile(candidate):
            return candidate
    raise errors.UserError(f"gin file not found: {path}")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files then bindings (later ones win). Raises UserError on any mistake."""
    register_configurables()
    gin.clear_config()
    prefixes = gin.config._LOCATION_PREFIXES  # noqa: SLF001 (gin has no API to order search paths)
    if CONFIG_DIR not in prefixes:
        prefixes.insert(0, CONFIG_DIR)  # first, so includes do not log a miss in the cwd
    files = [os.path.abspath(_find(f)) for f in gin_files]
    for path in files:
        try:
            gin.parse_config_file(path)
        except (ValueError, KeyError, SyntaxError, OSError, TypeError, tokenize.TokenError) as e:
            raise errors.UserError(f"in gin file {path}: {_one_line(e)}") from e
    defined = _macros(gin.config_str())
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except tokenize.TokenError as e:  # an unclosed bracket or quote: `--gin.TRAIN_STEPS=[1`
            raise errors.UserError(f"in binding '{binding}': unparsable value ({e.args[0]})") from e
        except (ValueError, KeyError, SyntaxError, TypeError) as e:
            raise errors.UserError(f"in binding '{binding}': {_one_line(e)}") from e
    _check_new_macros_are_read(bindings, defined)


def _macros(text: str) -> set[str]:
    """Names of the macros a gin config string defines (its top-level `NAME = value` lines)."""
    return set(re.findall(r"(?m)^([A-Za-z_][A-Za-z0-9_]*) = ", text))


def _check_new_macros_are_read(bindings: Sequence[str], defined: set[str]) -> None:
    """A binding that makes up a macro no gin file defines and nothing reads (a misspelt
    --gin.TRAIN_STEP=5) would be silently ignored by gin: it is an error with a did-you-mean."""
    text = gin.config_str()
    used = set(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)", text))
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in defined | used:
            close = difflib.get_close_matches(name, sorted(defined | used), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise errors.UserError(f"in binding '{binding}': no gin file defines or reads the macro {name}{hint}")


def _matches(value, hint) -> bool | None:
    """Whether `value` is of the simple type `hint` (None: a type this check leaves alone)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) is not False for arg in typing.get_args(hint))
    return None


def check_types(config) -> None:
    """One-line UserError for a field of a config dataclass whose value is not of its declared
    simple type (`--gin.DecoderConfig.d_model="'abc'"`), called from the configs' __post_init__
    so a wrong type fails where the config is made, naming it, not in a traceback later."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _matches(value, hints.get(field.name)) is False:
            raise errors.UserError(f"{type(config).__name__}.{field.name} must be of type "
                                   f"{getattr(hints[field.name], '__name__', hints[field.name])}, got {value!r}")


def split_gin_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` arguments (as gin bindings) from the rest."""
    bindings, rest = [], []
    for arg in args:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin."):].partition("=")
            if not sep or not name:
                raise errors.UserError(f"expected --gin.NAME=VALUE, got {arg!r}")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


def flag_bindings(args, bindings_of: dict[str, str]) -> list[str]:
    """gin bindings for the command-line flags that were given: flag name -> the parameter it
    sets (a flag left at None is not given, and the gin files' value stands)."""
    return [f"{binding} = {getattr(args, name)!r}" for name, binding in bindings_of.items()
            if getattr(args, name) is not None]


def write_effective_config(workdir: str) -> str:
    """WORKDIR/config.gin; a workdir that cannot be written is a one-line error (the first write)."""
    path = os.path.join(workdir, "config.gin")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(gin.config_str())
    except OSError as e:
        raise errors.UserError(f"cannot write the workdir {workdir}: {e.strerror} ({e.filename or path})") from e
    return path
