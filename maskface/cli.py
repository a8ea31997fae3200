"""How every script meets its user: one-line errors (UserError + run_cli) and a flag parser that
takes --flag-name for --flag_name. Standard library only, so any script's --help answers at once.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import sys
from typing import Callable, Iterable, Iterator, Sequence

MAX_LISTED_PROBLEMS = 50  # more lines than this help nobody; the count of the rest is printed


class UserError(Exception):
    """A problem with the user's input (path, layout, CSV, name); scripts print it in one line."""


def problems_error(problems: list[str], what: str) -> UserError:
    """All the problems found in ``what`` at once: one line each (just the line when alone)."""
    if len(problems) == 1:
        return UserError(problems[0])
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = [f"... and {more} more"] if more else []
    return UserError(f"{len(problems)} problem(s) in {what}:\n" + "\n".join(shown + tail))


def run_cli(main: Callable, parse_args: Callable, argv: list[str] | None = None) -> int:
    """Run a script's main: a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    try:
        main(parse_args(argv))
    except UserError as why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    except OSError as why:  # disk full, permissions, a path of the wrong kind: name it, no traceback
        where = f"{why.filename}: " if why.filename else ""
        print(f"error: {where}{why.strerror or why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


class LazyChoices:
    """The names of a registry (models, losses, optimizers, ...) as a flag's ``choices``, read
    from their module only when a value is checked or a wrong one listed: those modules import
    torch, and --help must answer without it. ``shown`` stands for them in --help."""

    def __init__(self, load: Callable[[], Iterable], shown: str) -> None:
        self._load, self.shown, self._names = load, shown, None

    def _values(self) -> tuple:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


def registry(module: str, name: str) -> LazyChoices:
    """The names of ``maskface.<module>.<name>`` (a registry dict or tuple) as lazy choices."""
    def load() -> Iterable:
        return getattr(importlib.import_module(f"maskface.{module}"), name)
    return LazyChoices(load, f"{module}.{name}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' where it says something: not for None, False or a help text that
    already names its default. Lazy choices are shown by their description, never loaded."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        if not isinstance(action.choices, LazyChoices):
            return super()._expand_help(action)
        shown = copy.copy(action)
        shown.choices = None
        return super()._expand_help(shown)

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if isinstance(action.choices, LazyChoices) and action.metavar is None:
            return lambda size: ("NAME",) * size
        return super()._metavar_formatter(action, default_metavar)


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that takes ``--flag-name`` for ``--flag_name`` (only the underscore form
    is listed in --help) and silently maps ``aliases`` (old spellings) to their flag."""

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        """As argparse's, but a flag it does not know ends in one line naming it and the nearest
        flags that exist (exit code 2), not the whole usage."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.exit(2, f"error: {self.unknown_text(extras)}\n")
        return namespace

    def unknown_text(self, extras: list[str]) -> str:
        """What is wrong with the arguments argparse left over: the first unknown flag and the
        flags nearest to it, or the stray values."""
        flags = [a.partition("=")[0] for a in extras if a.startswith("-") and a != "--"]
        if not flags:
            return f"unrecognized arguments: {' '.join(extras)}"
        parsers = [self, *(p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                           for p in a.choices.values())]  # experiments.py's table and select
        listed = sorted({o for parser in parsers for a in parser._actions
                         if a.help != argparse.SUPPRESS
                         for o in a.option_strings if o.startswith("--")})
        wanted = "--" + flags[0].lstrip("-").replace("-", "_")
        near = difflib.get_close_matches(wanted, listed, n=3, cutoff=0.6)
        more = f" (and {len(flags) - 1} more unknown)" if len(flags) > 1 else ""
        return (f"unknown flag {flags[0]}{more}; "
                + (f"nearest: {', '.join(near)}" if near else f"{self.prog} --help lists them"))

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._canonical(a) for a in args], namespace)

    def _canonical(self, arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, equals, value = arg.partition("=")
        if flag not in self._option_string_actions:
            underscored = "--" + flag[2:].replace("-", "_")
            flag = self.aliases.get(underscored, underscored)
            if flag not in self._option_string_actions:  # unknown: argparse says so, as typed
                return arg
        return flag + equals + value
