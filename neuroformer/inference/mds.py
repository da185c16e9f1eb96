"""Most discriminative stimuli (MDS; Burg et al., ICLR 2024): cluster units by the stimuli that
tell their groups apart, using a model that predicts responses.

The model is anything with ``predict_responses(stimulus (B, T, H, W)) -> rates (B, U)``,
differentiable in the stimulus (``neuroformer.models.twin.ResponseModel``). Each unit's
responses are normalised by its mean response ``m`` to a set of reference stimuli
(``normalize``): ``r / (r + m)`` by default (bounded in [0, 1), so that no stimulus can make a
unit's response arbitrarily large), or ``r / m``. With ``r_c(s)`` the mean normalised response
of cluster ``c`` to stimulus ``s``, the objective of cluster ``k``'s stimulus ``s_k`` is

    J_k = log K + r_k(s_k) / tau - logsumexp_c r_c(s_k) / tau

(``log K`` plus the log-softmax of cluster ``k``), so ``J_k`` lies in ``(-inf, log K]``: 0 when
every cluster responds alike (chance), ``log K`` when only cluster ``k`` responds.

The algorithm alternates, like expectation-maximisation:

1. **Initialise** ``n_clusters`` clusters (more than expected) by k-means on the units'
   response profiles over the reference stimuli (or at random), and each cluster's stimulus
   by the reference clip with the highest ``J_k``.
2. **Optimise** every cluster's stimulus to maximise its ``J_k`` by Adam, warm-started from
   the last iteration's stimulus. A stimulus is ``Constraint(parameters)``: smoothed in space
   and time (Gaussian), clipped to the stimulus range, and scaled into an L2 ball of radius
   ``norm`` (by default the mean norm of the reference clips).
3. **Reassign** every unit to the cluster whose stimulus drives it most (normalised response),
   and **delete** clusters left empty.
4. Repeat 2-3 until no unit changes cluster or ``max_iter`` iterations. At a fixed point,
   **merge** the pair of clusters told apart least if their pairwise ``separation`` (J of
   each one's stimulus against the other alone) is under ``min_separation``; else try to
   **split** each of the largest clusters in two (k-means on its units' profiles; the new half
   starts from the reference clip that drives it best), optimise all stimuli, and keep the
   split if both halves are still told apart (``min_separation``) from each other and from
   every other cluster; then continue
   alternating. Stop at a fixed point where nothing merges or splits.

Why pairs and not the mean J: the mean of ``J_k`` is bounded by ``log K``, so it rises with
the number of clusters whatever they are; measured on the twin of the simulated recording,
splitting a true type in random halves raised it at every step (docs/mds.md). The pairwise
separation is bounded by ``log 2`` for every K.

Everything here is a pure function of a model and tensors; ``neuroformer.callbacks.mds`` runs it
during training and ``python -m neuroformer.mds`` on a registered model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from neuroformer.cli import option
from neuroformer.errors import ConfigError
from neuroformer.inference.smoothing import gaussian_smooth

log = logging.getLogger(__name__)

NORMALIZE = ("saturate", "mean", "none")


@dataclass(frozen=True)
class MDSConfig:
    """Settings of an MDS clustering (``conf/callbacks/mds.yaml``, ``python -m neuroformer.mds``)."""

    n_clusters: int = option(12, "clusters to start from (more than expected: empty ones are deleted)")
    tau: float = option(1.6, "temperature of the objective (the authors' code uses 1.6)")
    normalize: str = option("saturate", "per-unit responses: saturate (r / (r + m), m the unit's mean response to "
                                        "the reference stimuli: bounded, so J cannot saturate at log K), mean "
                                        "(r / m) or none")
    init: str = option("kmeans", "initial clusters: kmeans (on responses to the reference stimuli) or random")
    steps: int = option(50, "Adam steps per stimulus and iteration")
    lr: float = option(0.1, "Adam step size, in the model's stimulus units")
    norm: float = option(0.0, "L2 norm budget of a stimulus clip; 0: the mean norm of the reference clips")
    clip: bool = option(True, "clip stimuli to the stimulus range")
    smooth_space: float = option(2.0, "Gaussian smoothing of the stimuli in space, pixels (0: none)")
    smooth_time: float = option(1.0, "Gaussian smoothing of the stimuli in time, frames (0: none)")
    max_iter: int = option(20, "alternations at most (each: optimise, reassign; a split step counts as one)")
    min_separation: float = option(0.05, "two clusters are kept apart only if each one's stimulus separates it "
                                         "from the other by this much J (nats; at most log 2)")
    merge: bool = option(True, "at a fixed point, merge the pair of clusters told apart least if under "
                               "min_separation")
    split: bool = option(True, "at a fixed point, try splitting the largest clusters; keep the split whose halves "
                               "stay told apart by min_separation from each other and every other cluster")
    split_tries: int = option(3, "largest clusters tried at each split step")
    min_units: int = option(2, "a split must leave at least this many units in each half")
    seed: int = option(0, "seed of k-means and of the random initial clusters")
    centre: bool = option(True, "use the model's centred() view where it has one (every unit's receptive field "
                                "at the centre: cluster by what units respond to, not where)")

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise ConfigError(f"mds n_clusters must be >= 1; got {self.n_clusters}")
        if not self.tau > 0:
            raise ConfigError(f"mds tau must be > 0; got {self.tau}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"mds normalize must be one of {NORMALIZE}; got {self.normalize!r}")
        if self.init not in ("kmeans", "random"):
            raise ConfigError(f"mds init must be 'kmeans' or 'random'; got {self.init!r}")
        if self.steps < 1 or self.max_iter < 1:
            raise ConfigError("mds steps and max_iter must be >= 1")


@dataclass
class MDSResult:
    """An MDS clustering.

    Attributes:
        labels: (U,) int64 cluster of each unit, 0..K-1.
        stimuli: (K, T, H, W) float32 the most discriminative stimulus of each cluster.
        objective: (K,) J_k of each cluster's stimulus (at most log K).
        responses: (K, U) normalised response of every unit to every cluster's stimulus.
        scale: (U,) each unit's mean response to the reference stimuli (the normalisation).
        history: one dict per iteration: step ("optimise" or "split"), n_clusters, mean_J,
            changed (units that changed cluster), seconds.
    """

    labels: np.ndarray
    stimuli: np.ndarray
    objective: np.ndarray
    responses: np.ndarray
    scale: np.ndarray
    history: list[dict] = field(default_factory=list)

    @property
    def n_clusters(self) -> int:
        return len(self.stimuli)


# --------------------------------------------------------------------------- the objective


def cluster_means(responses: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(S, K) mean response of each cluster's units to each stimulus; responses (S, U), labels (U,)."""
    onehot = F.one_hot(labels, k).to(responses.dtype)  # (U, K)
    return responses @ onehot / onehot.sum(0).clamp_min(1)


