"""Command lines generated from a script's block of named constants, and clean failure.

Each script starts with UPPER_CASE constants (one comment each). ``config_from_constants``
turns them into ``--lower_case`` flags whose types are the constants' types (as
improved-diffusion's ``add_dict_to_argparser`` and nanoGPT's configurator do), applies a
named ``--preset`` first and explicit flags last, and rejects unknown or ill-typed flags.

Valid ranges are declared once, at the start of the constant's comment, and checked here for
every script before any work starts (``check_ranges``)::

    EMA_BETA = 0.995  # [0, 1) EMA decay ...                a number (or int) in the interval
    K_LIST = "5,20"  # list of ints in [1, inf): ...        comma-separated ints in the interval
    GUIDANCE = "1,3"  # list of numbers in (0, inf): ...    comma-separated numbers in the interval

Bounds are numbers, ``inf`` / ``-inf`` or ``2**N``; "(-inf, inf)" means any finite number.
Float flags are always finite (nan and inf are refused whatever the range). A constant a
script imports (``from statistical_auditing.sd_audits.data_flags import RESIZE``) has its range
declared in the module that defines it; an imported number without a declared range is
code, not a setting, and is no flag.

``InputError`` is what every script raises for bad input; ``run_main`` turns it into one
line on stderr and a non-zero exit instead of a traceback.
"""
from __future__ import annotations

import argparse
import ast
import errno
import importlib.util
import io
import math
import os
import re
import signal
import sys
import threading
import tokenize
from dataclasses import dataclass
from pathlib import Path
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
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


# ----------------------------------------------------------------------------- declared ranges
_BOUND = r"-?inf|2\*\*\d+|-?\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^(?:list of (?P<items>ints|numbers) in )?(?P<open>[\[(])\s*(?P<low>{_BOUND})\s*,\s*"
                    rf"(?P<high>{_BOUND})\s*(?P<close>[\])])")


def _bound(text: str) -> float | int:
    if text.lstrip("-") == "inf":
        return -math.inf if text.startswith("-") else math.inf
    if text.startswith("2**"):
        return 2 ** int(text[3:])
    try:
        return int(text.replace("_", ""))
    except ValueError:
        return float(text.replace("_", ""))


@dataclass(frozen=True)
class Range:
    """An interval a flag's value (or every item of a list flag) must lie in."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = False
    items: str | None = None  # None: a single value; "ints" / "numbers": a comma-separated list of them

    def __str__(self) -> str:
        def show(v: float) -> str:
            return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}" if isinstance(v, float) else (
                f"2**{v.bit_length() - 1}" if v >= 2 ** 20 and v & (v - 1) == 0 else str(v))
        return f"{'[' if self.low_closed else '('}{show(self.low)}, {show(self.high)}{']' if self.high_closed else ')'}"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def parse_range(comment: str) -> Range | None:
    """The range declared at the start of a constant's comment ("# [0, 1) EMA decay"), or None."""
    match = _RANGE.match(comment.lstrip("#").strip())
    if not match:
        return None
    return Range(_bound(match["low"]), _bound(match["high"]), match["open"] == "[", match["close"] == "]",
                 match["items"])


_DECLARATIONS: dict[str, tuple[dict[str, Range], dict[str, tuple[str, str]], set[str]]] = {}


def _declarations(path: str) -> tuple[dict[str, Range], dict[str, tuple[str, str]], set[str]]:
    """(NAME -> Range declared in the file, NAME -> (module, name) it imports, names it assigns)."""
    if path not in _DECLARATIONS:
        source = Path(path).read_text(encoding="utf-8")
        comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        ranges, imports, assigned = {}, {}, set()
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                assigned.add(name)
                declared = parse_range(comments.get(node.end_lineno, ""))
                if declared is not None:
                    ranges[name] = declared
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    imports[alias.asname or alias.name] = (node.module, alias.name)
        _DECLARATIONS[path] = (ranges, imports, assigned)
    return _DECLARATIONS[path]


def declared_range(path: str | None, name: str, depth: int = 0) -> Range | None:
    """The range of constant ``name`` of the module in ``path``, following ``from m import name``
    to the module that defines it."""
    if not path or depth > 5 or not path.endswith(".py"):
        return None
    ranges, imports, assigned = _declarations(path)
    if name in ranges or name in assigned:
        return ranges.get(name)
    if name in imports:
        module, original = imports[name]
        found = sys.modules.get(module)
        origin = getattr(found, "__file__", None)
        if origin is None:
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
            origin = spec.origin if spec else None
        return declared_range(origin, original, depth + 1)
    return None


class Constants(dict):
    """A script's flags (lower-case name -> default) and their declared ranges (``ranges``)."""

    ranges: dict[str, Range]


