"""Strict command lines: every flag checked against the command function's signature before any work.

The command functions in `cli/main.py` are the single source of truth: their parameters are the
flags (written in kebab-case, `--calib-samples`), their type annotations say how a value is read,
and their Google-style docstrings are the `--help` text. `parse` turns argv into the function's
arguments or raises a LiteError naming the bad flag or value (and the closest valid flag for a
typo); `render_help` prints the help.

Values: `bool` flags take nothing (`--no-smooth`), or one of true/false/yes/no/1/0 in any case
(`--no-smooth=false`, `--no-smooth no`); `int` and `float` flags take numbers; `int | str` and
`float | str` take a number or a word the command checks (`--batch-size auto`, `--alpha auto`);
`str` flags take the text as typed. A repeated flag keeps its last value (so that command-line
flags win over a recipe's, which come first).
"""

import difflib
import inspect
import textwrap
import typing

from lite.errors import LiteError

BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
HELP = ("--help", "-h")
# Flags every command takes, handled by `cli/main.py` itself.
GLOBAL_FLAGS = {"verbose": "also print the time each part of the run took.",
                "debug": "print the Python traceback of an error (as does LITE_DEBUG=1)."}


def kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_params(fn) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _positional_params(fn) -> list[inspect.Parameter]:
    """Parameters given without a flag: those without a default, and `*models`."""
    return [p for p in inspect.signature(fn).parameters.values()
            if p.kind == p.VAR_POSITIONAL or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty)]


def parse_bool(flag: str, text: str) -> bool:
    value = BOOLEANS.get(str(text).strip().lower())
    if value is None:
        raise LiteError(f"{flag} takes true/false/yes/no/1/0, got {text!r}")
    return value


def _convert(flag: str, text: str, annotation) -> object:
    """`text` read as `annotation` (bool, int, float, str, or a union of a number type and str)."""
    kinds = typing.get_args(annotation) or (annotation,)
    for kind in kinds:
        if kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                pass
    if str in kinds:
        return text
    expected = " or ".join({int: "an integer", float: "a number"}[k] for k in kinds)
    raise LiteError(f"{flag} expects {expected}, got {text!r}")


def _suggestion(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {kebab(close[0])}?" if close else ""


def parse(command: str, fn, args: list[str]) -> tuple[list[str], dict, set[str]]:
    """(positional arguments, keyword arguments, global flags given) for `fn` from `args`.

    Raises a LiteError for an unknown flag, a missing or malformed value, or a wrong number of
    positional arguments.
    """
    params, hints = _flag_params(fn), typing.get_type_hints(fn)
    positional_names = [p.name for p in _positional_params(fn)]
    flags = [n for n in params if n not in positional_names]
    positional, kwargs, global_flags = [], {}, set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, text = arg[2:].partition("=")
            key = name.replace("-", "_")
            flag = kebab(key)
            if key in GLOBAL_FLAGS:
                if has_value and not parse_bool(flag, text):
                    continue
                global_flags.add(key)
                continue
            if key not in flags:
                hint = _suggestion(key, flags) or f"; `lite {command} --help` lists the flags"
                raise LiteError(f"unknown flag --{name} for `lite {command}`{hint}")
            annotation = hints.get(key, str)
            if annotation is bool:
                if has_value:
                    kwargs[key] = parse_bool(flag, text)
                elif i < len(args) and args[i].lower() in BOOLEANS:
                    kwargs[key] = parse_bool(flag, args[i])
                    i += 1
                else:
                    kwargs[key] = True
                continue
            if not has_value:
                if i >= len(args) or args[i].startswith("--"):
                    raise LiteError(f"{flag} needs a value; see `lite {command} --help`")
                text = args[i]
                i += 1
            kwargs[key] = _convert(flag, text, annotation)
        elif arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit() and arg[1] != ".":
            raise LiteError(f"unknown option {arg} for `lite {command}`: flags are spelled out, e.g. --work-dir")
        else:
            positional.append(arg)
    variadic = any(p.kind == p.VAR_POSITIONAL for p in _positional_params(fn))
    names = " ".join(n.upper() for n in positional_names)
    if len(positional) < len(positional_names) or (variadic and not positional):
        raise LiteError(f"`lite {command}` needs {names}{'...' if variadic else ''}; see `lite {command} --help`")
    if not variadic and len(positional) > len(positional_names):
        extra = positional[len(positional_names)]
        raise LiteError(f"`lite {command}` takes {names} and flags, but {extra!r} was given too "
                        "(a flag value without its flag?)")
    return positional, kwargs, global_flags


def _docstring_parts(fn) -> tuple[str, dict[str, str]]:
    """(description, {parameter: its help text}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    description, _, args_text = doc.partition("\nArgs:\n")
    helps, current = {}, None
    for line in args_text.splitlines():
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("     ") and ":" in stripped:
            current, _, text = stripped.partition(":")
            helps[current] = text.strip()
        elif current is not None and stripped:
            helps[current] += " " + stripped
    return description.strip(), helps


def render_help(command: str, fn, width: int = 100) -> str:
    """`lite COMMAND --help`: usage, the description, and every flag in kebab-case with its default."""
    description, helps = _docstring_parts(fn)
    params, hints = _flag_params(fn), typing.get_type_hints(fn)
    positional = _positional_params(fn)
    names = " ".join(p.name.upper() + ("..." if p.kind == p.VAR_POSITIONAL else "") for p in positional)
    lines = [f"usage: lite {command} {names} [flags]", "", description, ""]
    indent = " " * 8

    def entry(head: str, text: str) -> None:
        lines.append(f"    {head}")
        lines.extend(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent) or [indent])

    lines.append("arguments:")
    for p in positional:
        entry(p.name.upper(), helps.get(p.name, ""))
    lines += ["", "flags:"]
    for name, p in params.items():
        if p in positional:
            continue
        annotation = hints.get(name, str)
        metavar = "" if annotation is bool else " " + name.upper()
        default = "" if p.default is None else f" (default: {str(p.default).lower() if annotation is bool else p.default})"
        entry(f"{kebab(name)}{metavar}", helps.get(name, "") + default)
    for name, text in GLOBAL_FLAGS.items():
        entry(kebab(name), text)
    entry("--help", "show this text.")
    return "\n".join(lines)
