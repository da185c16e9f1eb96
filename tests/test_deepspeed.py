"""DeepSpeed ZeRO on 2 CPU ranks through ``python train.py``: presets, sharded checkpoints,
agreement with a single process, resume.

Multi-rank runs go through the real entry point in a fresh process group (Lightning launches
rank 1 by re-running the command), with a timeout that kills every rank, so a hung
collective cannot hang the suite.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
import yaml
from hydra.utils import instantiate

from neuroformer import registry
from neuroformer.data.tokenizer import PAD
from neuroformer.distributed.checkpoints import (
    consolidated_checkpoint,
    is_sharded_checkpoint,
    weights_only_loading,
    write_consolidated,
)
from neuroformer.distributed.strategies import CPUZeroStrategy, deepspeed_strategy, replace_directory
from neuroformer.models.calibration import calibrate_readout
from tests.configs import compose
from tests.helpers import token_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.patch=[1,8,8]"]
RUN_TIMEOUT_S = 420  # one 2-rank run takes about a minute on a busy 2-core machine
# Settings under which 2 ranks with per-rank batch B compute exactly what 1 process with 2B
# computes. DDP/ZeRO average the ranks' *mean* losses; that equals the mean over the global
# batch only if both halves hold equally many target tokens: 0.2 s windows of this recording
# all hold more than 8 spikes, so with max_tokens=8 every window has exactly 8 targets
# (asserted below). Dropout masks and the in-batch contrastive loss depend on how the batch
# is split, so both are off; so is the rate read-out, whose Poisson loss is normalised by the
# batch's true spike count (which differs between the halves); a constant learning rate makes a run stopped after 2 of 4 epochs
# follow the same schedule as the uninterrupted one. Weight averaging is off (DeepSpeed runs
# without it), and the latent stack is shallow: float summation-order noise grows with depth
# (1.1e-5 on a decoder weight with the default's 5 latent blocks, against the 1e-5 limit below).
EXACT = [*TINY_MODEL, "model.dropout=0.0", "task.ema_decay=0.0", "model.n_latent_layer=2", "model.rate_readout=false", "task.loss_weights.contrastive=0.0", "data.tokenizer.window=0.2",
         "data.tokenizer.max_tokens=8", "task.warmup_steps=0", "task.min_lr_ratio=1.0", "trainer.max_epochs=4",
         "trainer.log_every_n_steps=1", "registry.register=false"]
EPOCHS, STEPS_PER_EPOCH = 4, 24  # 192 training windows: 24 steps of 2 x 4 (or 1 x 8) windows
# With CUDA the presets use Lightning's GPU path (2 GPUs needed); these tests check the CPU ranks.
cpu_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-process path of the presets")


def run_training(name: str, overrides: list[str], root: Path, timeout: float = RUN_TIMEOUT_S) -> dict:
    """``python train.py OVERRIDES`` with its run folder at ``root/name``; returns its metrics.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "train.py", *overrides, f"paths.output_root={root / 'outputs'}", f"hydra.run.dir={run_dir}"]
    # A clean local environment: no tracking server, no cluster (SLURM_*), no rank variables.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PL_", "MLFLOW_")) and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE",
                                                                         "MASTER_ADDR", "MASTER_PORT")}
    log_path = run_dir / "stdout.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # every rank: Lightning's launched ranks share the new process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if rc != 0:
        tail = log_path.read_text()[-4000:]
        pytest.fail(f"{name}: {'timed out' if rc is None else f'exit code {rc}'}: {' '.join(cmd)}\n{tail}")
    return json.loads((run_dir / "metrics.json").read_text())


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a training checkpoint (single file or sharded folder)."""
    return registry.load(path).model.state_dict()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metric_history(metrics: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric the run logged to MLflow, in step order."""
    client = mlflow.MlflowClient(metrics["mlflow_tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(metrics["mlflow_run_id"], key))


# --- quick -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "stage", "offload"), [
    ("deepspeed_zero2", 2, False), ("deepspeed_zero3", 3, False), ("deepspeed_zero3_offload", 3, True),
])
@cpu_ranks
def test_presets_build_cpu_zero_strategies_without_gpu(preset, stage, offload, tmp_path, small_sim_path):
    cfg = compose([f"trainer={preset}", "trainer.devices=2"], tmp_path, sim_path=small_sim_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, CPUZeroStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero, "offload_param" in zero) == (offload, offload)
    if offload:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
        assert strategy.config["zero_force_ds_cpu_optimizer"] is False  # the task's torch AdamW may step it
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_zero_strategy_names_parameters_deepspeed_cannot_train():
    module = L.LightningModule()
    module.scale = torch.nn.Parameter(torch.tensor(1.0))  # 0-dim
    strategy = deepspeed_strategy(stage=2)
    strategy.connect(module)
    with pytest.raises(ValueError, match=r"\['scale'\].*shape \(1,\)"):
        strategy.init_deepspeed()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_sharded_checkpoint_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"weights": torch.ones(2), "payload": _RunsCode(marker)}, tmp_path / "shard.pt")
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "shard.pt", weights_only=False)  # what DeepSpeed's reader asks for
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on the way out


