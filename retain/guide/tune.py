"""``retain tune``: search hybrids and their strengths by training them, with optuna.

Each trial trains one hybrid from the catalogue with strengths drawn from the strategies' declared
ranges, on the target's own data and suite, for a short budget. The hybrids searched are those the
constraints allow (those recorded in the run YAML by ``retain recommend``, narrowed by flags, never
widened) and the target can run, most promising first (kept the floor on the packaged benchmark with
the largest gain, then the rules' order), narrowed to ``max(4, trials // 2)`` so a short search spends
its trials on strengths rather than on one visit per hybrid (``--hybrids`` names them instead). Two
objectives, new-task score and general retention, both up; or, with a retention floor R, one objective
(new-task score) under the constraint retention >= R. Every figure that chooses is on the ``select``
part of each eval. Hopeless trials are pruned from intermediate scores, never for retention alone (see
:mod:`retain.guide.monitor`). The first trials are the hybrids that did best on the packaged benchmark
at their default strengths; optuna's TPE goes on from there. ``ladder`` walks the prototyping path
instead (lora, then + distillation, then + rehearsal or fip, ...) and stops after the first rung that
keeps R.

What keeps R for a few steps need not keep it for a whole run, what misses it may keep it (a protected
run's retention recovers as the learning rate decays), and the best of many noisy trials is flattered
by its own seed and sample (the winner's curse). So ``confirm`` promising trials (spread along the front
of those within 0.1 of R, from the best new-task score to the most retention) are retrained at the full
budget on a fresh seed (``derive_seed(seed, Stream.TUNE_CONFIRM, place)``), still scored on ``select``, and the winner is the
best of those. Only then is the winner read, once, on the ``report`` part: that is the figure
best.yaml, trials.json and the console report, with its interval.

The study lives in ``DIR/study.db`` (sqlite), so a killed tune resumes: finished trials stay, a trial
that was running when the process died is run again with the same settings.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from retain.data.sampling import Stream, derive_seed
from retain.errors import ConfigError, DivergenceError, Interrupted, OutputError, RetainError, StateError
from retain.guide.catalogue import Hybrid, display_name
from retain.guide.evidence import Evidence, load_evidence
from retain.guide.monitor import TrialObserver, prune_reason
from retain.guide.rules import Constraints, ladder, rank, recorded_constraints, tighten
from retain.guide.space import default_values, knobs
from retain.guide.target import TuneTarget
from retain.guide.tune_report import (
    DEFAULT_FLOOR,
    TrialRecord,
    choose_best,
    confirm_band,
    confirm_candidates,
    figure_lines,
    pick,
    report_figures,
    write_trials_json,
    write_tune_report,
)
from retain.io import atomic_write_text, folder_entries, output_errors

STUDY_NAME = "retain-tune"
MARKER = "tune.json"
#: settings that define a tune folder: a resume must use the same ones
#: consecutive repeats of finished settings after which the search stops (the space is exhausted)
MAX_REPEATS = 20
IDENTITY = ("target", "steps", "min_general_retention", "seed", "ladder", "constraints", "hybrids")


@dataclass
class TuneOptions:
    trials: int = 20
    steps: int | None = None
    min_general_retention: float | None = None
    max_minutes: float | None = None
    ladder: bool = False
    seed: int = 0
    #: None: as recorded in the run YAML (``constraints:``), else the widest; given: may only narrow the record
    constraints: Constraints | None = None
    seeds: int | None = None  # trials at default strengths before the search (default: about a third)
    hybrids: list[str] | None = None  # search only these (keys or labels); default: the most promising
    focus: int | None = None  # search the N most promising hybrids (default: max(4, trials // 2))
    confirm: int = 2  # retrain this many promising trials at the target's full budget, on fresh seeds


@dataclass
class TuneResult:
    records: list[TrialRecord]
    best: TrialRecord | None
    keeps_floor: bool
    skipped: dict[str, str]
    out: Path
    confirmed: list[TrialRecord] = field(default_factory=list)


class TuneProgress:
    """Hooks the command line fills with a progress bar; the library default prints nothing."""

    def start(self, total: int, done: int) -> None: ...

    def trial_started(self, number: int, label: str) -> None: ...

    def trial_finished(self, record: TrialRecord, best: TrialRecord | None) -> None: ...

    def confirm_started(self, record: TrialRecord, steps: int) -> None: ...

    def stop(self) -> None: ...


# --- pure helpers ------------------------------------------------------------------------------


def search_space(
    target: TuneTarget, constraints: Constraints, evidence: Evidence | None
) -> tuple[list[Hybrid], dict[str, str]]:
    """(hybrids a trial may train, best-ranked first; {hybrid: why not} for those the target cannot run)."""
    allowed, _ = rank(constraints, evidence)
    eligible, skipped = [], {}
    for item in allowed:
        problem = target.problems(item.hybrid)
        if problem is None:
            eligible.append(item.hybrid)
        else:
            skipped[item.hybrid.key] = problem
    return eligible, skipped


def promising_first(eligible: list[Hybrid], evidence: Evidence | None, floor: float) -> list[Hybrid]:
    """The hybrids in the order a short search should try them: those that kept ``floor`` on the
    benchmark, largest new-task gain first; then those the evidence has not measured (unknown is better
    than known to miss the floor: a newly added method must not fall out of a short search); then those
    measured below the floor. Ties keep the rules' order."""

    def order(i: int) -> tuple[int, float, int]:
        row = evidence.row(eligible[i].key) if evidence is not None else None
        if row is None or row.general_retention is None or row.new_task_gain is None:
            return 1, 0.0, i
        if row.general_retention < floor:
            return 2, 0.0, i
        return 0, -row.new_task_gain, i

    return [eligible[i] for i in sorted(range(len(eligible)), key=order)]


