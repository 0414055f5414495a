"""What C++ code prints straight to file descriptors 1 and 2, caught and routed.

TensorFlow's start-up notices, the TFLite converter (`fully_quantize: 0, ...`)
and the LiteRT interpreter (`INFO: Created TensorFlow Lite XNNPACK delegate`)
write to the process's stdout/stderr below Python, where `logging` cannot
reach them. `captured_native_output` points both descriptors at a temporary
file for the duration of a block and hands back what was written, so the
caller can log it (the export does, through absl at INFO: `-v 0` shows it) or
replay it when the block fails. Imports nothing but the standard library, so
the command can use it before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


def _flush_c_streams() -> None:
    """Flushes C stdio buffers: a pipe's stdout is block-buffered, so text would
    otherwise surface after the descriptors are restored."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to reach: nothing buffered there
        pass


class CapturedOutput:
    """The text written to descriptors 1 and 2 inside `captured_native_output`."""

    def __init__(self):
        self.text = ""


@contextlib.contextmanager
def captured_native_output(replay_on_error: bool = True) -> Iterator[CapturedOutput]:
    """Sends what native code writes to stdout/stderr into a buffer for the block.

    Args:
        replay_on_error: on an exception, write the captured text back to
            stderr before the exception propagates (for failures the text
            explains); False leaves it to the caller (`text` is set either way).

    Yields:
        A `CapturedOutput`; its `text` is set when the block ends.

    Example:

    >>> with captured_native_output() as captured:
    ...     _ = os.write(2, b"native chatter\\n")
    >>> captured.text
    'native chatter\\n'
    """
    result = CapturedOutput()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        failed = False
        try:
            yield result
        except BaseException:
            failed = True
            raise
        finally:
            _flush_c_streams()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            result.text = sink.read().decode("utf-8", "replace")
            if failed and replay_on_error and result.text:
                sys.stderr.write(result.text)
                sys.stderr.flush()
