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