def space_lines(hybrids: list[Hybrid], labels: dict[str, str] | None = None) -> list[str]:
    """What a tune searches, one line per hybrid: its name and each strength's range and how it is drawn."""
    names = {h.key: (labels or {}).get(h.key) or display_name(h) for h in hybrids}
    width = max((len(n) for n in names.values()), default=0)
    lines = []
    for h in hybrids:
        ranges = [f"{k.label} {k.low:g}–{k.high:g} ({'log-uniform' if k.log else 'uniform'}, default {k.default:g})"
                  for k in knobs(h)]
        lines.append(f"{names[h.key]:<{width}}  {'; '.join(ranges) or 'no strength to search: trained at its settings'}")
    return lines


def pick_hybrids(ordered: list[Hybrid], names: list[str]) -> list[Hybrid]:
    """The hybrids ``names`` asks for (catalogue keys, labels or table names), in the order given."""
    picked = []
    for name in names:
        # a key names exactly one hybrid; a label may be shared (full+replay is also joint training's label)
        match = [h for h in ordered if name == h.key] or [h for h in ordered if name in (h.label, display_name(h))]
        if not match:
            raise ConfigError(
                f"--hybrids: {name!r} is not among the hybrids these constraints allow on this target: "
                + ", ".join(display_name(h) for h in ordered)
            )
        picked += [h for h in match[:1] if h not in picked]
    return picked


def ladder_next(rungs: list[str], records: list[TrialRecord], per_rung: int, floor: float) -> str | None:
    """The rung the next ladder trial trains, or None when the ladder is done: each rung gets up to
    ``per_rung`` trials; the first rung where a trial keeps ``floor`` finishes its trials, then the
    ladder stops."""
    finished = [r for r in records if r.state in ("complete", "pruned")]
    for rung in rungs:
        mine = [r for r in finished if r.hybrid == rung]
        met = any(r.scored and r.general_retention >= floor for r in mine)  # type: ignore[operator]
        if len(mine) < per_rung:
            return rung
        if met:
            return None
    return None


