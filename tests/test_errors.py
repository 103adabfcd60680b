"""One-line causes built from any exception."""

import pytest

from personalive.errors import reason


@pytest.mark.parametrize("error, expected", [
    (ValueError("bad value"), "bad value"), (IndexError(""), "IndexError"), (OSError("  \n "), "OSError"),
    (RuntimeError("\n  first\nsecond"), "first"), (KeyError(), "KeyError")])
def test_reason_is_one_non_empty_line(error, expected):
    assert reason(error) == expected


def test_reason_is_capped():
    assert reason(ValueError("x" * 500), limit=20) == "x" * 20
