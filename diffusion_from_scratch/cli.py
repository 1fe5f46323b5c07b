"""Command lines generated from a script's block of named constants, and clean failure.

Each script starts with UPPER_CASE constants (one comment each). ``config_from_constants``
turns them into ``--lower_case`` flags whose types are the constants' types (as
improved-diffusion's ``add_dict_to_argparser`` and nanoGPT's configurator do), applies a
named ``--preset`` first and explicit flags last, and rejects unknown or ill-typed flags.

``InputError`` is what every script raises for bad input; ``run_main`` turns it into one
line on stderr and a non-zero exit instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Mapping


class InputError(Exception):
    """Bad user input (a path, a flag, a file's content). The message names what and why."""


def _str2bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _typed(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse type that names the flag and the expected type on failure."""
    if kind is bool:
        return _str2bool

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__
    return convert


def constants_of(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The UPPER_CASE int/float/str/bool constants of a module namespace, lower-cased."""
    return {
        key.lower(): value
        for key, value in namespace.items()
        if key.isupper() and not key.startswith("_") and isinstance(value, (bool, int, float, str))
    }


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError (one clear line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def config_from_constants(
    constants: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    argv: list[str] | None = None,
    description: str | None = None,
    choices: Mapping[str, tuple] | None = None,
    return_explicit: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], set[str]]:
    """Parse ``argv`` into a config dict: constants, then ``--preset``, then explicit flags.

    ``constants`` maps lower-case names to defaults; a flag's type is its default's type.
    ``presets`` maps a preset name to overrides (keys must be known constants).
    ``choices`` restricts some flags to a fixed set of values. With ``return_explicit`` the
    names of the flags given on the command line are returned too.
    """
    presets = dict(presets or {})
    choices = dict(choices or {})
    parser = _Parser(description=description, allow_abbrev=False)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="named preset applied before the explicit flags")
    for name, default in constants.items():
        if name == "preset":
            continue
        kind = type(default)
        parser.add_argument(f"--{name}", type=_typed(kind, name), default=None,
                            choices=choices.get(name), metavar=kind.__name__.upper(),
                            help=f"default: {default!r}")
    args = parser.parse_args(argv)
    config = dict(constants)
    preset_name = getattr(args, "preset", None) or constants.get("preset")
    if presets and preset_name:
        if preset_name not in presets:
            raise InputError(f"--preset: unknown preset {preset_name!r}; expected one of {sorted(presets)}")
        for key, value in presets[preset_name].items():
            if key not in constants:
                raise InputError(f"preset {preset_name!r} sets unknown key {key!r}")
            if type(value) is not type(constants[key]) and not (
                isinstance(value, int) and isinstance(constants[key], float)
            ):
                raise InputError(f"preset {preset_name!r}: {key} must be {type(constants[key]).__name__}")
            config[key] = value
        config["preset"] = preset_name
    explicit = set()
    for name in constants:
        value = getattr(args, name, None)
        if value is not None and name != "preset":
            config[name] = value
            explicit.add(name)
    return (config, explicit) if return_explicit else config


def require(condition: bool, message: str) -> None:
    """Raise ``InputError(message)`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main; bad input ends with one stderr line and exit status 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