def check_folder(out: Path, settings: dict[str, Any]) -> bool:
    """Refuse a non-empty folder that is not a tune, or a tune with other settings; True when resuming."""
    marker = out / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        differ = [k for k in IDENTITY if recorded.get(k) != settings.get(k)]
        if differ:
            raise StateError(
                f"{out} holds a tune with other settings ({', '.join(differ)} differ; see {marker}); "
                "resume it with the same ones, or choose another --out"
            )
        return True
    if out.exists() and (not out.is_dir() or folder_entries(out)):
        raise OutputError(
            f"--out {out} is not empty and is not a tune folder (no {MARKER}); choose an empty or new folder"
        )
    return False


# --- optuna ------------------------------------------------------------------------------------


class _OurErrorsWithoutTraceback(logging.Filter):
    """optuna logs a failed trial's exception with its traceback. Ours are already a clear line: an
    interruption is printed by the CLI (with how to resume), and a trial's RetainError is recorded in the
    trial and the report; neither should reach the user as a stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Interrupted):
            return False
        if isinstance(error, RetainError):
            record.exc_info, record.exc_text = None, None
        return True


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _OurErrorsWithoutTraceback) for f in handler.filters):
            handler.addFilter(_OurErrorsWithoutTraceback())
    return optuna


_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def record_of(trial: Any, labels: dict[str, str]) -> TrialRecord:
    attrs = trial.user_attrs
    key = str(trial.params.get("hybrid", attrs.get("hybrid", "")))
    result = attrs.get("result", {})
    return TrialRecord(
        number=trial.number,
        state=_STATES.get(trial.state.name, trial.state.name.lower()),
        hybrid=key,
        label=labels.get(key, key.split("@")[0]),
        params={k: float(v) for k, v in trial.params.items() if k != "hybrid"},
        strategies=attrs.get("strategies", []),
        steps=attrs.get("steps"),
        intermediate=attrs.get("intermediate", []),
        note=str(attrs.get("note", "")),
        duplicate_of=attrs.get("duplicate_of"),
        seed=attrs.get("seed"),
        **result,
    )


class Tuner:
    def __init__(
        self,
        target: TuneTarget,
        options: TuneOptions,
        out: Path,
        *,
        progress: TuneProgress | None = None,
        evidence: Evidence | None = None,
        train_fn: Callable[..., Any] | None = None,
    ) -> None:
        self.target = target
        self.options = options
        self.out = Path(out)
        self.progress = progress or TuneProgress()
        self.evidence = evidence if evidence is not None else load_evidence()
        flags = {} if options.constraints is None else recorded_constraints(options.constraints)
        self.constraints = tighten(target.constraints, flags, target.task_count, source=target.name)
        self.floor = options.min_general_retention
        if options.ladder and self.floor is None:
            raise ConfigError("--ladder stops at the first rung that keeps a retention floor: set --min-general-retention R")
        if options.trials < 1:
            raise ConfigError(f"--trials must be at least 1 (got {options.trials})")
        allowed, self.skipped = search_space(target, self.constraints, self.evidence)
        if not allowed:
            raise ConfigError("no hybrid fits these constraints on this target: " + "; ".join(
                f"{k}: {v}" for k, v in self.skipped.items()) or "every hybrid is ruled out")
        ordered = promising_first(allowed, self.evidence, DEFAULT_FLOOR if self.floor is None else self.floor)
        self.allowed = ordered  # every hybrid the constraints allow on this target, most promising first
        if options.hybrids:
            self.eligible = pick_hybrids(ordered, options.hybrids)
        elif options.ladder:
            self.eligible = ordered
        else:
            self.eligible = self._recorded(ordered) or ordered[: options.focus or max(4, options.trials // 2)]
        self.by_key = {h.key: h for h in self.eligible}
        self.labels = {h.key: display_name(h) for h in self.eligible}
        self.full_steps = int(target.base["train"]["steps_per_task"])
        steps = options.steps or self.full_steps
        self.every = steps // 2 if steps >= 4 else 0
        self.confirm = options.confirm  # also at the full budget: a fresh seed is the winner's-curse correction
        self.seed = int(target.base["train"]["seed"])  # every trial's train.seed; confirmations derive fresh ones
        self.confirmed: list[TrialRecord] = []
        self.train_fn = train_fn
        self.settings = {
            "target": target.name,
            "scenario": target.scenario,
            "steps": options.steps,
            "min_general_retention": self.floor,
            "seed": options.seed,
            "ladder": options.ladder,
            "constraints": {k: v for k, v in asdict(self.constraints).items() if k != "min_general_retention"},  # the floor is its own key
            "hybrids": [h.key for h in self.eligible],
            "trials": options.trials,
            "confirm": self.confirm,
            "full_steps": self.full_steps,
        }

    def _recorded(self, ordered: list[Hybrid]) -> list[Hybrid] | None:
        """A resumed tune keeps the hybrids it started with (more --trials must not change the space)."""
        marker = self.out / MARKER
        if not marker.is_file():
            return None
        try:
            keys = json.loads(marker.read_text(encoding="utf-8")).get("hybrids") or []
        except (OSError, json.JSONDecodeError):
            return None
        by_key = {h.key: h for h in ordered}
        return [by_key[k] for k in keys] if keys and all(k in by_key for k in keys) else None

    # -- study --------------------------------------------------------------------------------

    def _study(self) -> Any:
        """The optuna study. Its pruner never stops a trial: :meth:`_prune_reason` decides (optuna's median
        rule would compare retention-penalized values and stop trials for their retention alone)."""
        optuna = _optuna()
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{(self.out / 'study.db').resolve()}")
        sampler = optuna.samplers.TPESampler(seed=self.options.seed, n_startup_trials=self._startup(),
                                             multivariate=True, group=True)
        pruner = optuna.pruners.NopPruner()
        if self.floor is None:
            return optuna.create_study(storage=self.storage, study_name=STUDY_NAME, directions=["maximize", "maximize"],
                                       sampler=sampler, pruner=pruner, load_if_exists=True)
        return optuna.create_study(storage=self.storage, study_name=STUDY_NAME, direction="maximize",
                                   sampler=sampler, pruner=pruner, load_if_exists=True)

    def _seed_count(self) -> int:
        if self.options.seeds is not None:
            return min(self.options.seeds, self.options.trials)
        return max(1, min(3, self.options.trials // 3))

    def _startup(self) -> int:
        return max(self._seed_count() + 1, min(10, self.options.trials // 2))

    def records(self, study: Any) -> list[TrialRecord]:
        return [record_of(t, self.labels) for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]

    def _recover(self, study: Any) -> None:
        """Trials a killed or interrupted tune left behind: marked failed, queued again with the same settings."""
        from optuna.trial import TrialState

        study_id = self.storage.get_study_id_from_name(STUDY_NAME)
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for t in trials:
            interrupted = t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and "error" not in t.user_attrs)
            if not interrupted:
                continue
            if t.state == TrialState.RUNNING:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                self.storage.set_trial_user_attr(trial_id, "note", "interrupted")
                self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            shutil.rmtree(self.trial_dir(t.number), ignore_errors=True)
            if t.number not in retried and "hybrid" in t.params:
                study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})

    def _done(self, study: Any) -> int:
        """Trials that count towards --trials: finished (complete, pruned, or failed with an error), not repeats."""
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if "duplicate_of" not in t.user_attrs
                   and (t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and "error" in t.user_attrs)))

    def trial_dir(self, number: int) -> Path:
        return self.out / "trials" / f"{number:04d}"

    # -- one trial ----------------------------------------------------------------------------

    def objective(self, trial: Any) -> Any:
        optuna = _optuna()
        h = self.by_key[trial.suggest_categorical("hybrid", [h.key for h in self.eligible])]
        values = {k.label: trial.suggest_float(k.label, k.low, k.high, log=k.log) for k in knobs(h)}
        earlier = self._same_settings(trial.params)
        if earlier is not None:
            return self._repeat(trial, earlier)
        self.duplicate_streak = 0
        folder = self.trial_dir(trial.number)
        shutil.rmtree(folder, ignore_errors=True)
        config = self.target.trial_config(h, values, folder, self.options.steps, self.every)
        trial.set_user_attr("hybrid", h.key)
        trial.set_user_attr("strategies", [s.model_dump(mode="json") for s in config.strategies])
        trial.set_user_attr("steps", config.train.steps_per_task)
        trial.set_user_attr("seed", config.train.seed)
        self.progress.trial_started(trial.number, self.labels[h.key])
        intermediate: list[list[float | None]] = []

        def report(step: int, new_task: float | None, retention: float | None) -> None:
            intermediate.append([step, new_task, retention])
            trial.set_user_attr("intermediate", intermediate)
            if new_task is None or retention is None:
                return
            reason = self._prune_reason(step, new_task, retention)
            if reason:
                trial.set_user_attr("note", reason)
                trial.set_user_attr("result", {"new_task_score": new_task, "general_retention": retention,
                                               "seconds": time.perf_counter() - started})
                if self.floor is not None:
                    trial.set_constraint("general_retention", self.floor - retention)
                raise optuna.TrialPruned(reason)

        from retain.eval.runner import SuiteObserver

        inner = SuiteObserver(self.target.suite, name=self.labels[h.key], run_dir=folder, config=config.model_dump(mode="json"),
                              batch_size=config.eval.batch_size)
        observer = TrialObserver(inner, report)
        started = time.perf_counter()
        try:
            self._train(config, observer)
        except DivergenceError as err:
            trial.set_user_attr("note", f"diverged: {err}")
            trial.set_user_attr("result", {"seconds": time.perf_counter() - started})
            if self.floor is not None:
                trial.set_constraint("general_retention", 1.0)
            raise optuna.TrialPruned("diverged") from None
        except optuna.TrialPruned:
            raise
        except RetainError as err:
            trial.set_user_attr("error", str(err))
            raise
        run = inner.strategy_run()
        s = run.select_summary or run.summary  # choose on the select part (runs without a split: the one summary)
        result = {
            "new_task_score": s.new_task_score, "new_task_score_before": s.new_task_score_before,
            "general_retention": s.general_retention, "kl_from_base": s.kl_from_base,
            "seconds": time.perf_counter() - started, "seconds_per_step": s.seconds_per_step,
            "peak_memory_bytes": s.peak_memory_bytes,
        }
        trial.set_user_attr("result", result)
        if s.new_task_score is None or s.general_retention is None:
            message = ("the suite gave no bounded score for the last task or for general ability; retain tune needs "
                       "both (e.g. a next_token_accuracy eval with role: task and train_task, and one with role: general)")
            trial.set_user_attr("error", message)
            raise ConfigError(message)
        if self.floor is None:
            return s.new_task_score, s.general_retention
        trial.set_constraint("general_retention", self.floor - s.general_retention)
        return s.new_task_score

    def _same_settings(self, params: dict[str, Any]) -> Any:
        """A finished trial with exactly these settings (a hybrid without strengths drawn twice), or None."""
        for t in self.study.get_trials(deepcopy=False, states=(self._complete,)):
            if t.params == params and "duplicate_of" not in t.user_attrs:
                return t
        return None

    def _repeat(self, trial: Any, earlier: Any) -> Any:
        """Training is deterministic: a repeat takes the earlier trial's result instead of training again,
        and does not count towards --trials."""
        self.duplicate_streak += 1
        for key in ("hybrid", "strategies", "steps", "seed", "result", "intermediate"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        trial.set_user_attr("duplicate_of", earlier.number)
        trial.set_user_attr("note", f"same settings as #{earlier.number}")
        if self.floor is not None:
            for key, value in earlier.constraints.items():
                trial.set_constraint(key, value)
        return earlier.values[0] if self.floor is not None else tuple(earlier.values)

    def _train(self, config: Any, observer: TrialObserver) -> None:
        if self.train_fn is not None:
            self.train_fn(config, observer=observer)
            return
        from retain.train import finetune

        finetune(config, observer=observer)

    def _prune_reason(self, step: int, new_task: float, retention: float) -> str | None:
        """:func:`retain.guide.monitor.prune_reason` against the finished trials' points at this step."""
        finished = []
        for t in self.study.get_trials(deepcopy=False, states=(self._complete,)):
            if "duplicate_of" in t.user_attrs:
                continue
            finished += [(p[1], p[2]) for p in t.user_attrs.get("intermediate", [])
                         if p[0] == step and p[1] is not None and p[2] is not None]
        reason = prune_reason((new_task, retention), finished, self.floor)
        return None if reason is None else f"{reason} at step {step}"

    # -- the whole search ---------------------------------------------------------------------

    def run(self) -> TuneResult:
        from optuna.trial import TrialState

        self._complete = TrialState.COMPLETE
        resuming = check_folder(self.out, self.settings)
        with output_errors(self.out, "create the tune folder"):
            self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / MARKER, json.dumps(self.settings, indent=1) + "\n")
        self.target.write_suite(self.out)
        self.study = study = self._study()
        if resuming:
            self._recover(study)
        elif not self.options.ladder:
            for h in self.eligible[: self._seed_count()]:
                study.enqueue_trial({"hybrid": h.key, **default_values(h)})
        deadline = None if self.options.max_minutes is None else time.monotonic() + 60 * self.options.max_minutes
        self.progress.start(self.options.trials, self._done(study))
        try:
            if self.options.ladder:
                self._run_ladder(study, deadline)
            else:
                self._run_search(study, deadline)
        finally:
            self.progress.stop()
            self.write_outputs(study)
        records = self.records(study)
        self._confirm(study, records, deadline)
        best, kept = pick(records, self.confirmed, self.floor)
        if best is not None:  # chosen on select; now, once, what it is reported as
            best.report = self._report(best)
            self.write_outputs(study, records)
        return TuneResult(records, best, kept, self.skipped, self.out, list(self.confirmed))

    def _run_search(self, study: Any, deadline: float | None) -> None:
        """optuna until --trials trials count (repeats do not), the deadline passes, or the sampler only
        repeats settings already tried (a space of hybrids without strengths is exhausted)."""
        self.duplicate_streak = 0
        while (remaining := self.options.trials - self._done(study)) > 0 and self.duplicate_streak < MAX_REPEATS:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            study.optimize(self.objective, n_trials=remaining, timeout=timeout, callbacks=[self._after_trial])

    def _run_ladder(self, study: Any, deadline: float | None) -> None:
        rungs = [h.key for h in ladder(self.constraints) if h.key in self.by_key]
        if not rungs:
            raise ConfigError("no rung of the ladder fits these constraints on this target")
        per_rung = max(1, self.options.trials // len(rungs))
        self.duplicate_streak = 0
        while self._done(study) < self.options.trials:
            if deadline is not None and time.monotonic() >= deadline:
                break
            waiting = study.get_trials(deepcopy=False, states=(_optuna().trial.TrialState.WAITING,))
            if not waiting:
                rung = ladder_next(rungs, self.records(study), per_rung, self.floor)  # type: ignore[arg-type]
                if rung is None:
                    break
                tried = any(r.hybrid == rung for r in self.records(study))
                h = self.by_key[rung]
                study.enqueue_trial({"hybrid": rung} if tried else {"hybrid": rung, **default_values(h)})
            study.optimize(self.objective, n_trials=1, callbacks=[self._after_trial])

    def _after_trial(self, study: Any, trial: Any) -> None:
        records = self.records(study)
        best, _ = choose_best(records, self.floor)
        self.write_outputs(study, records)
        self.progress.trial_finished(record_of(trial, self.labels), best)

    # -- outputs ------------------------------------------------------------------------------

    # -- confirmation at the full budget ---------------------------------------------------------

    def _confirm(self, study: Any, records: list[TrialRecord], deadline: float | None) -> None:
        """Retrain the most promising trials at the target's own budget on fresh seeds
        (``derive_seed(seed, Stream.TUNE_CONFIRM, place)``), scored on the select part: what kept the floor for a few steps may not keep it for
        the whole run, the search's best is flattered by its own seed and sample, and best.yaml is what
        the user will train."""
        band = confirm_band(self.options.steps or self.full_steps, self.full_steps)
        for place, candidate in enumerate(confirm_candidates(records, self.floor, self.confirm, band)):
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.confirmed.append(self._confirm_one(candidate, derive_seed(self.seed, Stream.TUNE_CONFIRM, place) % 2**31))
            self.write_outputs(study, records)

    def _confirm_one(self, trial: TrialRecord, seed: int) -> TrialRecord:
        from retain.eval.runner import SuiteObserver
        from retain.results.schema import Results

        h = self.by_key[trial.hybrid]
        folder = self.confirm_dir(trial)
        config = self.target.trial_config(h, trial.params, folder, None, 0, seed=seed)
        cost = folder / "tune_seconds.json"
        done = cost.is_file() and json.loads(cost.read_text()).get("seed") == seed
        if not done:  # a finished confirmation (same trial, same seed) is kept across resumes
            shutil.rmtree(folder, ignore_errors=True)
            self.progress.confirm_started(trial, config.train.steps_per_task)
            started = time.perf_counter()
            observer = SuiteObserver(self.target.suite, name=trial.label, run_dir=folder,
                                     config=config.model_dump(mode="json"), batch_size=config.eval.batch_size)
            self._train(config, observer)
            observer.write_results(scenario=self.target.scenario)
            atomic_write_text(cost, json.dumps({"seconds": time.perf_counter() - started, "seed": seed}))
        run = Results.load(folder / "results.json").runs[0]
        s = run.select_summary or run.summary
        return TrialRecord(
            number=trial.number, state="complete", hybrid=trial.hybrid, label=trial.label, params=dict(trial.params),
            strategies=trial.strategies, steps=config.train.steps_per_task, new_task_score=s.new_task_score,
            new_task_score_before=s.new_task_score_before, general_retention=s.general_retention,
            kl_from_base=s.kl_from_base, seconds=json.loads(cost.read_text())["seconds"], seconds_per_step=s.seconds_per_step,
            peak_memory_bytes=s.peak_memory_bytes, confirms=trial.number, seed=seed, stage="confirm",
            note=f"trial #{trial.number} at the full budget, seed {seed}",
        )

    def confirm_dir(self, trial: TrialRecord) -> Path:
        return self.out / "confirm" / f"{trial.number:04d}"

    def _report(self, best: TrialRecord) -> dict[str, Any] | None:
        """The chosen run's figures on the report part (its results.json ``summary``, with intervals):
        the confirmation run's, or the search trial's when it was not confirmed."""
        from retain.results.schema import Results

        folder = self.confirm_dir(best) if best.stage == "confirm" else self.trial_dir(best.number)
        path = folder / "results.json"
        if not path.is_file():
            return None
        try:
            return report_figures(Results.load(path).runs[0].summary)
        except (RetainError, IndexError):
            return None

    # -- outputs ------------------------------------------------------------------------------

    def write_outputs(self, study: Any, records: list[TrialRecord] | None = None) -> None:
        """trials.json, report.html and best.yaml, rewritten after every trial and confirmation."""
        records = self.records(study) if records is None else records
        write_trials_json(self.out / "trials.json", self.settings, records, self.floor, self.confirmed)
        write_tune_report(self.out / "report.html", self.settings, records, self.floor, self.confirmed)
        best, kept = pick(records, self.confirmed, self.floor)
        if best is not None:
            self.write_best(best, kept, records)

    def write_best(self, best: TrialRecord, kept: bool, records: list[TrialRecord]) -> None:
        data = self.target.best_data(best.strategies, best.steps, self.out, seed=best.seed)
        data["constraints"] = recorded_constraints(self.constraints)  # what was searched: a later tune stays within
        lines = figure_lines(best, records, kept, self.floor)
        header = [
            f"retain tune {self.target.name}: trial #{best.confirms if best.confirms is not None else best.number} "
            f"({best.label}), chosen on the select part of every eval, reported on the report part:",
            *(f"  {line}" for line in lines),
            f"train.seed {best.seed}: the seed of the run these figures come from.",
            "For another budget: retain train best.yaml --set train.steps_per_task=N",
        ]
        text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(data, sort_keys=False, width=200)
        atomic_write_text(self.out / "best.yaml", text)