def discriminability(means: torch.Tensor, tau: float) -> torch.Tensor:
    """(K,) J_k of stimulus k for cluster k, from ``means`` (K, K) [stimulus k, cluster c].

    ``log K + log_softmax(means[k] / tau)[k]``: at most log K, 0 when all clusters respond alike.
    """
    k = means.shape[1]
    return math.log(k) + torch.log_softmax(means / tau, dim=1).diagonal()


def reassign(responses: torch.Tensor) -> torch.Tensor:
    """(U,) the stimulus (cluster) that drives each unit most; responses (K, U) normalised."""
    return responses.argmax(dim=0)


# --------------------------------------------------------------------------- k-means


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """(n,) labels 0..k-1 of the rows of ``x`` (n, d): k-means++ starts, the best of ``restarts``."""
    x = np.asarray(x, np.float64)
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    best, best_cost = np.zeros(len(x), np.int64), np.inf
    for _ in range(restarts):
        centres = x[[rng.integers(len(x))]]
        for _ in range(1, k):  # k-means++: far points are likelier next centres
            d2 = ((x[:, None] - centres[None]) ** 2).sum(-1).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            centres = np.vstack([centres, x[rng.choice(len(x), p=p)]])
        for _ in range(iters):
            labels = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        cost = ((x - centres[labels]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def profiles(responses: np.ndarray) -> np.ndarray:
    """(U, N) each unit's responses (N, U) to N stimuli, z-scored per unit (k-means features)."""
    r = np.asarray(responses, np.float64).T
    return (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-9)


# --------------------------------------------------------------------------- stimuli


@dataclass(frozen=True)
class Constraint:
    """What a stimulus may be: smoothed, clipped to ``bounds``, inside an L2 ball of radius ``norm``."""

    norm: float
    bounds: tuple[float, float] | None = None
    smooth_space: float = 0.0
    smooth_time: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(K, T, H, W) free parameters -> (K, T, H, W) allowed stimuli (differentiable)."""
        x = gaussian_smooth(gaussian_smooth(x, self.smooth_space, (2, 3)), self.smooth_time, (1,))
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
        return x * (self.norm / norms).clamp(max=1.0).view(-1, 1, 1, 1)


@dataclass(frozen=True)
class Normalizer:
    """Per-unit normalisation of responses (``MDSConfig.normalize``).

    Attributes:
        scale: (U,) each unit's mean response to the reference stimuli (m).
        kind: "saturate" (r / (r + m), in [0, 1)), "mean" (r / m) or "none" (r).
    """

    scale: torch.Tensor
    kind: str = "saturate"

    def __call__(self, responses: torch.Tensor) -> torch.Tensor:
        """(..., U) responses -> (..., U) normalised responses."""
        if self.kind == "saturate":
            return responses / (responses + self.scale)
        return responses / self.scale if self.kind == "mean" else responses


def respond(model, stimuli: torch.Tensor, normalizer: Normalizer | None = None, batch_size: int = 256
            ) -> torch.Tensor:
    """(S, U) responses of ``model`` to ``stimuli`` (S, T, H, W), normalised if asked, without gradients."""
    with torch.no_grad():
        raw = torch.cat([model.predict_responses(stimuli[i:i + batch_size])
                         for i in range(0, len(stimuli), batch_size)])
    return normalizer(raw) if normalizer is not None else raw


def optimize_stimuli(model, init: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, constraint: Constraint,
                     tau: float, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise every cluster's J_k over its own stimulus, warm-started from ``init`` (K, T, H, W).

    Returns the constrained stimuli (K, T, H, W) and their J (K,), both detached.
    """
    k = len(init)
    param = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            means = cluster_means(normalizer(model.predict_responses(constraint(param))), labels, k)
            # Stimulus k moves only J_k: one backward pass through the sum serves all clusters.
            (grad,) = torch.autograd.grad(-discriminability(means, tau).sum(), param)
            param.grad = grad
            optimizer.step()
    stimuli = constraint(param).detach()
    with torch.no_grad():
        objective = discriminability(cluster_means(normalizer(model.predict_responses(stimuli)), labels, k), tau)
    return stimuli, objective


def best_reference(ref_responses: torch.Tensor, labels: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """(K,) index of the reference stimulus with the highest J_k for each cluster; ref_responses (N, U)."""
    means = cluster_means(ref_responses, labels, k)  # (N, K)
    return (torch.log_softmax(means / tau, dim=1)).argmax(dim=0)


# --------------------------------------------------------------------------- the algorithm


def separation(responses: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """(K, K) J of stimulus a for cluster a against cluster b alone: ``[a, b] = log 2 +
    log_softmax([r_a(s_a), r_b(s_a)] / tau)[0]`` (diagonal: 0); responses (K, U) normalised.

    Two clusters are told apart if each one's stimulus separates it from the other:
    ``min(S[a, b], S[b, a]) >= MDSConfig.min_separation``. Unlike the mean of J_k, bounded by
    log K and so larger for more clusters whatever they are, this decides merges and splits.
    """
    means = cluster_means(responses, labels, len(responses))  # (K stimuli, K clusters)
    own = means.diagonal()[:, None]
    return math.log(2) + own / tau - torch.logaddexp(own / tau, means / tau)


def _compact(labels: torch.Tensor, stimuli: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Delete empty clusters: labels renumbered 0..K'-1 in order, stimuli of the kept clusters."""
    kept = torch.unique(labels)
    return torch.searchsorted(kept, labels), stimuli[kept]


class _Search:
    """The model, the reference data and the settings that every step of ``mds`` shares."""

    def __init__(self, model, reference: torch.Tensor, cfg: MDSConfig, bounds: tuple[float, float] | None):
        self.model, self.reference, self.cfg = model, reference, cfg
        raw = respond(model, reference)  # (N, U)
        self.normalizer = Normalizer(raw.mean(0).clamp_min(1e-6), cfg.normalize)
        self.ref_responses = self.normalizer(raw)
        self.feats = profiles(self.ref_responses.cpu().numpy())  # (U, N)
        norm = cfg.norm or float(reference.flatten(1).norm(dim=1).mean())
        self.constraint = Constraint(norm, bounds if cfg.clip else None, cfg.smooth_space, cfg.smooth_time)

    def initial_labels(self) -> torch.Tensor:
        cfg, n_units = self.cfg, self.ref_responses.shape[1]
        if cfg.init == "kmeans":
            labels = kmeans(self.feats, cfg.n_clusters, seed=cfg.seed)
        else:
            labels = np.random.default_rng(cfg.seed).integers(cfg.n_clusters, size=n_units)
        labels = torch.from_numpy(labels).to(self.reference.device)
        return torch.searchsorted(torch.unique(labels), labels)

    def start(self, labels: torch.Tensor) -> torch.Tensor:
        """(K, T, H, W) each cluster's best reference clip, constrained."""
        k = int(labels.max()) + 1
        return self.constraint(self.reference[best_reference(self.ref_responses, labels, k, self.cfg.tau)])

    def optimize(self, stimuli: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stimuli (K, T, H, W) optimised for ``labels``, and their J (K,)."""
        cfg = self.cfg
        return optimize_stimuli(self.model, stimuli, labels, self.normalizer, self.constraint, cfg.tau, cfg.steps,
                                cfg.lr)

    def pair_separation(self, stimuli: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, K) min(S[a, b], S[b, a]) of ``separation``; the diagonal is +inf."""
        sep = separation(respond(self.model, stimuli, self.normalizer), labels, self.cfg.tau)
        pair = torch.minimum(sep, sep.T)
        return pair + torch.diag(torch.full((len(pair),), math.inf, device=pair.device))

    def merge(self, stimuli: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The two clusters told apart least, merged, if their separation is under ``min_separation``."""
        if len(stimuli) < 2:
            return None
        pair = self.pair_separation(stimuli, labels)
        flat = int(pair.flatten().argmin())
        keep, drop = sorted(divmod(flat, len(pair)))
        if pair[keep, drop] >= self.cfg.min_separation:
            return None
        labels = labels.clone()
        labels[labels == drop] = keep
        return _compact(labels, stimuli)[::-1]

    def split(self, stimuli: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The best split of one of the largest clusters in two (k-means on its units' profiles; the
        new half starts from its best reference clip), if after optimising both halves are still
        told apart (``min_separation``) from each other and from every other cluster."""
        cfg, k = self.cfg, len(stimuli)
        sizes = torch.bincount(labels, minlength=k)
        best, best_score = None, cfg.min_separation
        for c in torch.argsort(sizes, descending=True, stable=True)[: cfg.split_tries].tolist():
            members = torch.nonzero(labels == c).flatten()
            if len(members) < 2 * cfg.min_units:
                continue
            halves = kmeans(self.feats[members.cpu().numpy()], 2, seed=cfg.seed)
            if min(np.bincount(halves, minlength=2)) < cfg.min_units:
                continue
            trial = labels.clone()
            trial[members[torch.from_numpy(halves).to(labels.device) == 1]] = k
            fresh = self.constraint(self.reference[best_reference(self.ref_responses, trial, k + 1, cfg.tau)[k:]])
            new, _ = self.optimize(torch.cat([stimuli, fresh]), trial)
            # Only the pairs with a half count: a pair elsewhere near the threshold says nothing of this split.
            score = float(self.pair_separation(new, trial)[[c, k]].min())
            if score >= best_score:
                best, best_score = (new, trial), score
        return best


def mds(model, reference: torch.Tensor, cfg: MDSConfig = MDSConfig(),
        bounds: tuple[float, float] | None = None) -> MDSResult:
    """Cluster the model's units by most discriminative stimuli (module docstring).

    Args:
        model: has ``predict_responses(stimulus (B, T, H, W)) -> (B, U)``; left in its mode.
        reference: (N, T, H, W) stimuli the model was trained on (e.g. training clips): they
            set the normalisation, the initial clusters and stimuli and the norm budget.
        cfg: the settings.
        bounds: (low, high) stimulus range in the model's units (used when ``cfg.clip``).

    Returns:
        The clustering, its stimuli and per-iteration history.
    """
    began = time.perf_counter()
    search = _Search(model, reference, cfg, bounds)
    labels = search.initial_labels()
    stimuli = search.start(labels)
    history: list[dict] = []
    for iteration in range(cfg.max_iter):
        stimuli, objective = search.optimize(stimuli, labels)
        new = reassign(respond(model, stimuli, search.normalizer))
        changed = int((new != labels).sum())
        entry = {"iteration": iteration, "step": "optimise", "n_clusters": len(stimuli),
                 "mean_J": float(objective.mean()), "changed": changed}
        labels, stimuli = _compact(new, stimuli)
        if changed == 0:  # a fixed point: merge clusters told apart too little, else try a split
            for step, enabled, move in (("merge", cfg.merge, search.merge), ("split", cfg.split, search.split)):
                moved = move(stimuli, labels) if enabled else None
                if moved is not None:
                    stimuli, labels = moved
                    entry["step"] = step
                    break
        entry.update(n_clusters_after=len(stimuli), seconds=time.perf_counter() - began)
        history.append(entry)
        log.info("MDS iteration %d: %d clusters, mean J %.3f (at most log K = %.3f), %d units changed%s, %.0f s",
                 iteration, entry["n_clusters"], entry["mean_J"], math.log(entry["n_clusters"]), changed,
                 "" if entry["step"] == "optimise" else f"; {entry['step']} -> {len(stimuli)} clusters",
                 entry["seconds"])
        if changed == 0 and entry["step"] == "optimise":
            break
    final = respond(model, stimuli, search.normalizer)
    with torch.no_grad():
        objective = discriminability(cluster_means(final, labels, len(stimuli)), cfg.tau)
    return MDSResult(labels.cpu().numpy(), stimuli.cpu().numpy(), objective.cpu().numpy(),
                     final.cpu().numpy(), search.normalizer.scale.cpu().numpy(), history)
