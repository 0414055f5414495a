"""Multi-worker training with Keras 3: two worker processes on 127.0.0.1 (TF_CONFIG).

Each worker builds the model under `kt.distribute.get_strategy("multi_worker")`
and runs `fine_tune` two_stage for 1+1 epochs: a tiny image model, and a tiny
KerasHub text model (dict inputs). Each worker gets its own `backup_dir` (no
shared file system), so the test sees which worker wrote checkpoints. The
image run is killed once (worker 1 dies in stage 2, the chief is then
stopped) and both workers are started again with the same command: they
resume from the chief's checkpoint, which the chief sends to worker 1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

_WORKER = r"""
import json, os, signal, sys
import numpy as np
import keras
import keras_transfer as kt

task, root, model_kind, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
strategy = kt.distribute.get_strategy("multi_worker")


class KillAt(keras.callbacks.Callback):
    # Test only: this worker dies (SIGKILL) at batch 1 of epoch `kill_at`.
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == kill_at and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


keras.utils.set_random_seed(0)
if model_kind == "image":
    rng = np.random.default_rng(0)
    y = np.arange(32) % 2
    x = (rng.uniform(0, 120, (32, 32, 32, 3)) + 120 * y[:, None, None, None]).astype("float32")
    model = kt.build_image_classifier(
        "mobilenet_v3_small", 2, weights=None, input_shape=(32, 32, 3), alpha=0.75,
        minimalistic=True, dropout=0.0, strategy=strategy,
    )
    data = (x, y)
else:
    from keras_transfer.backbones.kerashub import text_preprocessor
    from keras_transfer.data import load_wordnet_nouns, text_dataset

    texts, labels, names = load_wordnet_nouns(("animal", "food"), max_per_class=16)
    splits = text_dataset(texts, labels, text_preprocessor("minilm", 16), class_names=names,
                          batch_size=8, validation_split=0.0, test_split=0.0, seed=0)
    model = kt.build_text_classifier("minilm", 2, weights=None, num_layers=1, hidden_dim=32,
                                     intermediate_dim=64, num_heads=2, strategy=strategy)
    data = splits.train
history = kt.fine_tune(
    model, data, recipe="two_stage", epochs=(1, 1), learning_rate=1e-2, batch_size=8,
    strategy=strategy, backup_dir=os.path.join(root, f"worker{index}", model_kind),
    callbacks=[KillAt()] if kill_at >= 0 and index == 1 else [], verbose=0,
)
np.savez(os.path.join(root, f"{model_kind}-{index}.npz"), *[w.numpy() for w in model.weights])
with open(os.path.join(root, f"{model_kind}-{index}.json"), "w") as f:
    json.dump(history.history, f)
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(root, model_kind, kill_at=-1):
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(index), str(root), model_kind, str(kill_at)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return workers


def _wait(workers, timeout=240):
    outputs = []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
        outputs.append(out)
    return [w.returncode for w in workers], outputs


def _weights(root, name):
    with np.load(root / name) as f:
        return [f[key] for key in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_two_workers_train_resume_and_agree(tmp_path):
    # Image, killed: worker 1 dies at batch 1 of epoch 1 (stage 2); then stop the chief.
    chief, worker = _start_workers(tmp_path, "image", kill_at=1)
    worker.wait(timeout=240)
    assert worker.returncode == -signal.SIGKILL
    time.sleep(2)
    chief.kill()
    chief.communicate()
    state = json.loads((tmp_path / "worker0" / "image" / "state.json").read_text())
    assert (state["stage"], state["stage_epochs"]) == (1, 0)  # stage 1 done, stage 2 not
    assert not (tmp_path / "worker1").exists()

    # The same command again resumes; the text model trains (dict inputs) after it.
    codes, outputs = _wait(_start_workers(tmp_path, "image"))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    codes, outputs = _wait(_start_workers(tmp_path, "text"))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for kind in ("image", "text"):
        chief_weights, worker_weights = (
            _weights(tmp_path, f"{kind}-0.npz"),
            _weights(tmp_path, f"{kind}-1.npz"),
        )
        for a, b in zip(chief_weights, worker_weights, strict=True):
            np.testing.assert_array_equal(a, b)
        for index in range(2):
            history = json.loads((tmp_path / f"{kind}-{index}.json").read_text())
            assert history["stage"] == [1, 2], (kind, history)
            assert history["loss"][1] < history["loss"][0], (kind, history)
        assert sorted(os.listdir(tmp_path / "worker0" / kind)) == [
            "epoch-0002-stage-2.weights.h5",
            "state.json",
        ]
    # Only the chief wrote checkpoints.
    assert not (tmp_path / "worker1").exists()
