from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from llrd_search.cli import main
from llrd_search.engine.objective import suggest
from llrd_search.spec import default_storage
from llrd_search.study import confirm
from llrd_search.study.storage import load_study, open_storage
from llrd_search.study.worker import run_worker


@pytest.fixture
def searched(write_study):
    """A finished 4-trial random search on the tiny model: (storage URL, study name)."""
    path = write_study(n_trials=4)
    assert main(["run", str(path), "--threads", "1"]) == 0  # 1 thread: fast on a busy shared CPU
    return default_storage(path), "toy"


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        return load_study(storage, name).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _frozen(number: int, value: float | None, params: dict[str, float], state: TrialState = TrialState.COMPLETE):
    t = optuna.trial.create_trial(
        state=state,
        value=value,
        params=params,
        distributions={k: optuna.distributions.FloatDistribution(1e-9, 1.0) for k in params},
    )
    t.number = number
    return t


def test_lead_text_for_one_configuration_says_what_is_true():
    from llrd_search.cli.result_cmds import lead_text
    from llrd_search.records import Verdict

    one = Verdict(winner=3, mean=0.8, std=0.01, n=3, runner_up=None, lead=None, noise=None, within_noise=None)
    assert lead_text(one, 1, True) == "one LLRD configuration was confirmed (no LLRD runner-up to rank it against); it is compared with the control below"
    assert lead_text(one, 1, False).endswith("there is no other configuration to compare it with")
    assert lead_text(one, 3, True).startswith("one of 3 LLRD configurations finished")
    two = Verdict(winner=3, mean=0.8, std=0.01, n=3, runner_up=1, lead=0.002, noise=0.01, within_noise=True)
    assert "WITHIN NOISE" in lead_text(two, 2, True)


def test_top_trials_distinct_params_best_first_and_keeps_previous_choice():
    a = {"base_lr": 1e-4, "head_lr": 1e-3, "decay": 0.9}
    b = {"base_lr": 2e-4, "head_lr": 1e-3, "decay": 0.8}
    c = {"base_lr": 3e-4, "head_lr": 1e-3, "decay": 0.7}
    trials = [
        _frozen(0, 0.80, a),
        _frozen(1, 0.90, b),
        _frozen(2, 0.90, dict(b)),  # a retry of the same point: counts once, the earlier wins
        _frozen(3, 0.85, c),
        _frozen(4, None, a, TrialState.PRUNED),
    ]
    assert [t.number for t in confirm.top_trials(trials, 2)] == [1, 3]
    assert [t.number for t in confirm.top_trials(trials, 10)] == [1, 3, 0]
    # a previous choice stays first (resuming never reshuffles the configurations)
    assert [t.number for t in confirm.top_trials(trials, 2, keep=[0])] == [0, 1]


def test_verdict_flags_a_lead_within_noise():
    rows = [
        {"source_trial": 1, "mean": 0.90, "std": 0.02, "n": 3},
        {"source_trial": 2, "mean": 0.89, "std": 0.02, "n": 3},
    ]
    v = confirm.verdict(rows)
    assert v["winner"] == 1 and v["runner_up"] == 2
    assert v["noise"] == pytest.approx(2.7764451 * math.sqrt(2 * 0.02**2 / 3))  # Welch: df = 4
    assert v["within_noise"] is True
    rows[1]["mean"] = 0.80
    assert confirm.verdict(rows)["within_noise"] is False
    rows[1]["n"] = 1  # one run has no spread: cannot judge
    assert confirm.verdict(rows)["within_noise"] is None
    assert confirm.verdict([{"source_trial": 3, "mean": math.nan, "std": math.nan, "n": 0}]) is None


def test_the_lead_is_judged_on_the_seeds_both_ran():
    """With --seeds auto the winner goes on to more seeds than the runner-up: its lead is the
    difference of means over the runner-up's seeds, not of a 5-seed mean and a 3-seed one."""
    winner = {"source_trial": 1, "by_seed": {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.70, 4: 0.70}}
    second = {"source_trial": 2, "by_seed": {0: 0.79, 1: 0.81, 2: 0.83}}
    for r in (winner, second):
        vals = list(r["by_seed"].values())
        r.update(n=len(vals), mean=sum(vals) / len(vals), std=float(np.std(vals, ddof=1)))
    assert winner["mean"] < second["mean"]  # over unequal seeds the winner would seem to trail
    v = confirm.verdict([winner, second])
    assert v["lead"] == pytest.approx(0.01) and v["n"] == 5  # the winner's own row keeps all its seeds
    assert v["noise"] == pytest.approx(2.7764451 * math.sqrt(2 * 0.02**2 / 3))  # Welch on the shared 3 seeds


