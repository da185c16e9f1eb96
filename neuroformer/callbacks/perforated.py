"""Perforated backpropagation (Brenner & Itti 2025) as a Lightning callback, for any model family.

Training alternates phases (docs/perforated.md):

1. **Neuron learning**: ordinary training, until the validation metric ``monitor`` stops
   improving by more than ``min_delta`` (relative) for ``patience`` validations (or, with
   ``switch_every``, after that many validations).
2. **Dendrite learning** (``method="correlation"``, the paper's method): every chosen layer gets
   one new dendrite per output neuron (``neuroformer.models.dendrites``; its output weight is 0,
   so the model's outputs do not change). All other weights are frozen and the new dendrites'
   input weights are trained to maximise the cascade-correlation score
   ``S = sum_o |cov_samples(a_o, e_o)|`` of each dendrite's activation ``a_o`` with its
   neuron's remaining error ``e_o = dL/dy_o``, for up to ``candidate_epochs`` epochs (fewer if
   the epoch's score stops improving for ``candidate_patience`` epochs).
3. The dendrites' input weights are frozen and neuron learning resumes, now also training
   the dendrites' output weights. When it plateaus, the new set is judged: if the best
   validation metric did not improve by ``min_delta`` since the set was added, the model is
   reverted to its best state and (up to ``max_tries`` times in a row) a new set is tried.
   Training stops, at the best state, after ``max_sets`` sets or ``max_tries`` failures.

``method="joint"`` is the simpler scheme of the open-source dendrite library: at each plateau
the new dendrites join the model and train with everything else by ordinary backpropagation
(no correlation phase). The optimiser and LR schedule are rebuilt (the task's
``configure_optimizers``) after every change of structure or phase. The structure is saved in
every checkpoint's model card, so checkpoints, resumed runs and registered models load back
into the same architecture. Metrics ``perforated/*`` (phase, dendrite sets, correlation,
parameter count) go to the loggers; ``perforated.png`` (validation metric versus epoch, with the
restructurings marked) to the run folder and MLflow.

Needs the task's network in ``pl_module.model`` (the ``tasks.base.Task`` contract) and one
process: under DeepSpeed or DDP it refuses to start (see ``setup``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from matplotlib.figure import Figure

from neuroformer import plots
from neuroformer.distributed.checkpoints import read_checkpoint
from neuroformer.errors import ConfigError
from neuroformer.models import dendrites as dn
from neuroformer.registry.families import CARD_KEY

log = logging.getLogger(__name__)

METHODS = ("correlation", "joint")
PHASE_CODE = {"neuron": 0, "dendrite": 1, "done": 2}


class Perforated(Callback):
    """Add dendrite nodes when validation plateaus and train them (module docstring).

    Args:
        monitor, mode: the validation metric that decides (``min`` or ``max``): use the
            checkpoint's, so the best checkpoint and the best state agree.
        method: ``correlation`` (the paper's cascade-correlation phase) or ``joint``.
        patience: validations without a relative improvement of ``min_delta`` that end a
            neuron phase. Make it longer than a plateau LR scheduler's patience.
        min_delta: relative improvement that counts (0.001 = 0.1%).
        switch_every: end every neuron phase after this many validations instead (fixed switching).
        max_sets: most dendrite sets per layer.
        max_tries: sets in a row that may fail to improve before training stops.
        candidate_epochs, candidate_patience: length of a dendrite phase: at most this many
            epochs, fewer when the correlation score stops improving for ``candidate_patience``.
        init_scale: new dendrite weights, relative to the layer kind's usual initialisation.
        types, names, exclude: which layers get dendrites (``dendrites.select_layers``):
            ``torch.nn`` class names, and regular expressions on module names (relative to
            ``pl_module.model``).
        seed: seed of the new dendrites' weights (set ``k`` uses ``seed + k``).
        figure: file name of the validation-versus-epoch figure in the run folder (None: none).
    """

    def __init__(self, monitor: str, mode: str = "min", method: str = "correlation", patience: int = 10,
                 min_delta: float = 1e-3, switch_every: int | None = None, max_sets: int = 3, max_tries: int = 2,
                 candidate_epochs: int = 10, candidate_patience: int = 2, init_scale: float = 0.01,
                 types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d"), names: list[str] | None = None,
                 exclude: tuple[str, ...] = (), seed: int = 0, figure: str | None = "perforated.png"):
        if method not in METHODS:
            raise ConfigError(f"callbacks.perforated.method: {method!r}; expected one of {METHODS}")
        if mode not in ("min", "max"):
            raise ConfigError(f"callbacks.perforated.mode: {mode!r}; expected min or max")
        self.monitor, self.mode, self.method = monitor, mode, method
        self.patience, self.min_delta, self.switch_every = patience, min_delta, switch_every
        self.max_sets, self.max_tries = max_sets, max_tries
        self.candidate_epochs, self.candidate_patience, self.init_scale = candidate_epochs, candidate_patience, init_scale
        self.types, self.names, self.exclude = tuple(types), names, tuple(exclude)
        self.seed, self.figure = seed, figure
        # Saved with checkpoints (state_dict): where training stands.
        self.phase = "neuron"
        self.best: float | None = None  # best monitored value so far
        self.reference: float | None = None  # value of the last significant improvement in this neuron phase
        self.stale = 0  # validations since then
        self.validations = 0  # validations in this neuron phase
        self.before_set: float | None = None  # best value when the set being judged was added
        self.tries = 0  # sets in a row that did not improve
        self.sets_added = 0  # seeds new sets
        self.candidate_epoch, self.candidate_best, self.candidate_stale = 0, -math.inf, 0
        self.history: list[dict] = []  # one entry per validation: epoch, value, phase, sets
        self.events: list[dict] = []  # epoch, what happened
        # Not saved: the best state (a resumed run reads the best checkpoint instead) and per-epoch sums.
        self._best_state: tuple[dict, dict] | None = None
        self._score_sum, self._corr_sum, self._batches = 0.0, 0.0, 0

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        keys = ("phase", "best", "reference", "stale", "validations", "before_set", "tries", "sets_added",
                "candidate_epoch", "candidate_best", "candidate_stale", "history", "events")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ helpers

    def _better(self, value: float, than: float | None, margin: float = 0.0) -> bool:
        """``value`` beats ``than`` by more than ``margin`` times its size."""
        if than is None:
            return True
        step = margin * abs(than)
        return value < than - step if self.mode == "min" else value > than + step

    def _n_sets(self, model: torch.nn.Module) -> int:
        return max(dn.structure(model).values(), default=0)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, **extra: float) -> None:
        metrics = {"perforated/phase": float(PHASE_CODE[self.phase]),
                   "perforated/dendrite_sets": float(self._n_sets(pl_module.model)),
                   "perforated/n_parameters": float(sum(p.numel() for p in pl_module.model.parameters())),
                   **{f"perforated/{k}": v for k, v in extra.items()}}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def _event(self, trainer: L.Trainer, what: str) -> None:
        self.events.append({"epoch": trainer.current_epoch, "event": what})
        log.info("perforated, epoch %d: %s", trainer.current_epoch, what)

    def _new_optimizer(self, trainer: L.Trainer) -> None:
        """New parameters or a new phase: a new optimiser and LR schedule (the task's own)."""
        trainer.strategy.setup_optimizers(trainer)

    def _enter(self, phase: str, pl_module: L.LightningModule) -> None:
        """Make the phase's parameters (and only those) trainable."""
        self.phase = phase
        model = pl_module.model
        if phase == "dendrite":
            dn.set_trainable(model, neurons=False, dendrite_inputs="newest", outputs=False)
        elif self.method == "joint":
            dn.set_trainable(model, neurons=True, dendrite_inputs="all", outputs=True)
        else:
            dn.set_trainable(model, neurons=True, dendrite_inputs="none", outputs=True)
        if phase == "neuron":
            self.reference, self.stale, self.validations = self.best, 0, 0

    def _remember_best(self, model: torch.nn.Module) -> None:
        self._best_state = (dn.structure(model), {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def _revert(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Back to the best state: remembered, or (after a resume) the best checkpoint's."""
        if self._best_state is None:
            path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not path:
                log.warning("perforated: no best state to revert to (resumed run without a best checkpoint)")
                return
            checkpoint = read_checkpoint(path)
            weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
                       if k.startswith("model.")}
            self._best_state = (checkpoint[CARD_KEY].get("dendrites") or {}, weights)
        layers, weights = self._best_state
        dn.apply_structure(pl_module.model, layers)
        pl_module.model.load_state_dict(weights)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            zero = trainer.strategy.config.get("zero_optimization", {}).get("stage")
            why = ("its parameters are sharded across ranks, so no rank holds a whole layer to wrap, and "
                   if zero == 3 else "")
            raise ConfigError(f"callbacks.perforated: cannot add dendrites under DeepSpeed ZeRO-{zero}: {why}the "
                              "DeepSpeed engine fixes its flattened, partitioned parameters when training starts and "
                              "cannot take new ones. Use a single-device trainer preset (trainer=cpu or trainer=gpu)")
        if trainer.world_size > 1:
            raise ConfigError(
                f"callbacks.perforated: needs one process, the run has {trainer.world_size}: dendrites added "
                "during training are not in DDP's gradient reducer, so ranks would drift apart. Use "
                "trainer.devices=1 (trainer=cpu or trainer=gpu)")
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise ConfigError(f"callbacks.perforated: {type(pl_module).__name__} has no network in .model")
        dn.select_layers(pl_module.model, self.types, self.names, self.exclude)  # bad type names fail now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase != "done":  # a resumed run continues its phase
            self._enter(self.phase, pl_module)
            if self._n_sets(pl_module.model):
                self._new_optimizer(trainer)
        self._log(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._score_sum, self._corr_sum, self._batches = 0.0, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.phase == "dendrite":
            for layer in dn.dendrite_layers(pl_module.model).values():
                layer.trace = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Dendrite phase: the loss has given each layer's output its error; add the gradient of
        the correlation objective to the new dendrites' input weights."""
        if self.phase != "dendrite":
            return
        objective, corr, n = 0.0, 0.0, 0
        for layer in dn.dendrite_layers(pl_module.model).values():
            pairs = [(x, y.grad) for x, y in layer.trace or [] if y.grad is not None]
            layer.trace = None
            if not pairs:
                continue  # this layer's output does not reach the loss
            with trainer.precision_plugin.forward_context():  # the forward's precision (autocast under *-mixed)
                a = torch.cat([dn.samples(layer.activations(x)[-1], layer.conv) for x, _ in pairs]).float()
            e = torch.cat([dn.samples(g, layer.conv) for _, g in pairs]).float()
            e = e / e.std().clamp_min(1e-30)  # the loss's scale does not matter, only the error's pattern
            objective = objective + dn.correlation_objective(a, e)
            with torch.no_grad():
                ac, ec = a - a.mean(0), e - e.mean(0)
                r = (ac * ec).mean(0) / (ac.std(0, unbiased=False) * ec.std(0, unbiased=False)).clamp_min(1e-12)
                corr, n = corr + r.abs().mean().item(), n + 1
        if n == 0:
            return
        params = [p for p in dn.dendrite_parameters(pl_module.model, "newest") if p.requires_grad]
        grads = torch.autograd.grad(-objective, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        self._score_sum += objective.item()
        self._corr_sum += corr / n
        self._batches += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in dn.dendrite_layers(pl_module.model).values():
            layer.trace = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before ModelCheckpoint (Lightning runs checkpoint callbacks last): a checkpoint saved
        # now holds the structure decided here.
        if trainer.sanity_checking or self.phase == "done":
            return
        if self.monitor not in trainer.callback_metrics:
            raise ConfigError(f"callbacks.perforated.monitor: {self.monitor!r} is not a logged metric; "
                              f"this run logs {sorted(trainer.callback_metrics)}")
        value = float(trainer.callback_metrics[self.monitor])
        self.history.append({"epoch": trainer.current_epoch, "value": value, "phase": self.phase,
                             "sets": self._n_sets(pl_module.model)})
        if self._better(value, self.best):
            self.best = value
            self._remember_best(pl_module.model)
        if self.phase == "neuron":
            self.validations += 1
            if self._better(value, self.reference, self.min_delta):
                self.reference, self.stale = value, 0
            else:
                self.stale += 1
            plateau = self.validations >= self.switch_every if self.switch_every else self.stale >= self.patience
            if plateau:
                self._end_neuron_phase(trainer, pl_module)
        self._log(trainer, pl_module)

    def _end_neuron_phase(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        if self.before_set is not None:  # judge the newest set
            if self._better(self.best, self.before_set, self.min_delta):
                self.tries = 0
                self._event(trainer, f"set {self._n_sets(model)} kept: best {self.before_set:.4g} -> {self.best:.4g}")
            else:
                self.tries += 1
                self._revert(trainer, pl_module)
                self._event(trainer, f"no improvement (best {self.best:.4g}): reverted to the best state, "
                                     f"{self._n_sets(model)} sets")
        if self._n_sets(model) >= self.max_sets or self.tries >= self.max_tries:
            if self.before_set is None or self.tries == 0:
                self._revert(trainer, pl_module)
            self.phase, self.before_set = "done", None
            trainer.should_stop = True
            self._event(trainer, f"done: {self._n_sets(model)} dendrite sets, best {self.best:.4g}")
            return
        self.before_set = self.best
        layers = dn.select_layers(model, self.types, self.names, self.exclude)
        dn.add_dendrites(model, layers, self.init_scale, seed=self.seed + self.sets_added)
        self.sets_added += 1
        self._event(trainer, f"dendrite set {self._n_sets(model)} added to {len(layers)} layers")
        if self.method == "correlation":
            self.candidate_epoch, self.candidate_best, self.candidate_stale = 0, -math.inf, 0
            self._enter("dendrite", pl_module)
        else:
            self._enter("neuron", pl_module)
        self._new_optimizer(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase != "dendrite" or self._batches == 0:
            return
        score, corr = self._score_sum / self._batches, self._corr_sum / self._batches
        self._log(trainer, pl_module, correlation_objective=score, correlation=corr)
        self.candidate_epoch += 1
        if self.candidate_epoch == 1 or score > self.candidate_best * (1 + self.min_delta):
            self.candidate_best, self.candidate_stale = score, 0
        else:
            self.candidate_stale += 1
        if self.candidate_epoch >= self.candidate_epochs or self.candidate_stale >= self.candidate_patience:
            self._event(trainer, f"dendrite inputs frozen after {self.candidate_epoch} epochs "
                                 f"(mean |correlation| {corr:.3f})")
            self._enter("neuron", pl_module)
            self._new_optimizer(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in dn.dendrite_layers(pl_module.model).values():
            layer.trace = None
        if self.figure and self.history and trainer.is_global_zero:
            path = plots.save(self.plot(), Path(trainer.default_root_dir) / self.figure)
            for lg in trainer.loggers:
                if isinstance(lg, MLFlowLogger):
                    lg.experiment.log_artifact(lg.run_id, str(path))

    # ------------------------------------------------------------------ figure

    def plot(self) -> Figure:
        """Validation metric versus epoch: neuron and dendrite phases, restructurings marked."""
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.subplots()
        epochs = [h["epoch"] for h in self.history]
        values = [h["value"] for h in self.history]
        ax.plot(epochs, values, color="0.6", lw=1, zorder=1)
        for phase, color in (("neuron", "tab:blue"), ("dendrite", "tab:orange")):
            pts = [(h["epoch"], h["value"]) for h in self.history if h["phase"] == phase]
            if pts:
                ax.scatter(*zip(*pts), s=14, color=color, label=f"{phase} learning", zorder=2)
        # Each change between the epoch it was decided in and the next.
        kinds = (("added", "tab:green", "--", "dendrite set added"), ("frozen", "0.5", ":", "dendrite inputs frozen"),
                 ("reverted", "tab:red", "--", "reverted to the best state"), ("done", "black", "-", "stopped"))
        for key, color, style, label in kinds:
            at = [e["epoch"] + 0.5 for e in self.events if key in e["event"]]
            for k, x in enumerate(at):
                ax.axvline(x, color=color, ls=style, lw=1, label=label if k == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"Perforated backpropagation ({self.method}): validation {self.monitor}")
        ax.legend(fontsize=8, loc="lower left" if self.mode == "min" else "upper left")
        return fig
