"""neuroformer: training platform for foundation models of brain data."""

import os
import warnings

__version__ = "0.1.0"


def _quiet_third_party() -> None:
    """Silence noise from libraries that the project cannot fix, in this one place.

    - Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates;
    - SQLAlchemy warns about a loader strategy inside MLflow's tracking store;
    - MLflow draws a download bar for every artifact it reads back while logging a model,
      which turns log files into walls of carriage returns.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_quiet_third_party()
