"""What the three command lines (broker, client, gateway) share: skalibs' exit codes,
one-line usage errors, and the parsers of numbers given as flags. No I/O."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

#: A usage error (bad flag or value, invalid configuration).
EXIT_USAGE = 100
#: A system error (socket busy or unusable, broker unreachable).
EXIT_SYSTEM = 111


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: usage error: ...; HINT``,
    and exit :data:`EXIT_USAGE` (argparse's own exit status is 2)."""

    def __init__(self, prog: str, hint: str, **kwargs: object) -> None:
        super().__init__(prog=prog, **kwargs)  # type: ignore[arg-type]
        self._hint = hint

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: usage error: {message}; {self._hint}\n")
        sys.exit(EXIT_USAGE)


def number(
    kind: type[int] | type[float], minimum: float, what: str, *, above: bool = False
) -> Callable[[str], int | float]:
    """A flag's type: a finite ``kind`` at least ``minimum`` (greater than it with
    ``above``); argparse turns the ArgumentTypeError into a usage error naming the flag."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            bound = f"> {minimum:g}" if above else f">= {minimum:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {text!r}")
        return value

    return parse
