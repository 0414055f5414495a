import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_transfer as kt  # noqa: E402

SIZE = 32
TINY = {"alpha": 0.75, "minimalistic": True}
TINY_TEXT = {"num_layers": 1, "hidden_dim": 32, "intermediate_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def tiny_classifier(num_classes=3, **kwargs):
    """MobileNetV3-Small (alpha 0.75, minimalistic) at 32 px: ~0.3 M parameters."""
    kwargs.setdefault("weights", None)
    kwargs.setdefault("input_shape", (SIZE, SIZE, 3))
    return kt.build_image_classifier(
        "mobilenet_v3_small", num_classes=num_classes, **TINY, **kwargs
    )


def tiny_text_classifier(num_classes=3, sequence_length=16, **kwargs):
    """A 1-layer, 32-wide random BERT with MiniLM's vocabulary and preprocessor."""
    for key, value in TINY_TEXT.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("weights", None)
    return kt.build_text_classifier(
        "minilm", num_classes, sequence_length=sequence_length, **kwargs
    )


def sharpen_head(model, std=3.0, seed=0):
    """Large random head weights, so the outputs differ clearly between inputs."""
    head = model.get_layer("head")
    head.kernel.assign(
        np.random.default_rng(seed).normal(0, std, head.kernel.shape).astype("float32")
    )
    return model


def image_batch(n=8, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def labels(n=8, num_classes=3):
    return np.arange(n) % num_classes


def weights_by_path(layer_or_model):
    return {v.path: np.array(v.numpy()) for v in layer_or_model.weights}


def assert_round_trip(model, x, tmp_path, atol=1e-6):
    """Saves to .keras, reloads with safe_mode=True, checks predictions; returns the copy."""
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol, rtol=0
    )
    return loaded


@pytest.fixture(scope="session", autouse=True)
def _shared_lite0_cache(tmp_path_factory):
    """One converted EfficientNet-Lite0 checkpoint for the whole session (subprocesses too)."""
    if "KERAS_TRANSFER_CACHE" not in os.environ:
        os.environ["KERAS_TRANSFER_CACHE"] = str(tmp_path_factory.mktemp("lite0_cache"))


class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, cwd=None):
    """`keras-transfer <args>` in this process: absl flags parsed and reset, output captured."""
    import contextlib
    import io

    from absl import flags

    from keras_transfer import cli

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    flags.FLAGS.unparse_flags()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(cli.parse_flags(["keras-transfer", *map(str, args)]))
            except SystemExit as stop:
                code = stop.code
    finally:
        flags.FLAGS.unparse_flags()
        os.chdir(previous)
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_user_error(result, *fragments):
    """Exit code 2, one line on stderr, no traceback, every fragment in it."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: mode 0555, and immutable when tests run as root."""
    import shutil
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root ignores modes; `chattr +i` binds root too
        chattr = shutil.which("chattr")
        immutable = bool(chattr) and subprocess.run([chattr, "+i", folder]).returncode == 0
        if not immutable:
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", folder], check=True)
    folder.chmod(0o755)
