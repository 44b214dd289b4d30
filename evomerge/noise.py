"""Third-party output a run does not need: lm-eval's, datasets' and transformers' progress bars and INFO lines, and
the experiment trackers' (MLflow's) INFO lines and deprecation warning.

A run prints its own progress (:mod:`evomerge.progress`, one line per failed trial). Left alone, the libraries
beneath it add "Building contexts" lines and bars (lm-eval), "Generating split" lines and bars (datasets), "Loading
weights" bars (transformers) and Optuna's "A new study created" line to every trial; a tracked search (README
"Tracking with MLflow or W&B") adds MLflow's and alembic's INFO lines (creating the tracking database) and
optuna-integration's FutureWarning that its tracker callbacks are deprecated (the ``mlflow`` / ``wandb`` extras pin
optuna-integration below 6, where they are removed). ``evomerge --verbose`` keeps them all.

MLflow sets its loggers' level and handler when it is imported (from the user's callback factory, after the CLI
quietened the rest): it reads ``MLFLOW_LOGGING_LEVEL`` then, and alembic's level follows it.

lm-eval's "Building contexts" bar is a plain ``tqdm`` with no switch of its own: ``TQDM_DISABLE=1`` makes
``disable=True`` tqdm's default (tqdm >= 4.66 reads ``TQDM_<argument>`` when it is imported), which turns off every
bar that does not set ``disable`` itself; evomerge's own bars always pass ``disable=not progress``.
"""

from __future__ import annotations

import logging
import os
import warnings

#: Environment switches the libraries read when they are imported; a value the user set already is kept.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "MLFLOW_LOGGING_LEVEL": "WARNING"}
#: Loggers whose INFO lines are per-call noise in a search (warnings and errors still show).
QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "huggingface_hub", "mlflow", "alembic")
#: FutureWarnings (message patterns) a run's user cannot act on: optuna-integration's deprecation of the trackers'
#: callbacks (optuna._deprecated: "MLflowCallback has been deprecated in v4.9.0. ...").
QUIET_WARNINGS = (r"(MLflowCallback|WeightsAndBiasesCallback) has been deprecated",)


def quiet_third_party() -> None:
    """Turn the libraries' progress bars off (transformers' follow huggingface_hub's switch), their loggers to
    WARNING and the trackers' deprecation warnings off; call it before they are imported (the CLI does, first
    thing). Optuna is imported here: it sets its logger to INFO when it is imported, so a level set before would not
    hold."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    import optuna  # a light import (no torch)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB with name: ..."
