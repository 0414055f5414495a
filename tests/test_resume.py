"""Kill and resume: `keras-transfer train` killed (SIGKILL) mid-epoch, then run again.

The killed run is a child process (a test-only callback kills it at batch 1
of a chosen epoch); the same command run again here resumes it. An
uninterrupted run of the same settings gives the reference: at every epoch
after the resume the trainable variables and the learning rate are the same,
and the optimizer starts from its saved state (step count and moments), not
from zero.
"""

import json
import os
import subprocess
import sys

import pytest
import resume_probe
from conftest import run_cli

TRAIN = (
    "train",
    "--data=digits",
    "--backbone=mobilenet_v3_small",
    "--weights=none",
    "--image_size=32",
    "--max_per_class=6",
    "--max_test_per_class=2",
    "--batch_size=8",
)
_KILLED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import resume_probe
resume_probe.install(sys.argv[2], kill_at=json.loads(sys.argv[3]))
from keras_transfer import cli
sys.exit(cli.main(cli.parse_flags(["keras-transfer", *sys.argv[4:]])))
"""


def _probed_cli(monkeypatch, path, *args, cwd):
    original = resume_probe.install(str(path))
    try:
        return run_cli(*args, cwd=cwd)
    finally:
        monkeypatch.setattr("keras_transfer.stages.stage_callbacks", original)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, epochs, kill_epoch, stages",
    [
        ("two_stage", "1,2", 2, [1, 2, 2]),  # killed in stage 2, after one of its epochs
        ("progressive", "3", 2, [1, 1, 1]),  # killed after the first unfreezing step
    ],
)
def test_killed_run_resumes_where_it_stopped(
    monkeypatch, tmp_path, recipe, epochs, kill_epoch, stages
):
    args = (*TRAIN, f"--recipe={recipe}", f"--epochs={epochs}")
    reference = tmp_path / "reference.jsonl"
    done = _probed_cli(monkeypatch, reference, *args, "--output_dir=reference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed.jsonl"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED,
            os.path.dirname(__file__),
            str(killed),
            json.dumps([kill_epoch, 1]),
            *args,
            "--output_dir=run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    state = json.loads((tmp_path / ".partial-run" / "checkpoint" / "state.json").read_text())
    assert sum(len(h["loss"]) for h in state["histories"]) == kill_epoch

    resumed = tmp_path / "resumed.jsonl"
    again = _probed_cli(monkeypatch, resumed, *args, "--output_dir=run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed the unfinished run" in again.stdout
    assert not (tmp_path / ".partial-run").exists()
    assert (tmp_path / "run" / "run_complete.json").is_file()
    assert not (tmp_path / "run" / "checkpoint").exists()

    expected = {r["epoch"]: r for r in resume_probe.records(reference) if "epoch" in r}
    begin, *epochs_after = resume_probe.records(resumed)
    before_kill = [r for r in resume_probe.records(killed) if "epoch" in r]
    # The optimizer state is the saved one: the step count where the killed run was, moments too.
    assert begin["begin"] == before_kill[-1]["iterations"] > 0
    assert begin["moments"] > 0
    assert [r["epoch"] for r in epochs_after] == list(range(kill_epoch, len(stages)))
    for record in epochs_after:
        reference_epoch = expected[record["epoch"]]
        assert record["trainable"] == reference_epoch["trainable"], record["epoch"]
        assert record["blocks"] == reference_epoch["blocks"], record["epoch"]
        assert record["lr"] == pytest.approx(reference_epoch["lr"], rel=1e-6), record["epoch"]
        assert record["iterations"] == reference_epoch["iterations"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["stage"] == stages
