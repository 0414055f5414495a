"""Root pytest set-up, shared by the tests, the package doctests and README.md."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
