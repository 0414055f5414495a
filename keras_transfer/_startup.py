"""TensorFlow loaded quietly for the `keras-transfer` command.

TensorFlow prints C++ start-up notices as it loads (CUDA probing, oneDNN)
and, later, notices such as a failed `cuInit` on a machine without a GPU.
`TF_CPP_MIN_LOG_LEVEL` silences the later ones only if it is set before the
import, and the first few are written by absl before TensorFlow's own log
level applies, straight to file descriptor 2. The command therefore sets the
level and imports TensorFlow inside `captured_native_output`, which replays
what it caught if the import fails. A level the user set wins
(`TF_CPP_MIN_LOG_LEVEL=0 keras-transfer ...` shows everything); a library
import never comes here.
"""

import os
import sys

from keras_transfer.native_output import captured_native_output

COMMAND = "keras-transfer"
# 3 hides TensorFlow's C++ INFO, WARNING and ERROR lines; failures still raise.
QUIET_LEVEL = "3"


def is_command() -> bool:
    """Whether this process is the `keras-transfer` console script."""
    return os.path.basename(getattr(sys, "argv", [""])[0] or "") == COMMAND


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ start-up notices kept off the terminal."""
    if "tensorflow" in sys.modules:
        return
    if os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL) != QUIET_LEVEL:
        return  # the user asked to see TensorFlow's own logs
    with captured_native_output():
        import tensorflow  # noqa: F401