def test_confirm_runs_top_k_times_s_in_linked_study_and_resumes(searched, capsys):
    url, name = searched
    assert confirm.confirmation_summary(url, name) is None  # nothing confirmed yet
    search = _trials(url, name)
    expected = [t.number for t in sorted((t for t in search if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))[:2]]

    assert main(["confirm", "--storage", url, "--study", name, "--top", "2", "--seeds", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "winner: trial" in out and "±" in out

    linked = _trials(url, f"{name}.confirm")
    assert len(linked) == 4 and all(t.state == TrialState.COMPLETE for t in linked)
    assert sorted(t.user_attrs["llrd:confirm_of"] for t in linked) == sorted(expected * 2)
    # fresh seeds: no confirmation run reuses a seed of the search
    assert not {t.user_attrs["seed"] for t in linked} & {t.user_attrs["seed"] for t in search}
    by_source = {t.number: t.params for t in search}
    for t in linked:
        assert t.params == by_source[t.user_attrs["llrd:confirm_of"]]

    summary = confirm.confirmation_summary(url, name)
    assert sorted(r["source_trial"] for r in summary) == sorted(expected)
    assert [r["mean"] for r in summary] == sorted((r["mean"] for r in summary), reverse=True)
    for r in summary:
        assert r["n"] == 2 and len(r["accuracies"]) == 2
        assert r["mean"] == pytest.approx(sum(r["accuracies"]) / 2)
        assert r["std"] == pytest.approx(abs(r["accuracies"][0] - r["accuracies"][1]) / math.sqrt(2))
        assert r["search_accuracy"] == next(t.value for t in search if t.number == r["source_trial"])
        assert set(r["params"]) == {"base_lr", "head_lr", "decay"}

    # resumable: the same command again runs nothing new and reports the same numbers
    assert main(["confirm", "--storage", url, "--study", name, "--top", "2", "--seeds", "2", "--threads", "1"]) == 0
    assert len(_trials(url, f"{name}.confirm")) == 4
    assert confirm.confirmation_summary(url, name) == summary
    # a smaller request keeps what exists; a larger S adds only the missing runs
    assert main(["confirm", "--storage", url, "--study", name, "--top", "1", "--seeds", "3", "--threads", "1"]) == 0
    linked = _trials(url, f"{name}.confirm")
    assert len(linked) == 6
    assert [r["n"] for r in confirm.confirmation_summary(url, name)] == [3, 3]


def test_failed_run_is_replaced_and_untagged_trials_are_ignored(searched):
    url, name = searched
    plan = confirm.prepare(url, name, top=1, seeds=2)
    assert plan.created and len(plan.sources) == 1
    storage = open_storage(url)
    linked = load_study(storage, plan.study_name)
    meta = json.loads(linked.user_attrs[confirm.META_ATTR])
    assert meta["sources"] == plan.sources
    assert int(linked.user_attrs["llrd:n_trials"]) == 2  # budget = exactly the queued runs

    first = linked.ask()  # pops the first queued run
    assert first.user_attrs["llrd:confirm_of"] == plan.sources[0]
    first.set_user_attr("fail_reason", "TrainingError: loss became nan")
    linked.tell(first, state=TrialState.FAIL)
    assert confirm.top_up(storage, linked) == 1  # replaced, with the failed run's own seed (pairing)
    assert confirm.top_up(storage, linked) == 0  # idempotent
    waiting = [t for t in linked.get_trials() if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["llrd:confirm_rep"] for t in waiting) == [0, 1]
    replaced = next(t for t in waiting if t.user_attrs["llrd:confirm_rep"] == first.user_attrs["llrd:confirm_rep"])
    assert replaced.user_attrs["llrd:seed"] == first.user_attrs["llrd:seed"]
    # a trial with no confirmation tag (a sampler point) never counts
    linked.add_trial(optuna.trial.create_trial(value=0.99, params=first.params, distributions=first.distributions))
    storage.engine.dispose()
    summary = confirm.confirmation_summary(url, name)
    assert summary[0]["n"] == 0 and summary[0]["n_failed"] == 1 and math.isnan(summary[0]["mean"])


def test_confirm_refuses_a_confirmation_study_and_bad_arguments(searched):
    url, name = searched
    confirm.prepare(url, name, top=1, seeds=1)
    with pytest.raises(Exception, match="itself a confirmation study"):
        confirm.prepare(url, f"{name}.confirm", top=1, seeds=1)
    assert main(["confirm", "--storage", url, "--study", "nope", "--top", "1", "--seeds", "1"]) != 0
    assert main(["confirm", "--storage", url, "--study", name, "--top", "0"]) != 0


def test_summary_is_sorted_by_mean_with_sample_std(searched):
    url, name = searched
    plan = confirm.prepare(url, name, top=2, seeds=2)
    storage = open_storage(url)
    linked = load_study(storage, plan.study_name)
    values = {plan.sources[0]: [0.6, 0.7], plan.sources[1]: [0.9, 0.8]}
    for _ in range(4):
        trial = linked.ask()
        linked.tell(trial, values[trial.user_attrs["llrd:confirm_of"]].pop(0))
    storage.engine.dispose()
    summary = confirm.confirmation_summary(url, name)
    assert [r["source_trial"] for r in summary] == [plan.sources[1], plan.sources[0]]
    assert summary[0]["accuracies"] == [0.9, 0.8] and summary[0]["mean"] == pytest.approx(0.85)
    assert summary[0]["std"] == pytest.approx(0.0707107, rel=1e-5)
    v = confirm.verdict(summary)
    assert v["winner"] == plan.sources[1] and v["lead"] == pytest.approx(0.2)
    # Two seeds each: Welch df = 2, so a lead must exceed 4.303 x SE (0.0707) = 0.304 to count.
    assert v["noise"] == pytest.approx(4.3026527 * 0.0707107, rel=1e-5) and v["within_noise"] is True


def test_in_process_failure_is_replaced_before_the_worker_asks_again(searched):
    url, name = searched
    calls: list[int] = []

    def flaky(spec):
        def objective(trial):
            suggest(trial, spec.space)
            calls.append(trial.number)
            if len(calls) == 1:
                raise RuntimeError("transient failure")
            return 0.5 + 0.01 * len(calls)

        return objective

    def run_workers(linked: str) -> None:
        run_worker(url, linked, objective_factory=flaky, on_trial_end=confirm.retry_hook(url, linked))

    plan, summary = confirm.run_confirmation(url, name, 1, 2, run_workers)
    trials = _trials(url, plan.study_name)
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert all(t.user_attrs.get("llrd:confirm_of") == plan.sources[0] for t in trials)  # no sampled point ran
    assert summary[0]["n"] == 2 and summary[0]["n_failed"] == 1
    assert summary[0]["accuracies"] == [0.52, 0.53]


def test_run_stats_count_diverged_and_failed_runs_and_runs_text_words_them():
    from llrd_search.records import runs_text
    from llrd_search.study.confirm_rows import run_stats

    params = {"base_lr": 1e-4, "head_lr": 1e-3, "decay": 0.9}

    def run(rep: int, state: TrialState, value: float | None = None, **attrs) -> optuna.trial.FrozenTrial:
        dists = {k: optuna.distributions.FloatDistribution(1e-9, 1.0) for k in params}
        return optuna.trial.create_trial(state=state, value=value, params=params, distributions=dists,
                                         user_attrs={"llrd:confirm_of": 7, "llrd:confirm_rep": rep, **attrs})

    trials = [
        run(0, TrialState.COMPLETE, 0.8),
        run(1, TrialState.PRUNED, diverged="loss became nan at step 2 (learning rate too high?)"),
        run(2, TrialState.FAIL, fail_reason="TrainingError: out of memory"),
        run(2, TrialState.COMPLETE, 0.9),  # the failed run's replacement
        run(3, TrialState.FAIL, fail_reason="interrupted (Ctrl-C or SIGTERM)"),  # not a failure of the configuration
        run(4, TrialState.WAITING),
    ]
    row = run_stats(trials, 7, planned=5)
    assert (row["n"], row["n_planned"], row["n_diverged"], row["n_failed"]) == (2, 5, 1, 1)
    assert row["by_seed"] == {0: 0.8, 2: 0.9}
    assert runs_text(row) == "2 of 5, 1 diverged, 1 failed"
    assert runs_text({"n": 5, "n_planned": 5, "n_diverged": 0, "n_failed": 0}) == "5"
    assert runs_text({"n": 4, "n_planned": 5, "n_diverged": 0, "n_failed": 0}) == "4 of 5"  # one still to run
    assert runs_text({"n": 3}) == "3"  # a row from before n_planned was recorded
