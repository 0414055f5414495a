"""Test-only callbacks for the kill-and-resume tests: record each epoch, die on cue.

`install(path, kill_at)` adds a `Probe` to every stage's callbacks (after the
package's own, so it sees the restored optimizer and the unfrozen blocks).
"""

import json
import os
import signal

import keras
import numpy as np

from keras_transfer import stages
from keras_transfer.freezing import trainable_summary
from keras_transfer.optimizers import _inner


class Probe(keras.callbacks.Callback):
    def __init__(self, path, kill_at=None):
        super().__init__()
        self.path, self.kill_at, self.epoch = path, kill_at, None

    def _write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, logs=None):
        optimizer = _inner(self.model.optimizer)
        moments = [v for v in optimizer.variables if v is not optimizer.iterations]
        self._write(
            {
                "begin": int(optimizer.iterations.numpy()) if optimizer.built else 0,
                "moments": float(sum(np.abs(v.numpy()).sum() for v in moments)),
            }
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        optimizer = _inner(self.model.optimizer)
        lr = float(optimizer._get_current_learning_rate()) * getattr(optimizer, "lr_scale", 1.0)
        self._write(
            {
                "epoch": epoch,
                "trainable": len(self.model.trainable_weights),
                "blocks": [
                    row["block"]
                    for row in trainable_summary(self.model, print_fn=None)
                    if row["trainable"]
                ],
                "lr": lr,
                "iterations": int(optimizer.iterations.numpy()),
            }
        )

    def on_train_batch_begin(self, batch, logs=None):
        if self.kill_at == [self.epoch, batch]:
            os.kill(os.getpid(), signal.SIGKILL)


def install(path, kill_at=None):
    original = stages.stage_callbacks

    def with_probe(stage, **kwargs):
        return [*original(stage, **kwargs), Probe(path, kill_at)]

    stages.stage_callbacks = with_probe
    return original


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
