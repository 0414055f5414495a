"""A recipe's training state on disk, saved every epoch, so a killed run resumes.

`fine_tune(..., backup_dir=...)` keeps, after every epoch, the model's and
the optimizer's variables (moments, step count, hence the LR schedule's
position) and a small `state.json`: the recipe's plan, the stage in progress,
its epochs done, and the history so far. Started again with the same
arguments, `fine_tune` skips the finished stages, sets what trains for the
stage in progress, rebuilds its optimizer, loads the variables and runs the
remaining epochs; progressive unfreezing picks its blocks and LR from the
epoch number.

Writes are ordered so that a kill at any moment leaves a consistent state:
the weights go to a new file named by the epoch, then `state.json` is
replaced atomically to name it, then the previous file is removed. Under a
multi-worker strategy only the chief writes; on resume the chief reads the
state and sends it, and every variable, to the other workers through the
strategy's collectives, so workers need no shared file system.

Not kept across a kill: the early-stopping counter and best weights of the
stage in progress (they restart), and the position inside the data (the
interrupted epoch reruns from its start).
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import staging
from keras_transfer.distribute import is_chief, is_multi_worker

STATE_FILE = "state.json"


@dataclasses.dataclass
class TrainingState:
    """Where a recipe stands: what `state.json` holds.

    Args:
        plan: the recipe's stages, as `[name, epochs]` pairs (a resume with
            another plan is refused).
        stage: index of the stage in progress (or the next one to run).
        stage_epochs: epochs of that stage already done.
        histories: one history dict per stage started (`{metric: [values]}`).
        weights: the weights file (in the backup folder) these counts match.
    """

    plan: list
    stage: int = 0
    stage_epochs: int = 0
    histories: list = dataclasses.field(default_factory=list)
    weights: str | None = None

    @property
    def epochs_done(self) -> int:
        """Epochs finished over all stages."""
        return sum(len(next(iter(h.values()), [])) for h in self.histories)


def plan_key(stages) -> list:
    """The plan of a recipe as saved in the state: `[[name, epochs], ...]`.

    Args:
        stages: a list of `Stage`s.

    Returns:
        A JSON-ready list.

    Example:

    >>> from keras_transfer.stages import Stage
    >>> plan_key([Stage("head", 2, 1e-3)])
    [['head', 2]]
    """
    return [[stage.name, stage.epochs] for stage in stages]


def load_state(backup_dir: str, stages, strategy) -> TrainingState | None:
    """Reads the state of an interrupted recipe (the chief reads; all workers get it).

    Args:
        backup_dir: the backup folder.
        stages: the recipe's stages now (must match the saved plan).
        strategy: the strategy training runs under.

    Returns:
        The `TrainingState`, or None when there is nothing to resume.

    Raises:
        ValueError: the saved plan differs from this one (another recipe or
            other epochs).

    Example:

    >>> import tempfile
    >>> load_state(tempfile.mkdtemp(), [], tf.distribute.get_strategy()) is None
    True
    """
    raw = b""
    path = os.path.join(backup_dir, STATE_FILE)
    if is_chief(strategy) and os.path.isfile(path):
        with open(path, "rb") as f:
            raw = f.read()
    if is_multi_worker(strategy):
        raw = _broadcast_bytes(strategy, raw)
    if not raw:
        return None
    state = TrainingState(**json.loads(raw.decode("utf-8")))
    if state.plan != plan_key(stages):
        raise ValueError(
            f"The training state in {backup_dir!r} is for the plan {state.plan}, not "
            f"{plan_key(stages)}: run the same recipe and epochs to resume, or start in "
            "a new folder (delete this one)."
        )
    return state


def restore_variables(model: keras.Model, backup_dir: str, state: TrainingState) -> None:
    """Loads the variables saved with `state`: the model's, and the optimizer's mid-stage.

    In the middle of a stage the optimizer must be built over the same
    variables as when it was saved (the same stage set up the same way); at
    the start of a stage only the model's variables are loaded (the stage's
    optimizer starts afresh). Under a multi-worker strategy the chief loads
    and every worker receives the chief's values.

    Args:
        model: the model (compiled, when resuming mid-stage).
        backup_dir: the backup folder.
        state: the state being resumed.

    Returns:
        None.
    """
    strategy = model.distribute_strategy
    optimizer = getattr(model, "optimizer", None)
    with_optimizer = optimizer is not None and state.stage_epochs > 0
    if with_optimizer and not optimizer.built:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    if is_chief(strategy):
        path = os.path.join(backup_dir, state.weights)
        skip = [] if with_optimizer or optimizer is None else [optimizer]
        model.load_weights(path, objects_to_skip=skip)
    if is_multi_worker(strategy):
        variables = [*model.weights, *(optimizer.variables if with_optimizer else [])]
        _broadcast_variables(strategy, variables)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state after every epoch of one stage (chief only).

    Used by `fine_tune(..., backup_dir=...)`. Restores the saved variables at
    the start of a resumed stage.

    Args:
        backup_dir: the backup folder.
        state: the state at the start of this stage (its `stage` is this
            stage's index; its history for this stage holds the epochs
            already done).
        resume: restore the saved variables when training begins.
    """

    def __init__(self, backup_dir: str, state: TrainingState, resume: bool = False):
        super().__init__()
        self.backup_dir = backup_dir
        self.state = state
        self.resume = resume

    def on_train_begin(self, logs=None):
        if self.resume:
            restore_variables(self.model, self.backup_dir, self.state)

    def on_epoch_end(self, epoch, logs=None):
        history = self.state.histories[self.state.stage]
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        self.state.stage_epochs += 1
        save_state(self.model, self.backup_dir, self.state)


