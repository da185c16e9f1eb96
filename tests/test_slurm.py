"""SLURM: job identity, preemption at a step boundary with resume, and real jobs on a cluster.

The cluster tests submit to the single-node SLURM cluster that ``.ci/setup_slurm.sh`` installs
and starts (munge, slurmctld, slurmd). In CI (``CI`` set) a missing cluster fails them; on a
developer machine without SLURM they are skipped.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient

from neuroformer.data.nwb import read_nwb
from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.distributed.slurm import SlurmJob
from neuroformer.registry.tracking import mlflow_server
from neuroformer.tasks.base import warmup_cosine
from neuroformer.training import train
from tests.configs import CONF, compose
from tests.unsafe import RunsCode

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]"]
EPOCHS, BATCHES = 2, 6   # optimizer steps of a run: EPOCHS * BATCHES
SHORT_RUN = [*TINY, "data.n_frames=0", "data.behavior=[]", "data.batch_size=8", f"trainer.max_epochs={EPOCHS}", f"+trainer.limit_train_batches={BATCHES}",
             "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
             "task.warmup_steps=4", "registry.register=false", "+trainer.enable_progress_bar=false"]
JOB_TIMEOUT_S = 600      # a job (or a preempted job and its restart) on a busy 2-core machine


class SignalAt(L.Callback):
    """Test helper: send this process ``signame`` once, as optimizer step ``step`` (0-based) begins."""

    def __init__(self, step: int, signame: str):
        self.step, self.signum, self.sent = step, signal.Signals[signame], False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            signal.raise_signal(self.signum)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def assert_continuous_history(client: MlflowClient, run_id: str, n_steps: int) -> None:
    """Every optimizer step logged exactly once, the LR at each step as the schedule gives it."""
    for key in ("train/loss_step", "lr-AdamW/pg1"):
        steps = metric_steps(client, run_id, key)
        assert sorted(steps) == list(range(n_steps)), (key, steps)
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr-AdamW/pg1")}
    warmup = min(4, n_steps // 10 + 1)  # PretrainTask: warm-up capped at a tenth of the run
    expected = [1e-3 * warmup_cosine(s, warmup, n_steps, 0.1) for s in range(n_steps)]
    assert [lrs[s] for s in range(n_steps)] == pytest.approx(expected, rel=1e-6)
    val = metric_steps(client, run_id, "val/id_ce")
    assert val == [BATCHES * (e + 1) - 1 for e in range(EPOCHS)], val  # once per epoch


# --- no cluster needed ---------------------------------------------------------------------

def test_job_identity_from_the_environment():
    assert SlurmJob.from_env({}) is None
    job = SlurmJob.from_env({"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NAME": "nf"})
    assert (job.job_id, job.requeue_id, job.restart_count) == ("41", "41", 2)
    task = SlurmJob.from_env({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"})
    assert task.requeue_id == "40_3"  # scontrol requeues the array task, not the whole array
    assert task.tags() == {"slurm.job_id": "43", "slurm.restart_count": "0", "slurm.array": "40_3"}


def test_run_folder_is_named_after_the_slurm_job(monkeypatch, tmp_path):
    def run_dir() -> str:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose("train", overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
        return cfg.hydra.run.dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_dir() == f"{tmp_path}/outputs/runs/pretrain/4242"   # every rank, every restart
    monkeypatch.delenv("SLURM_JOB_ID")
    assert re.fullmatch(rf"{tmp_path}/outputs/runs/pretrain/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir())


@pytest.mark.parametrize("signame", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_preempted_run_resumes_its_checkpoint_and_mlflow_run(signame, small_sim_path, tmp_path, monkeypatch):
    """Outside SLURM the warning signal (or SIGTERM) still checkpoints at a step boundary and
    stops; rerunning in the same run folder continues the same steps and the same MLflow run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # this run's own store under tmp_path
    n_steps, signal_at = EPOCHS * BATCHES, BATCHES + 2  # mid-way through the second epoch
    cfg = compose([*SHORT_RUN, "+callbacks.signal._target_=tests.test_slurm.SignalAt",
                   f"+callbacks.signal.step={signal_at}", f"+callbacks.signal.signame={signame}"],
                  tmp_path, sim_path=small_sim_path)
    with pytest.raises(SystemExit):  # Lightning's graceful stop after the checkpointed step
        train(cfg)
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    # The step under way when the signal came is finished and kept, the next one never starts.
    assert torch.load(last, weights_only=True)["global_step"] == signal_at + 1
    assert not (out / "metrics.json").exists()   # stopped: neither tested nor registered
    run_id = (out / "mlflow_run_id").read_text().strip()

    train(compose(SHORT_RUN, tmp_path, sim_path=small_sim_path))  # the restart: same run folder
    assert torch.load(last, weights_only=True)["global_step"] == n_steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == run_id
    client = MlflowClient(metrics["mlflow_tracking_uri"])
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert_continuous_history(client, run_id, n_steps)


def test_resume_refuses_a_checkpoint_that_would_run_code(small_sim_path, tmp_path):
    cfg = compose(SHORT_RUN, tmp_path, sim_path=small_sim_path)
    marker = tmp_path / "code-ran"
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3, "payload": RunsCode(marker)}, last)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(cfg)
    assert not marker.exists()


