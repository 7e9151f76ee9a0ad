"""Tracking: with ``[study] track = "mlflow"``, every finished trial is an MLflow run, and so is
confirm's verdict.

Each worker logs the trials it finishes (so workers on other machines log theirs), through Optuna's
``MLflowCallback`` (optuna-integration): the parameters, the value under the study's metric name,
the state, the distributions and the trial's user attrs as tags. Added here, what it cannot know:
the arm as the ``arm`` tag, each LR group's learning rate as an ``lr.<group>`` param (the trial's
``lr_groups``), and the evaluation curve as the ``eval_<metric>`` metric at each training step (its
``evals``). Search trials of both arms go to the experiment named after the study, confirmation
runs and the verdict to ``<study>.confirm``.

Tracking never fails a trial: a run that cannot be logged (server down, a locked file) is a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna

from llrd_search.exceptions import LLRDSearchError

log = logging.getLogger(__name__)

MLFLOW_MISSING = "study.track = \"mlflow\" needs mlflow and optuna-integration: pip install 'llrd-search[track]'"


def tracking_uri(spec: Any, storage_url: str) -> str:
    """``study.track_uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` beside the study's
    SQLite file (where ``run`` puts it: beside the study file), else in the working directory.
    A SQLite file, not MLflow's ``mlruns/`` folder: MLflow 3 refuses its file store by default."""
    if spec.study.track_uri:
        return spec.study.track_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path.cwd()
    if storage_url.startswith("sqlite:///"):
        folder = Path(storage_url.removeprefix("sqlite:///").split("?")[0]).resolve().parent
    return f"sqlite:///{folder / 'mlflow.db'}"


def _imports() -> tuple[Any, Any]:
    try:
        import mlflow
        from optuna_integration.mlflow import MLflowCallback
    except ImportError:
        raise LLRDSearchError(MLFLOW_MISSING) from None
    return mlflow, MLflowCallback


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, made on first use (by whichever worker comes first)."""
    mlflow, _ = _imports()
    client = mlflow.tracking.MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another worker made it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def trial_tracker(spec: Any, storage_url: str) -> Any | None:
    """A ``callback(study, frozen_trial)`` logging each finished trial, or None without ``study.track``.
    Checks the tracking store at once: a wrong URI is one error before any trial, not a warning per trial."""
    if spec.study.track != "mlflow":
        return None
    mlflow, callback_class = _imports()
    uri = tracking_uri(spec, storage_url)
    try:
        exp = experiment_id(uri, spec.study.name)
    except Exception as err:
        raise LLRDSearchError(f"study.track_uri: cannot use the MLflow tracking store {uri}: {type(err).__name__}: {_first_line(err)}") from None
    metric = spec.train.metric

    class _Callback(callback_class):
        def _set_tags(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None:
            super()._set_tags(trial, study)  # inside the trial's active run
            from llrd_search.vocab import ARM_ATTR

            mlflow.set_tags({"arm": trial.user_attrs.get(ARM_ATTR, "llrd"), "optuna_study": study.study_name})
            mlflow.log_params({f"lr.{row['name']}": row["lr"] for row in trial.user_attrs.get("lr_groups", [])})
            for row in trial.user_attrs.get("evals", []):
                if row.get(metric) is not None:
                    mlflow.log_metric(f"eval_{metric}", row[metric], step=int(row.get("step", row.get("eval", 0))))

    with warnings.catch_warnings():  # deprecated in optuna-integration 4.9 for OptunaHub, which needs the network
        warnings.simplefilter("ignore", FutureWarning)
        kwargs: dict[str, Any] = {"experiment_id": exp}
        callback = _Callback(tracking_uri=uri, metric_name=metric, create_experiment=False, mlflow_kwargs=kwargs)

    def track(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from llrd_search.vocab import ARM_ATTR

        kwargs["run_name"] = f"{trial.user_attrs.get(ARM_ATTR, 'llrd')}-{trial.number}"
        try:
            callback(study, trial)
        except Exception as err:
            log.warning("trial %d: not logged to MLflow (%s): %s: %s", trial.number, uri, type(err).__name__, _first_line(err))

    return track


def track_verdict(spec: Any, storage_url: str, confirmation: dict[str, Any]) -> str | None:
    """Log ``confirm``'s result (``Confirmation.as_dict()``) as a run of the ``<study>.confirm``
    experiment: the verdicts as metrics and tags. Returns the run id (None without ``study.track``)."""
    if spec.study.track != "mlflow":
        return None
    mlflow, _ = _imports()
    uri = tracking_uri(spec, storage_url)
    client = mlflow.tracking.MlflowClient(uri)
    try:
        run = client.create_run(experiment_id(uri, confirmation["study"]), run_name="verdict", tags={"kind": "verdict"})
        rid = run.info.run_id
        metrics: dict[str, float] = {}
        v = confirmation.get("verdict")
        if v:
            client.set_tag(rid, "winner_trial", v["winner"])
            metrics |= {"winner_mean": v["mean"], "winner_std": v["std"], "winner_seeds": v["n"]}
            if v.get("within_noise") is not None:
                metrics["within_noise"] = float(v["within_noise"])
        p = confirmation.get("llrd_vs_control")
        if p:
            client.set_tag(rid, "verdict", p["text"][:5000])
            metrics |= {"gain": p["gain"], "confirmed": float(p["confirmed"]), "paired_seeds": p["n_seeds"]}
            if p.get("ci95"):
                metrics |= {"gain_ci95_low": p["ci95"][0], "gain_ci95_high": p["ci95"][1]}
        for key, value in metrics.items():
            client.log_metric(rid, key, float(value))
        client.set_terminated(rid)
    except Exception as err:
        log.warning("confirm's verdict not logged to MLflow (%s): %s: %s", uri, type(err).__name__, _first_line(err))
        return None
    return rid


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""