def constants_of(namespace: Mapping[str, Any]) -> Constants:
    """The UPPER_CASE int/float/str/bool constants of a module namespace, lower-cased, with the
    ranges their comments declare (``.ranges``). A constant the module imports is a flag only
    when it comes from a shared flag module (``*_flags``, e.g. data_flags.py) and, if a number,
    that module declares its range: one imported as code (``word_vectors.FEMALE_WORD``,
    ``pipeline.AUDIT_SAMPLER``) would be a flag that changes nothing."""
    path = namespace.get("__file__")
    _, imports, assigned = _declarations(path) if path and str(path).endswith(".py") else ({}, {}, None)
    constants, ranges = Constants(), {}
    for key, value in namespace.items():
        if not (key.isupper() and not key.startswith("_") and isinstance(value, (bool, int, float, str))):
            continue
        declared = declared_range(path, key)
        if assigned is not None and key not in assigned:  # imported (no source file: every constant is a flag)
            from_flag_module = imports.get(key, ("", ""))[0].endswith("_flags")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not from_flag_module or (numeric and declared is None):
                continue
        constants[key.lower()] = value
        if declared is not None:
            ranges[key.lower()] = declared
    constants.ranges = ranges
    return constants


def parse_number_list(text: str, flag: str, kind: type = float, declared: Range | None = None) -> list:
    """The items of a comma-separated list flag, in order, as ``kind`` (int or float); an empty
    list or item, a non-number, a non-finite number or one outside ``declared`` raises
    InputError naming the flag."""
    noun = "ints" if kind is int else "numbers"
    expected = f"--{flag}: expected a comma-separated list of {noun}" + (f" in {declared}" if declared else "")
    if not text.strip():
        raise InputError(f"{expected}, got {text!r}")
    values = []
    for position, item in enumerate((part.strip() for part in text.split(",")), start=1):
        if not item:
            raise InputError(f"{expected}, got {text!r} (item {position} is empty)")
        try:
            value = kind(item)
        except ValueError:
            raise InputError(f"{expected}, got {text!r} (item {position}, {item!r}, is not "
                             f"{'an integer' if kind is int else 'a number'})") from None
        if not math.isfinite(value):
            raise InputError(f"{expected}, got {text!r} (item {position}, {item!r}, is not a finite number)")
        if declared is not None and not declared.contains(value):
            raise InputError(f"{expected}, got {text!r} (item {position}, {item}, is outside {declared})")
        values.append(value)
    return values


def parse_distinct_numbers(text: str, flag: str, kind: type = float, declared: Range | None = None) -> list:
    """``parse_number_list`` with repeats dropped: the distinct items in the order given (a list
    of k values or guidance scales measures each once)."""
    return list(dict.fromkeys(parse_number_list(text, flag, kind, declared)))


def check_ranges(config: Mapping[str, Any], ranges: Mapping[str, Range], defaults: Mapping[str, Any] | None = None
                 ) -> None:
    """Every value of ``config`` in its declared range (a list flag: every item), else InputError
    ``--name: expected a value in [0, 1), got 2``. An empty list flag passes only where its
    default (in ``defaults``) is empty too."""
    for name, declared in ranges.items():
        if name not in config:
            continue
        value = config[name]
        if declared.items is not None:
            if isinstance(value, str) and not (value.strip() == "" and defaults is not None
                                               and str(defaults.get(name, "x")).strip() == ""):
                parse_number_list(value, name, int if declared.items == "ints" else float, declared)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"--{name}: expected a number in {declared}, got {value!r}")
        if not declared.contains(value):
            raise InputError(f"--{name}: expected a value in {declared}, got {value:g}" if isinstance(value, float)
                             else f"--{name}: expected a value in {declared}, got {value}")


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
    names of the flags given on the command line are returned too. The ranges ``constants``
    carries (``constants_of``) are checked on the result, so a bad value stops here.
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
    check_ranges(config, getattr(constants, "ranges", {}), constants)
    return (config, explicit) if return_explicit else config


def require(condition: bool, message: str) -> None:
    """Raise ``InputError(message)`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


INTERRUPTED = "interrupted"  # what run_main says on Ctrl-C unless the script says how to continue


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[], Any], on_interrupt: str = INTERRUPTED) -> None:
    """Run a script's main; bad input ends with one stderr line and exit status 2, and so does a
    file the machine refuses to write mid-run (disk full, quota, read-only, permission) or an
    allocation that fails (the scripts refuse what cannot fit before any work with lower-bound
    estimates, which cannot foresee every case). On Ctrl-C, or SIGTERM (``kill``, a batch
    scheduler's stop; a background job never sees Ctrl-C, its shell ignores SIGINT for it), it
    prints ``on_interrupt`` (a script that resumes says how) and exits with status 130."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as error:
        if not (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
                or "can't allocate memory" in str(error)):
            raise
        detail = " ".join(str(error).split())[:200]
        print(f"error: out of memory ({type(error).__name__}{': ' + detail if detail else ''}); ask for less "
              f"(a smaller --batch_size or fewer images)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        sys.exit(130)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def parse_shard(text: str) -> tuple[int, int]:
    """--shard "i/n" -> (i, n); empty = RANK / WORLD_SIZE of a torchrun-style launch, else (0, 1)."""
    if not text:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    require(count >= 1 and 0 <= index < count, f"--shard: need 0 <= i < n, got {text!r}")
    return index, count