# --- a real SLURM cluster ------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """The node name of a running SLURM cluster that takes jobs."""
    state = ""
    if shutil.which("sinfo") and shutil.which("sbatch"):
        result = subprocess.run(["sinfo", "-h", "-o", "%n %T"], capture_output=True, text=True, timeout=30)
        state = (result.stdout + result.stderr).strip()
        usable = [line.split()[0] for line in result.stdout.splitlines()
                  if line.split()[-1].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
        if result.returncode == 0 and usable:
            return usable[0]
    message = (f"no usable SLURM cluster (sinfo: {state or 'not installed'}); "
               "start one with `bash .ci/setup_slurm.sh` (as root)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def job_state(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(job_id: str, log: Path, deadline: float) -> dict[str, str]:
    while (state := job_state(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {state.get('JobState')} after the deadline; log:\n"
                        + (log.read_text()[-4000:] if log.exists() else "(none)"))
        time.sleep(2)
    assert state["JobState"] == "COMPLETED", log.read_text()[-6000:]
    return state


def submit(template: str, overrides: list[str], tmp_path: Path, name: str, uri: str) -> tuple[str, Path]:
    """Submit a slurm/ template with CPU-sized resources; returns the job id and its log."""
    log = tmp_path / f"{name}-%j.out"
    env = dict(os.environ, TRAINER="cpu", PYTHON=sys.executable, MLFLOW_TRACKING_URI=uri)
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--gpus-per-node=0", "--ntasks-per-node=1",
           "--cpus-per-task=1", "--mem=4G", "--time=20", f"--output={log}", f"slurm/{template}", *overrides]
    job_id = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return job_id, Path(str(log).replace("%j", job_id))


@pytest.mark.slow
def test_sbatch_job_completes_and_a_preempted_job_resumes_to_the_same_steps(
        slurm_cluster, tracking_server, small_sim_path, tmp_path):
    n_steps = EPOCHS * BATCHES
    jobs = {}
    for name in ("whole", "preempted"):
        overrides = [*SHORT_RUN, f"data.paths=[{small_sim_path}]", f"paths.output_root={tmp_path / name}",
                     f"logger.mlflow.experiment_name=slurm-{name}-{tmp_path.name}"]
        jobs[name] = submit("single_node.sbatch", overrides, tmp_path, name, tracking_server)
    deadline = time.monotonic() + JOB_TIMEOUT_S

    # Preempt the second job once it has finished its first epoch: SLURM's warning signal.
    job_id, log = jobs["preempted"]
    run_dir = tmp_path / "preempted" / "runs" / "pretrain" / job_id
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert job_state(job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the job wrote no checkpoint in time"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)

    states = {name: wait_for(jid, jlog, deadline) for name, (jid, jlog) in jobs.items()}
    assert states["whole"]["Restarts"] == "0" and states["preempted"]["Restarts"] == "1"
    text = log.read_text()
    stopped = int(re.search(r"Preempted after (\d+) optimizer steps", text).group(1))
    assert BATCHES <= stopped < n_steps, text[-4000:]   # mid-training, after the first checkpoint
    assert re.search(rf"Requeued SLURM job {job_id}\b", text)
    assert f"Restored all states from the checkpoint at {run_dir}/checkpoints/last.ckpt" in text

    client = MlflowClient(tracking_server)
    runs, lr = {}, {}
    for name, (jid, _) in jobs.items():
        folder = tmp_path / name / "runs" / "pretrain" / jid     # named after the job id
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == n_steps
        metrics = json.loads((folder / "metrics.json").read_text())
        run = client.get_run(metrics["mlflow_run_id"])
        assert metrics["mlflow_tracking_uri"] == tracking_server
        assert run.info.status == "FINISHED" and run.data.tags["slurm.job_id"] == jid
        assert len(client.search_runs([run.info.experiment_id])) == 1  # the restart continued the run
        assert_continuous_history(client, run.info.run_id, n_steps)
        runs[name] = run
        lr[name] = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr-AdamW/pg1"),
                                            key=lambda m: m.step)]
    assert [runs[n].data.tags["slurm.restart_count"] for n in ("whole", "preempted")] == ["0", "1"]
    assert lr["preempted"] == lr["whole"]


@pytest.mark.slow
def test_sweep_runs_as_a_slurm_job_array_through_the_submitit_launcher(
        slurm_cluster, tracking_server, small_sim_path, tmp_path):
    experiment = f"sweep-{tmp_path.name}"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=20", *SHORT_RUN, "trainer.max_epochs=1",
           f"data.paths=[{small_sim_path}]", f"paths.output_root={tmp_path}",
           f"logger.mlflow.experiment_name={experiment}", "task.lr=0.001,0.0003"]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=tracking_server),
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert sorted(r.data.params["task/lr"] for r in runs) == ["0.0003", "0.001"]
    array_tasks = [r.data.tags["slurm.array"].split("_") for r in runs]      # one array, tasks 0 and 1
    assert len({array for array, _ in array_tasks}) == 1 and sorted(task for _, task in array_tasks) == ["0", "1"]
    (sweep_dir,) = (tmp_path / "multiruns" / "pretrain").iterdir()
    losses = []
    for run in runs:
        job_dir = sweep_dir / ("0" if run.data.params["task/lr"] == "0.001" else "1")
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert run.info.status == "FINISHED" and metrics["mlflow_run_id"] == run.info.run_id
        # Each job logged its own result to its own run ...
        assert run.data.metrics["test/id_ce"] == pytest.approx(metrics["test/id_ce"])
        losses.append(metrics["test/id_ce"])
    # ... and trained with its own learning rate: same seed and data, so equal losses would mean equal settings.
    assert math.isfinite(losses[0]) and abs(losses[0] - losses[1]) > 1e-4, losses
