"""Shared plumbing of the entry scripts: logging, `key=value` overrides, one-line errors and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from personalive.errors import PersonaLiveError

logger = logging.getLogger("personalive")


def add_common_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"run config (default: {default_config})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. weights_dir=DIR dtype=fp32 keyframe_threshold=20")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class BooleanFlag(argparse.BooleanOptionalAction):
    """A boolean option that really turns off: `--flag`, `--no-flag`, `--flag false`, `--flag=true` (also yes/no,
    on/off, 1/0). The official scripts used `type=bool`, which reads "False" as true.

    Parse with `parse_args(parser, argv)`: it joins `--flag WORD` into `--flag=WORD` when WORD is a boolean word,
    so that `--flag key=value` still leaves `key=value` to the positional overrides.
    """

    def __init__(self, option_strings, dest, default=None, required=False, help=None):
        super().__init__(option_strings, dest, default=default, required=required, help=help)
        self.nargs, self.metavar = "?", "true|false"

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        elif values is None:
            setattr(namespace, self.dest, True)
        elif values.lower() in _BOOL_WORDS:
            setattr(namespace, self.dest, _BOOL_WORDS[values.lower()])
        else:
            parser.error(f"{option_string} expects true or false, got {values!r}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_intermixed_args` (options and `key=value` overrides in any order), with `BooleanFlag` values
    joined to their option (`--flag false` -> `--flag=false`, a bare `--flag` -> `--flag=true`)."""
    flags = {s for a in parser._actions if isinstance(a, BooleanFlag) for s in a.option_strings if s[:5] != "--no-"}
    joined: list[str] = []
    for arg in sys.argv[1:] if argv is None else argv:
        if joined and joined[-1] in flags and arg.lower() in _BOOL_WORDS:
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return parser.parse_intermixed_args([f"{a}=true" if a in flags else a for a in joined])


def run(main: Callable[[], int | None], log_level: str = "INFO") -> int:
    """Call `main`; a `PersonaLiveError` becomes one line on stderr and exit code 2, Ctrl-C exit code 130.

    Any other exception is a bug and keeps its traceback.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return main() or 0
    except PersonaLiveError as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130