def save_state(model: keras.Model, backup_dir: str, state: TrainingState) -> None:
    """Writes the variables, then `state.json` naming them (chief only; atomic).

    Args:
        model: the model (with its optimizer).
        backup_dir: the backup folder (made if missing).
        state: the state to write; its `weights` is set here.

    Returns:
        None.
    """
    if not is_chief(model.distribute_strategy):
        return
    os.makedirs(backup_dir, exist_ok=True)
    previous = state.weights
    state.weights = f"epoch-{state.epochs_done:04d}-stage-{state.stage}.weights.h5"
    target = os.path.join(backup_dir, state.weights)
    partial = os.path.join(backup_dir, f".partial-{state.weights}")
    model.save_weights(partial)
    os.replace(partial, target)
    staging.write_atomic(
        os.path.join(backup_dir, STATE_FILE), json.dumps(dataclasses.asdict(state))
    )
    if previous and previous != state.weights:
        old = os.path.join(backup_dir, previous)
        if os.path.exists(old):
            os.remove(old)


def _chief_only(strategy, value):
    """Per-replica values: `value` on the chief's first replica, zeros elsewhere."""
    chief = is_chief(strategy)

    def make(context):
        keep = chief and context.replica_id_in_sync_group == 0
        return value if keep else tf.zeros_like(value)

    return strategy.experimental_distribute_values_from_function(make)


def _broadcast_bytes(strategy, data: bytes) -> bytes:
    size = tf.constant([len(data)], tf.int32)
    size = int(strategy.reduce("SUM", _chief_only(strategy, size), axis=None).numpy()[0])
    if not size:
        return b""
    padded = np.zeros(size, np.int32)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    values = strategy.reduce("SUM", _chief_only(strategy, tf.constant(padded)), axis=None)
    return values.numpy().astype(np.uint8).tobytes()


def _broadcast_variables(strategy, variables) -> None:
    """Sets every variable to the chief's value: one all-reduce per dtype."""
    by_dtype: dict = {}
    for variable in variables:
        by_dtype.setdefault(variable.dtype, []).append(variable)
    for group in by_dtype.values():
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(v.value), [-1]) for v in group], 0)
        summed = strategy.reduce("SUM", _chief_only(strategy, flat), axis=None)
        offset = 0
        for variable in group:
            size = int(np.prod(variable.shape))
            variable.assign(tf.reshape(summed[offset : offset + size], variable.shape))
            offset += size
