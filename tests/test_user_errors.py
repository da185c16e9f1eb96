"""What a user sees when something is wrong: one message naming the file or setting, exit status
2, no traceback (unless asked for), and nothing left half-done; and a quiet start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.corpus import MALFORMED

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def run(args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a clean environment (no tracking server), output captured."""
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**environment, **env})


def assert_one_message(done: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 2, no traceback, and an ``error:`` line on stderr that matches ``pattern``."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]


def test_train_on_each_malformed_file_prints_one_message(tmp_path):
    """``train.py`` on every file of the malformed corpus, all at once (the cost is start-up)."""
    procs = {}
    for name, broken in sorted(MALFORMED.items()):
        folder = tmp_path / name
        folder.mkdir()
        path = broken.make(folder)
        cmd = [sys.executable, "train.py", "data=nwb", f"data.paths=[{path}]", f"paths.output_root={folder / 'out'}",
               "logger=none"]
        procs[name] = (path, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
    for name, (path, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert_one_message(done, MALFORMED[name].message)
        assert str(path) in stderr, (name, stderr[-2000:])
        assert not list((tmp_path / name / "out").rglob("metrics.json")), name  # nothing looks complete


def test_hydra_full_error_shows_the_traceback(tmp_path):
    path = MALFORMED["nan_spike"].make(tmp_path)
    done = run(["train.py", "data=nwb", f"data.paths=[{path}]", f"paths.output_root={tmp_path}", "logger=none"],
               HYDRA_FULL_ERROR="1")
    assert done.returncode != 0 and "Traceback" in done.stderr and "RecordingError" in done.stderr


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["model.n_embdd=64"], None),  # unknown key: Hydra's own message, no traceback
    (["data=nwb"], r"paths"),  # data.paths is ??? (missing)
    (["model.n_head=5"], r"model.n_embd \(96\) must be a multiple of model.n_head \(5\)"),
    (["data.split.n_blocks=2"], r"data.split.n_blocks must be >= 3"),
    (["task.ema_decay=1.5"], r"task.ema_decay must be in \(0, 1\) \(0: no averaging\); got 1.5"),
    (["task.calibrate_readout=often"], r"task.calibrate_readout must be true or false; got 'often'"),
    (["experiment=twin", "model.readout=spline"], r"model.readout must be .mask. or .gaussian.; got .spline."),
    (["experiment=finetune_speed", "task.pretrained=models:/no-such-model/1"],
     r"models:/no-such-model/1: cannot be loaded from the MLflow tracking server"),
])
def test_bad_settings_are_one_message(overrides, pattern, small_sim_path, tmp_path):
    done = run(["train.py", *overrides, f"data.paths=[{small_sim_path}]" if overrides != ["data=nwb"] else "seed=1",
                f"paths.output_root={tmp_path}"])
    if pattern is None:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "Key 'n_embdd' is not in struct" in done.stderr
    else:
        assert_one_message(done, pattern)


def test_tools_print_one_message_and_show_the_traceback_with_debug(tmp_path):
    missing = tmp_path / "none.ckpt"
    for tool in (["-m", "neuroformer.evaluate"], ["-m", "neuroformer.inference.generate", "--out", "x.npz"],
                 ["-m", "neuroformer.inference.connectivity"]):
        assert_one_message(run([*tool, "--model", str(missing)]), r"none\.ckpt: no such checkpoint or model")
    debug = run(["-m", "neuroformer.evaluate", f"model={missing}", "--debug"])  # name=value works too
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelMismatchError" in debug.stderr
    bad = run(["-m", "neuroformer.evaluate", "--model", str(missing), "--no-such-setting", "3"])
    assert bad.returncode == 2  # the model is loaded first: its error comes before the setting's


def test_quiet_start():
    done = run(["train.py", "--help"])
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-2000:]
    done = run(["-m", "neuroformer.evaluate", "--help"])
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert "n-samples" in done.stdout  # the Neuroformer family's evaluation settings are listed


def test_refused_resume_fails_its_mlflow_run_and_a_longer_run_continues_it(small_sim_path, tmp_path):
    """Restart a finished run folder: with a different model it is refused (the MLflow run ends
    FAILED with the message); with more epochs it continues the same MLflow run and records the change."""
    base = ["train.py", f"data.paths=[{small_sim_path}]", "model.n_embd=32", "model.n_head=2", "model.n_layer=1",
            "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
            "trainer.log_every_n_steps=1", "evaluate=null", "registry.register=false", f"paths.output_root={tmp_path}",
            f"hydra.run.dir={tmp_path}/run"]
    first = run([*base, "trainer.max_epochs=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    client = mlflow.MlflowClient(metrics["mlflow_tracking_uri"])

    refused = run([*base, "trainer.max_epochs=2", "model.n_embd=48"])
    assert_one_message(refused, r"last\.ckpt: cannot resume this checkpoint with a different model "
                                r"\(n_embd: 32 -> 48\)")
    run_info = client.get_run(metrics["mlflow_run_id"])
    assert run_info.info.status == "FAILED" and "n_embd: 32 -> 48" in run_info.data.tags["neuroformer.error"]

    longer = run([*base, "trainer.max_epochs=2"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    output = longer.stdout + longer.stderr
    assert "changed settings" in output and "trainer/max_epochs: 1 -> 2" in output
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["mlflow_run_id"] == metrics["mlflow_run_id"]  # the same MLflow run
    run_info = client.get_run(metrics["mlflow_run_id"])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["config_change/trainer/max_epochs"] == "1 -> 2"
    assert run_info.data.params["trainer/max_epochs"] == "1"  # MLflow keeps the first value; the tag the new one
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "train/loss_step")]
    assert len(steps) == len(set(steps)) == 8  # 4 steps per epoch, the second epoch's continuing the first
