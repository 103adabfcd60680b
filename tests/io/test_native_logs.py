"""MediaPipe's native log lines are dropped unless the log level is DEBUG; other stderr output is kept."""

import logging
import os
import sys
import threading

import numpy as np
import pytest

from personalive.io.faces import mediapipe_available
from personalive.io.native_logs import NATIVE_LINE, quiet_native_logs

ABSL = b"W0000 00:00:1712345678.123456    4242 inference_feedback_manager.cc:114] Feedback manager requires ...\n"
TFLITE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"


@pytest.fixture
def level():
    logger = logging.getLogger("personalive")
    old = logger.level

    def set_level(value):
        logger.setLevel(value)

    yield set_level
    logger.setLevel(old)


def test_native_lines_are_dropped_and_the_rest_is_written_after(capfd, level):
    level(logging.INFO)
    with quiet_native_logs():
        os.write(2, TFLITE + b"ours\n" + ABSL + b"E0000 00:00:1712345678.1 42 x.cc:1] a native error\n")
        thread = threading.Thread(target=lambda: os.write(2, b"from another thread\n"))
        thread.start()
        thread.join()
    assert capfd.readouterr().err == "ours\nE0000 00:00:1712345678.1 42 x.cc:1] a native error\nfrom another thread\n"
    print("stderr is back", file=sys.stderr, flush=True)
    assert capfd.readouterr().err == "stderr is back\n"


def test_debug_keeps_them(capfd, level):
    level(logging.DEBUG)
    with quiet_native_logs():
        os.write(2, ABSL)
    assert capfd.readouterr().err == ABSL.decode()


def test_nested_and_overlapping_calls_restore_stderr_once(capfd, level):
    level(logging.INFO)
    with quiet_native_logs():
        with quiet_native_logs():
            os.write(2, ABSL)
        os.write(2, b"kept\n")
    os.write(2, ABSL)  # no longer filtered
    assert capfd.readouterr().err == "kept\n" + ABSL.decode()


def test_patterns():
    assert NATIVE_LINE.match(ABSL) and NATIVE_LINE.match(TFLITE)
    assert NATIVE_LINE.match(b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert not NATIVE_LINE.match(b"14:00:52 INFO personalive.pipelines.offline: animating ...")
    assert not NATIVE_LINE.match(b"Traceback (most recent call last):")


@pytest.mark.skipif(not mediapipe_available(), reason="needs mediapipe")
def test_mediapipe_is_quiet_unless_debug(capfd, level):
    from PIL import Image

    from personalive.io.faces import FaceCropper
    from personalive.io.samples import sample_reference

    face = np.asarray(Image.open(sample_reference()).convert("RGB"))
    for value, loud in ((logging.INFO, False), (logging.DEBUG, True)):
        level(value)
        with FaceCropper() as cropper:
            assert cropper.box(face) is not None
        err = capfd.readouterr().err
        assert ("W0000" in err) == loud, err
