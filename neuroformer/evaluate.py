"""Evaluate any trained model on held-out data: ``metrics.json`` plus figures, optionally in MLflow.

Usage (``--help`` lists every option)::

    python -m neuroformer.evaluate --model outputs/runs/pretrain/<date>/checkpoints/last.ckpt
    python -m neuroformer.evaluate --model models:/neuroformer-pretrain@champion --data rec.nwb --out eval/
    python -m neuroformer.evaluate model=models:/neuroformer-pretrain/1 n_samples=4

``--model`` is anything ``neuroformer.registry.load`` takes (a checkpoint file, a sharded
checkpoint folder, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``). ``--data`` defaults to
the first recording the model was trained on, read as it was then (``spec.source``). What is
measured is the model family's evaluation (``ModelFamily.evaluate``; the Neuroformer's is
``neuroformer.inference.evaluation``); its settings are the family's ``evaluation_config``
fields, given as further ``--name value`` (or ``name=value``) options. ``train()`` runs the same
evaluation after testing (config key ``evaluate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from neuroformer import cli
from neuroformer.data.nwb import read_nwb
from neuroformer.data.recording import Recording
from neuroformer.errors import ConfigError, RecordingError
from neuroformer.files import write_json
from neuroformer.registry import load
from neuroformer.registry.families import FAMILIES, LoadedModel, family
from neuroformer.registry.loading import DEFAULT_STORE
from neuroformer.registry.tracking import mlflow_logger


def evaluate(loaded: LoadedModel, out: str | Path, settings: Any = None, recording: Recording | None = None) -> dict:
    """Evaluate ``loaded`` with its family's evaluation; writes ``out/metrics.json`` and figures.

    Args:
        loaded: the model (``neuroformer.registry.load``).
        out: folder for metrics.json and the PNG figures.
        settings: the family's ``evaluation_config`` instance (default: its defaults).
        recording: the recording to evaluate on (default: the model's first training recording).

    Returns:
        the summary written to metrics.json: ``model``, ``family``, ``data``, ``settings``,
        ``metrics`` (name -> float), ``plots`` (file names).
    """
    fam = loaded.model_family
    if fam.evaluation_config is None:
        raise ConfigError(f"{loaded.uri}: models of the {fam.name} family have no evaluation")
    settings = settings if settings is not None else fam.evaluation_config()
    if recording is None:
        recording = training_recording(loaded)
    began = time.perf_counter()
    out = Path(out)
    result = fam.evaluate(loaded, out, settings, recording)
    metrics = {**result["metrics"], "seconds": time.perf_counter() - began}
    summary = {
        "model": loaded.uri,
        "family": fam.name,
        "data": str(recording.path),
        "settings": {**dataclasses.asdict(settings), **result.get("settings", {})},
        "metrics": metrics,
        "plots": sorted(p.name for p in out.glob("*.png")),
    }
    write_json(out / "metrics.json", summary)
    return summary


def training_recording(loaded: LoadedModel) -> Recording:
    """The first recording ``loaded`` was trained on, read with the reader options used then."""
    source = loaded.spec.source
    if not source.files:
        raise ConfigError(f"{loaded.uri}: the model does not record which recording it was trained on "
                          "(trained before data sources were saved); pass --data")
    if not Path(source.files[0]).is_file():
        raise RecordingError(source.files[0], "file", f"the recording {loaded.uri} was trained on is not on this "
                             "machine; pass --data with a copy of it")
    return source.read()


def log_to_mlflow(summary: dict, out: Path, store: Path, experiment: str) -> tuple[str, str]:
    """Log an evaluation's metrics, settings and files (metrics.json, PNGs) as one MLflow run.

    Returns:
        the tracking URI and the run id.
    """
    logger = mlflow_logger(experiment, str(store), str(Path(store).parent / "mlartifacts"),
                           run_name=f"evaluate {summary['model']}")
    client, run_id = logger.experiment, logger.run_id
    client.set_tag(run_id, "neuroformer.model", summary["model"])
    client.set_tag(run_id, "neuroformer.data", summary["data"])
    logger.log_hyperparams({k: str(v) for k, v in summary["settings"].items()})
    logger.log_metrics({k: v for k, v in summary["metrics"].items() if np.isfinite(v)})
    for name in ["metrics.json", *summary["plots"]]:
        client.log_artifact(run_id, str(out / name))
    logger.finalize("success")
    return logger._tracking_uri, run_id


def _settings_help() -> str:
    """The evaluation settings of every family, for ``--help``."""
    lines = ["evaluation settings (--name value or name=value), by model family:"]
    for name in FAMILIES:
        config = family(name).evaluation_config
        for f in dataclasses.fields(config) if config is not None else ():
            lines.append(f"  {name}: --{f.name.replace('_', '-')} (default {f.default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "python -m neuroformer.evaluate",
        "Evaluate a trained model on held-out data of a recording (for a Neuroformer: NLB bits per spike, "
        "spike-set F1, PSTH correlation, connectivity on simulated data); writes metrics.json and PNG plots.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _settings_help()
    parser.add_argument("--model", required=True,
                        help="checkpoint, sharded checkpoint folder, or models:/NAME/VERSION | models:/NAME@ALIAS")
    parser.add_argument("--data", type=Path, help="NWB recording (default: the first one the model was trained on)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/evaluations/<date>)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE,
                        help="local MLflow store used when MLFLOW_TRACKING_URI is unset")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                        help="log to MLflow (default: only if MLFLOW_TRACKING_URI is set)")
    parser.add_argument("--experiment", default="evaluate", help="MLflow experiment")
    return parser


def family_settings(config: type, options: list[str]) -> Any:
    """The family's ``config`` dataclass from ``--name value`` / ``name=value`` options."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    values: dict[str, Any] = {}
    tokens = list(options)
    while tokens:
        token = tokens.pop(0)
        name, eq, value = token.removeprefix("--").partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and isinstance(fields[name[3:]].default, bool)
        if negated:
            values[name[3:]] = False
            continue
        if name not in fields:
            raise ConfigError(f"unknown evaluation setting {token!r}; settings of this model: {sorted(fields)}")
        default = fields[name].default
        if isinstance(default, bool) and not eq and (not tokens or tokens[0].startswith("-")):
            values[name] = True
            continue
        if not eq:
            if not tokens:
                raise ConfigError(f"evaluation setting --{name} needs a value")
            value = tokens.pop(0)
        try:
            values[name] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(value)
        except ValueError:
            raise ConfigError(f"evaluation setting {name}: {value!r} is not a {type(default).__name__}") from None
    return config(**values)


def _main(args: argparse.Namespace, options: list[str]) -> int:
    loaded = load(args.model, args.store)
    settings = family_settings(loaded.model_family.evaluation_config, options)
    recording = read_nwb(args.data) if args.data else None
    out = args.out or Path("outputs/evaluations") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    summary = evaluate(loaded, out, settings, recording)
    use_mlflow = args.mlflow if args.mlflow is not None else bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if use_mlflow:
        uri, run_id = log_to_mlflow(summary, out, args.store, args.experiment)
        print(f"MLflow:  {uri} (experiment {args.experiment}, run {run_id})")
    m = summary["metrics"]
    print(f"Evaluated {summary['model']} on {summary['data']}")
    for key, value in m.items():
        print(f"  {key:<34} {value:.4f}")
    print(f"Metrics: {out / 'metrics.json'}\nPlots:   {', '.join(summary['plots'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # The family's settings are known only once the model is loaded: they arrive as ``args.extra``.
    return cli.run(lambda args: _main(args, args.extra), _parser(), argv, extra=True)


if __name__ == "__main__":
    raise SystemExit(main())