def test_replace_directory_swaps_whole_folders(tmp_path):
    target, new = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    target.mkdir()
    (target / "old_shard.pt").write_text("old")
    new.mkdir()
    (new / "shard.pt").write_text("new")
    replace_directory(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["shard.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .tmp or .old left behind
    # A swap killed between its two renames leaves the previous checkpoint whole at .old; the
    # next swap then completes and clears it.
    os.replace(target, tmp_path / "last.ckpt.old")
    newer = tmp_path / "newer.tmp"
    newer.mkdir()
    (newer / "shard.pt").write_text("newer")
    replace_directory(newer, target)
    assert (target / "shard.pt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@cpu_ranks
def test_zero3_offload_on_two_cpu_ranks_tests_best_checkpoint_and_registers_it(small_sim_path, tmp_path):
    overrides = [*TINY_MODEL, "trainer=deepspeed_zero3_offload", "trainer.devices=2", "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=8",
                 "data.batch_size=16", f"data.paths=[{small_sim_path}]", "registry.model_name=nf-zero3",
                 "registry.alias=champion"]
    metrics = run_training("zero3_offload", overrides, tmp_path)
    best = Path(metrics["best_checkpoint"])

    # The best checkpoint is a folder of shards from both ranks, each holding half the fp32 master weights.
    assert is_sharded_checkpoint(best)
    assert not list(best.parent.glob("*.tmp")) and not list(best.parent.glob("*.old"))
    shards = sorted((best / "checkpoint").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2
    held = [sum(t.numel() for t in torch.load(f, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"])
            for f in shards]
    n_params = int(metrics["n_parameters"])
    assert held[0] == held[1] and n_params <= sum(held) < n_params + 2 * 64, (held, n_params)  # + alignment padding

    # One loader for every form of the trained model: the sharded folder (consolidated on the fly,
    # every parameter at full shape), a consolidated checkpoint file, and the registry (by alias,
    # as another process would). All three are the same model with the same spec and config.
    from_folder = registry.load(best)
    assert sum(p.numel() for p in from_folder.model.parameters()) == n_params
    from_file = registry.load(write_consolidated(best, tmp_path / "consolidated.ckpt"))
    mlflow.set_tracking_uri(metrics["mlflow_tracking_uri"])
    from_registry = registry.load("models:/nf-zero3@champion")
    datamodule = instantiate(compose(overrides, tmp_path / "recompute").data)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        expected = from_folder.model(batch.inputs).id_logits
    for loaded in (from_file, from_registry):
        assert loaded.family == "neuroformer" and loaded.spec.to_dict() == from_folder.spec.to_dict()
        assert loaded.train_config == from_folder.train_config
        assert yaml.safe_load(loaded.train_config)["trainer"]["strategy"]["stage"] == 3
        with torch.no_grad():
            assert torch.equal(loaded.model(batch.inputs).id_logits, expected)

    # The registered model carries the read-out calibration that the validation windows give those weights.
    assert (from_folder.model.rate_gain == 1).all()
    calibrate_readout(from_folder.model, datamodule.val_dataloader())
    torch.testing.assert_close(from_registry.model.rate_gain, from_folder.model.rate_gain)
    torch.testing.assert_close(from_registry.model.rate_offset, from_folder.model.rate_offset)

    # The test metric was computed with those weights: recompute it here in one process.
    assert len(datamodule.datasets["test"]) % 2 == 0  # no window duplicated by the 2-rank sampler
    assert token_cross_entropy(from_folder.model, datamodule.test_dataloader()) == pytest.approx(
        metrics["test/id_ce"], rel=1e-5)


# --- slow: agreement with one process, resume ------------------------------------------------


class ExactRuns:
    """Runs of the EXACT setting by name, trained on first use and shared by the tests below.

    ``zero3_resumed`` continues ``zero3_first_half`` (2 of 4 epochs) from its sharded last
    checkpoint; ``single`` is one process with the same global batch and no interruption.
    """

    def __init__(self, root: Path, sim_path: Path):
        self.root, self.done = root, {}
        data, two_ranks = [f"data.paths=[{sim_path}]"], ["trainer.devices=2", "data.batch_size=4"]
        self.settings = {
            "single": [*EXACT, *data, "trainer=ddp", "trainer.devices=1", "data.batch_size=8"],
            "zero2": [*EXACT, *data, "trainer=deepspeed_zero2", *two_ranks],
            "zero3_first_half": [*EXACT, *data, "trainer=deepspeed_zero3", *two_ranks,
                                 f"trainer.max_epochs={EPOCHS // 2}"],
            "zero3_resumed": [*EXACT, *data, "trainer=deepspeed_zero3", *two_ranks,
                              f"ckpt_path={self.last('zero3_first_half')}"],
        }

    def last(self, name: str) -> Path:
        return self.root / name / "checkpoints" / "last.ckpt"

    def __call__(self, name: str) -> dict:
        if name not in self.done:
            if name == "zero3_resumed":
                self("zero3_first_half")
            self.done[name] = run_training(name, self.settings[name], self.root)
        return self.done[name]


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, small_sim_path) -> ExactRuns:
    return ExactRuns(tmp_path_factory.mktemp("exact"), small_sim_path)


def assert_same_training(runs: ExactRuns, name: str, tmp_path: Path) -> None:
    """Run ``name`` (2 ranks) ended where the single-process run did: same steps, weights, function."""
    runs("single")
    single_last, zero_last = runs.last("single"), runs.last(name)
    assert not is_sharded_checkpoint(single_last) and is_sharded_checkpoint(zero_last)
    steps = EPOCHS * STEPS_PER_EPOCH
    assert torch.load(single_last, weights_only=False)["global_step"] == steps
    assert consolidated_checkpoint(zero_last)["global_step"] == steps

    # Same weights up to float summation order (gradients summed across ranks in buckets, Adam
    # on flat shards): measured <= 4e-7 after 116 steps (29 per epoch, the old split), limit 1e-5. Two kinds of parameter
    # need their own rule:
    # - attention key biases (every ``kv.bias``: the keys' half) get a gradient that is mathematically
    #   zero (softmax ignores a shift shared by all keys), so Adam steps on float noise there:
    #   measured 4e-5, limit 1e-3 = lr;
    #   they do not change the model's output (checked below).
    # - the contrastive projections get no gradient at all (contrastive loss off). torch's AdamW
    #   skips them; DeepSpeed hands AdamW zero gradients, so decoupled weight decay still
    #   shrinks them by (1 - lr * wd) per step.
    cfg = compose(runs.settings[name], tmp_path)
    decay = (1 - cfg.task.lr * cfg.task.weight_decay) ** steps
    w_single, w_zero = weights(single_last), weights(zero_last)
    assert w_single.keys() == w_zero.keys()
    for key, w in w_single.items():
        expected = w * decay if key.endswith("_proj.weight") else w
        limit = 1e-3 if key.endswith("kv.bias") else 1e-5
        assert (w_zero[key] - expected).abs().max().item() < limit, key

    # Both compute the same function: validation cross-entropy, evaluated here in one process.
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    val_single = token_cross_entropy(registry.load(single_last).model, datamodule.val_dataloader())
    val_zero = token_cross_entropy(registry.load(zero_last).model, datamodule.val_dataloader())
    assert val_zero == pytest.approx(val_single, rel=1e-5)


@pytest.mark.slow
def test_exact_setting_gives_every_window_the_same_number_of_targets(small_sim_path, tmp_path):
    cfg = compose([*EXACT, f"data.paths=[{small_sim_path}]", "data.batch_size=8"], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    train = datamodule.datasets["train"]
    batch = train.__getitems__(list(range(len(train))))
    counts = (batch.target_ids != PAD).sum(1)
    assert len(train) == STEPS_PER_EPOCH * 8
    assert (counts == counts[0]).all(), counts.unique()


@pytest.mark.slow
@cpu_ranks
def test_zero2_on_two_ranks_matches_one_process(exact_runs, tmp_path):
    metrics = exact_runs("zero2")
    # The loss falls: validation cross-entropy after each epoch (synced over both ranks).
    val = [v for _, v in metric_history(metrics, "val/id_ce")]
    assert len(val) == EPOCHS and val[-1] < val[0], val
    assert_same_training(exact_runs, "zero2", tmp_path)


@pytest.mark.slow
@cpu_ranks
def test_zero3_stopped_and_resumed_matches_one_uninterrupted_process(exact_runs, tmp_path):
    exact_runs("zero3_first_half")
    resumed = exact_runs("zero3_resumed")
    first_half = consolidated_checkpoint(exact_runs.last("zero3_first_half"))
    assert first_half["global_step"] == EPOCHS // 2 * STEPS_PER_EPOCH

    # The resumed run trained only the second half: no step before the checkpoint is repeated.
    steps = [s for s, _ in metric_history(resumed, "train/loss_step")]
    assert min(steps) >= first_half["global_step"] and len(steps) == EPOCHS // 2 * STEPS_PER_EPOCH
    val = [v for _, v in metric_history(resumed, "val/id_ce")]
    assert len(val) == EPOCHS // 2 and val[-1] < val[0], val

    # Interrupted or not, ZeRO-3 on 2 ranks ends with the single process's step count, weights
    # and function: parameters, Adam moments and the sampler's epoch all came back from the shards.
    assert_same_training(exact_runs, "zero3_resumed", tmp_path)
