"""SavedModel export: signatures, layout, atomicity, models.config, warm-up, inference mode."""

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SIZE, image_batch, sharpen_head, tiny_classifier
from PIL import Image

from keras_transfer import export
from keras_transfer.data import decode_image_bytes
from keras_transfer.export import signatures
from keras_transfer.export.parity import _LiteRunner
from keras_transfer.export.saved_model import WARMUP_FILE

LABELS = ["cat", "dog", "bird"]

# Runs TF's own `saved_model_cli` (the TF C++ SavedModel loader) in a process
# where keras and keras_transfer cannot be imported (`import tensorflow` alone
# would pull keras in through tf.keras; blocking it proves it is not needed).
_CLI = (
    "import sys\n"
    "sys.modules['keras'] = sys.modules['keras_transfer'] = None\n"
    "from tensorflow.python.tools import saved_model_cli\n"
    "sys.argv = ['saved_model_cli', *sys.argv[1:]]\n"
    "sys.exit(saved_model_cli.main())\n"
)


def saved_model_cli(*args, cwd):
    """`saved_model_cli` in a fresh process without keras or keras_transfer."""
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def jpeg_bytes(size=(45, 60), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_bytes_signature(version_dir, data, tmp_path):
    """Probabilities of `serving_bytes` on encoded images, via saved_model_cli run."""
    np.save(tmp_path / "bytes.npy", np.array(data, dtype=object))
    out = tmp_path / "cli_out"
    result = saved_model_cli(
        "run",
        "--dir",
        version_dir,
        "--tag_set",
        "serve",
        "--signature_def",
        "serving_bytes",
        "--inputs",
        f"image_bytes={tmp_path / 'bytes.npy'}",
        "--outdir",
        str(out),
        "--overwrite",
        cwd=tmp_path,
    )
    return result, out


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model = tiny_classifier(3, dropout=0.5, augmentation="standard")
    return sharpen_head(model)  # non-trivial outputs


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One SavedModel with labels, shared by the tests that only read it."""
    return export.saved_model(
        model, str(tmp_path_factory.mktemp("export") / "flowers"), labels=LABELS
    )


def test_signatures_have_meaningful_names(exported, tmp_path):
    path = exported
    result = saved_model_cli("show", "--all", "--dir", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout
    for key in (
        "signature_def['serving_default']",
        "signature_def['serving_bytes']",
        "signature_def['classify']",
        "inputs['image'] tensor_info",
        "inputs['image_bytes'] tensor_info",
        "inputs['inputs'] tensor_info",
        "outputs['probabilities']",
        "outputs['classes']",
        "outputs['scores']",
        "Method name is: tensorflow/serving/classify",
    ):
        assert key in shown, key
    assert f"shape: (-1, {SIZE}, {SIZE}, 3)" in shown
    assert "keras_tensor" not in shown and "output_0" not in shown
    with open(os.path.join(path, "assets", "labels.txt")) as f:
        assert f.read().splitlines() == LABELS


def test_inference_mode_and_top_k(model, tmp_path):
    path = export.saved_model(model, str(tmp_path / "m"), labels=LABELS, top_k=2)
    served = tf.saved_model.load(path).signatures["serving_default"]
    x = image_batch(4)
    first, second = served(image=tf.constant(x)), served(image=tf.constant(x))
    # Augmentation and dropout are off: repeated calls agree with training=False.
    np.testing.assert_array_equal(first["probabilities"], second["probabilities"])
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(first["probabilities"], expected, atol=1e-5, rtol=0)
    top = np.argsort(-expected, axis=1)[:, :2]
    assert first["classes"].numpy().astype(str).tolist() == np.array(LABELS)[top].tolist()
    np.testing.assert_allclose(first["scores"], np.take_along_axis(expected, top, 1), atol=1e-5)


def test_versions_and_models_config(model, tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = tmp_path / "saved_models"
    assert export.saved_model(model, str(root / "a"), models_config=False).endswith("/1")
    assert export.saved_model(model, str(root / "a")).endswith("/2")
    export.saved_model(model, str(root / "b"), version=7)
    assert sorted(os.listdir(root / "a")) == ["1", "2"]
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((root / "models.config").read_text(), config)
    entries = {c.name: c for c in config.model_config_list.config}
    assert sorted(entries) == ["a", "b"]
    assert entries["a"].base_path == "/models/a"
    assert entries["a"].model_platform == "tensorflow"
    assert entries["b"].model_version_policy.latest.num_versions == 1
    local = export.write_models_config(str(root), serving_base_path=None)
    with open(local) as f:
        assert f'base_path: "{root}/a"' in f.read()


def test_existing_version_needs_overwrite(model, tmp_path):
    base = str(tmp_path / "m")
    path = export.saved_model(model, base, version=1)
    marker = os.path.join(path, "marker")
    open(marker, "w").close()
    with pytest.raises(FileExistsError, match=r"Version 1 already exists.*\(--overwrite\)"):
        export.saved_model(model, base, version=1)
    assert os.path.exists(marker)
    export.saved_model(model, base, version=1, overwrite=True)
    assert not os.path.exists(marker)
    assert sorted(os.listdir(base)) == ["1"]


def test_version_folder_gets_the_users_umask(model, tmp_path):
    # TF Serving often runs as another user: the version must be as readable
    # as any folder the user makes (tempfile.mkdtemp would make it 0700).
    previous = os.umask(0o022)
    try:
        path = export.saved_model(model, str(tmp_path / "shared" / "m"))
    finally:
        os.umask(previous)
    for folder in (path, os.path.dirname(path), os.path.join(path, "variables")):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder


def test_unwritable_directory(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="Cannot write an export under"):
        export.saved_model(model, str(blocker / "m"))
    with pytest.raises(PermissionError, match="Cannot write an export under"):
        export.saved_model(model, "/proc/keras_transfer_export/m")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ["a", "b"]}, "one name per class \\(3 for this model\\). Received: 2"),
        ({"labels": "abc"}, "sequence of class names"),
        ({"labels": ["a", "", "c"]}, "non-empty single lines"),
        ({"version": 0}, "Received: version=0"),
        ({"top_k": 0}, "Received: top_k=0"),
        ({"warmup_data": np.zeros((2, 5, 5, 3))}, "must have shape"),
    ],
)
def test_bad_arguments(model, tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        export.saved_model(model, str(tmp_path / "m"), **kwargs)
    assert not os.path.exists(tmp_path / "m" / "1")


def test_crash_mid_export_leaves_nothing(model, tmp_path, monkeypatch):
    def crash(path):
        raise RuntimeError("simulated crash after writing saved_model.pb")

    monkeypatch.setattr(signatures, "mark_classify_signature", crash)
    base = tmp_path / "m"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.saved_model(model, str(base), labels=LABELS)
    assert not base.exists()  # the folder this export created is gone too
    assert not (tmp_path / "models.config").exists()


def test_warmup_records(model, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(jpeg_bytes(seed=i))
    path = export.saved_model(model, str(tmp_path / "pets"), warmup_data=[str(f) for f in files])
    records = list(tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE)))
    assert len(records) == 3
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    assert request.model_spec.name == "pets"
    assert request.model_spec.signature_name == "serving_bytes"
    assert tf.make_ndarray(request.inputs["image_bytes"])[0] == files[0].read_bytes()
    images = image_batch(2)
    path = export.saved_model(model, str(tmp_path / "pets"), warmup_data=images)
    records = list(tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE)))
    request = prediction_log_pb2.PredictionLog.FromString(records[1].numpy()).predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["image"]), images[1:2])


def test_corrupt_bytes_is_a_request_error(model, exported, tmp_path):
    path = exported
    served = tf.saved_model.load(path).signatures["serving_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        served(image_bytes=tf.constant([b"definitely not an image"]))
    truncated = jpeg_bytes()[:200]
    with pytest.raises(tf.errors.InvalidArgumentError):
        served(image_bytes=tf.constant([truncated]))
    # The same loaded model keeps serving.
    good = served(image_bytes=tf.constant([jpeg_bytes()]))
    assert good["probabilities"].shape == (1, 3)


def test_classify_signature(model, exported, tmp_path):
    path = exported
    classify = tf.saved_model.load(path).signatures["classify"]
    data = jpeg_bytes()
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    example = tf.train.Example(features=tf.train.Features(feature={"image_bytes": feature}))
    out = classify(inputs=tf.constant([example.SerializeToString()]))
    assert out["classes"].numpy().astype(str).tolist() == [LABELS]
    image = decode_image_bytes(tf.constant(data), (SIZE, SIZE))[None]
    expected = keras.ops.convert_to_numpy(model(image, training=False))
    np.testing.assert_allclose(out["scores"], expected, atol=1e-5)


# mixed_bfloat16: tests/test_recipes.py trains such a model and exports it.
@pytest.mark.parametrize("policy", ["mixed_float16"])
def test_mixed_precision_exports_float32(policy, tmp_path):
    keras.config.set_dtype_policy(policy)
    try:
        mixed = tiny_classifier(3)
    finally:
        keras.config.set_dtype_policy("float32")
    path = export.saved_model(mixed, str(tmp_path / "m"), labels=LABELS)
    served = tf.saved_model.load(path).signatures["serving_default"]
    assert served.structured_input_signature[1]["image"].dtype == tf.float32
    assert served.structured_outputs["probabilities"].dtype == tf.float32
    out = served(image=tf.constant(image_batch(2)))["probabilities"].numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-2)
    report = export.tflite(mixed, str(tmp_path / "m.tflite"), verbose=False)
    details = _LiteRunner(report.path).runner.get_input_details()
    assert details["image"]["dtype"] == np.float32


def test_saved_model_parity_in_clean_process(model, exported, tmp_path):
    """The TF C++ loader (as TF Serving uses) on a real JPEG matches the Keras model."""
    path = exported
    data = [jpeg_bytes(seed=1), jpeg_bytes((64, 20), seed=2)]
    result, out = run_bytes_signature(path, data, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(out / "probabilities.npy")
    images = np.stack([decode_image_bytes(tf.constant(d), (SIZE, SIZE)) for d in data])
    expected = model.predict(images, verbose=0)
    assert np.abs(served - expected).max() <= 1e-5
    corrupt, _ = run_bytes_signature(path, [b"not an image"], tmp_path)
    assert corrupt.returncode != 0
    assert "Unknown image file format" in corrupt.stderr


def test_text_model_gets_named_inputs(tmp_path):
    inputs = {
        "token_ids": keras.Input((6,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input((6,), dtype="int32", name="padding_mask"),
    }
    x = keras.layers.Embedding(10, 4)(inputs["token_ids"])
    x = keras.layers.GlobalAveragePooling1D()(x)
    text_model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    path = export.saved_model(text_model, str(tmp_path / "t"), labels=["neg", "pos"])
    served = tf.saved_model.load(path).signatures["serving_default"]
    assert sorted(served.structured_input_signature[1]) == ["padding_mask", "token_ids"]
    ids = np.array([[1, 2, 3, 0, 0, 0]], "int32")
    out = served(token_ids=tf.constant(ids), padding_mask=tf.constant(ids > 0, tf.int32))
    assert out["classes"].shape == (1, 2)
    assert "serving_bytes" not in tf.saved_model.load(path).signatures
