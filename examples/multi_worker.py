"""Two local workers train one model with MultiWorkerMirroredStrategy.

    python examples/multi_worker.py

starts two worker processes on 127.0.0.1 (TF_CONFIG set for each), which
fine-tune a small MobileNetV3 (random initialisation, so it runs offline) on
the scikit-learn digits, two-stage for 1+1 epochs; the chief saves the
training state in `runs/multi_worker.backup`. Run it again after killing it
and it resumes. With random weights and a frozen backbone in stage 1 the loss
hardly moves: it shows the mechanics (both workers print the same history);
use `weights="imagenet"` for a model worth keeping. On real hosts, run the worker part with your own TF_CONFIG.
"""

import json
import os
import socket
import subprocess
import sys


def worker(backup_dir: str) -> None:
    import keras_transfer as kt

    # First, before TensorFlow runs anything.
    strategy = kt.distribute.get_strategy("multi_worker")
    splits = kt.data.load_dataset("digits", image_size=(32, 32), batch_size=16, max_per_class=40)
    model = kt.build_image_classifier(
        "mobilenet_v3_small", splits.num_classes, weights=None, input_shape=(32, 32, 3),
        strategy=strategy,
    )
    history = kt.fine_tune(
        model, splits.train, splits.validation, recipe="two_stage", epochs=(1, 1),
        strategy=strategy, backup_dir=backup_dir, verbose=0,
    )
    role = "chief" if kt.distribute.is_chief(strategy) else "worker"
    print(f"{role}: loss per epoch {[round(v, 3) for v in history.history['loss']]}")


def main() -> int:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hosts = [f"127.0.0.1:{port}" for port in ports]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker"], env=env))
    return max(process.wait(timeout=600) for process in processes)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker("runs/multi_worker.backup")
    else:
        sys.exit(main())
