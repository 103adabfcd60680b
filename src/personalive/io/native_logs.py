"""Native (C++) log lines of MediaPipe and TensorFlow Lite, kept off the console unless the log level is DEBUG.

MediaPipe 0.10 writes its absl log lines (`W0000 00:00:... inference_feedback_manager.cc:114] ...`, `WARNING: All
log messages before absl::InitializeLog() ...`) and TensorFlow Lite its own (`INFO: Created TensorFlow Lite XNNPACK
delegate for CPU.`) straight to file descriptor 2, from its own threads, the first time a graph runs; it ignores
GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL and Python's absl logging. So `quiet_native_logs()` points descriptor 2 at a
temporary file while a native call runs, then writes back every line that is not native INFO/WARNING logging
(another thread's Python logging, a native ERROR) and drops the rest. With the `personalive` logger at DEBUG
(`--log-level DEBUG`) it does nothing: every line reaches the console as it is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

# absl/glog "W0000 00:00:1712345678.123456  1234 file.cc:12] ..." (I and W only), TF Lite's "INFO: ..." and
# "WARNING: ...", absl's notice about InitializeLog
NATIVE_LINE = re.compile(rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] |INFO: |WARNING: )")

_lock = threading.Lock()
_depth = 0  # native calls inside the redirect (threads may overlap: the last one out restores descriptor 2)
_saved: int | None = None  # the real descriptor 2 while redirected
_capture = None  # the temporary file descriptor 2 points at


def _keep(line: bytes) -> bool:
    return not NATIVE_LINE.match(line)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Run a native call with its INFO/WARNING log lines dropped (kept at DEBUG); any other line written to
    stderr meanwhile, from any thread, is written out afterwards."""
    global _depth, _saved, _capture
    if logging.getLogger("personalive").isEnabledFor(logging.DEBUG):
        yield
        return
    with _lock:
        if _depth == 0:
            sys.stderr.flush()
            _capture = tempfile.TemporaryFile()
            _saved = os.dup(2)
            os.dup2(_capture.fileno(), 2)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                sys.stderr.flush()
                os.dup2(_saved, 2)
                os.close(_saved)
                _capture.seek(0)
                text = _capture.read()
                _capture.close()
                _saved = _capture = None
                kept = b"".join(line for line in text.splitlines(keepends=True) if _keep(line))
                if kept:
                    os.write(2, kept)
