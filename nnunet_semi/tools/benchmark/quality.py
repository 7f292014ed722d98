"""``nnUNetv2_semi_benchmark quality``: segmentation quality of each trainer against labeled-only nnU-Net.

For every labeled count N: draw the split (``--order first`` by default) into the benchmark's own copy of the
preprocessed folder, train every trainer on the same split and schedule (stock ``nnUNetTrainer`` always included;
``all`` trains it alone on the full split, the supervised upper bound; ``warm_start``: every trainer and the control
continue stock's first run), predict the development cases (the fold's validation cases) and the test cases (with
test labels) with nnU-Net's predictor and score them per foreground class with medpy. Finished runs are skipped,
interrupted ones resume from ``checkpoint_latest.pth``, a run folder of another identity is refused.

The pieces: ``training`` (worker processes), ``scoring`` (prediction and metrics), ``members`` (``--score_members``),
``records`` (a run's files), ``tables`` and ``plots`` (``results.md``, ``results.png``), ``selftrain_run``,
``workspace`` (the split copy and a run's identity).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from os.path import isdir, isfile, join

import torch

from nnunet_semi.data.dataset_io import require_env_folder, resolve_dataset_name, save_json_atomic
from nnunet_semi.data.splits import SPLITS_FILE, full_splits, holdout_split, make_labeled_split
from nnunet_semi.errors import SemiInputError, SemiRunsFailed
from nnunet_semi.tools.benchmark.common import (
    BASELINE_TRAINER,
    CONTROL_TRAINER,
    SELFTRAIN,
    load_plans_and_dataset_json,
    provenance,
    resolve_trainer,
    with_schedule,
)
from nnunet_semi.tools.benchmark.members import score_members
from nnunet_semi.tools.benchmark.records import (
    as_written,
    earlier_runs,
    keep_run_record,
    keep_unfinished_record,
    read_csv,
    warm_start_columns,
    write_csv,
)
from nnunet_semi.tools.benchmark.scoring import (
    announcer,
    deployed_model,
    pack_test_predictions,
    predict,
    score_run,
    scored_cases,
    training_seconds,
)
from nnunet_semi.tools.benchmark.selftrain_run import self_training_run, selftrain_run_name
from nnunet_semi.tools.benchmark.settings import QualitySettings, Run
from nnunet_semi.tools.benchmark.tables import write_results
from nnunet_semi.tools.benchmark.training import fold_folder, run_name, train_side_by_side, watched_train
from nnunet_semi.tools.benchmark.workspace import (
    check_identity,
    data_identity,
    files_digest,
    link_preprocessed_copy,
    short_hash,
)
from nnunet_semi.tools.progress import CommandProgress, captured_output, console_stream, log_tail


def run_quality_benchmark(settings: QualitySettings) -> list[dict]:
    """Train, predict and score (``QualityBenchmark``); writes ``results.csv``, ``results.md`` and
    ``results.png`` into ``settings.out_dir`` with the earlier runs there that share this command's split, schedule
    and ramp. Returns this command's rows."""
    return QualityBenchmark(settings).run()


class QualityBenchmark:
    """One quality command: the runs planned from ``QualitySettings``, trained, scored and tabulated."""

    def __init__(self, settings: QualitySettings):
        settings.check()
        self.s = s = settings
        self.device = s.device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.dataset_name = resolve_dataset_name(s.dataset)
        self.raw = join(require_env_folder("nnUNet_raw"), self.dataset_name)
        preprocessed = join(require_env_folder("nnUNet_preprocessed"), self.dataset_name)
        if not isfile(join(preprocessed, s.plans + ".json")):
            raise SemiInputError(f"{self.dataset_name} is not planned: run nnUNetv2_plan_and_preprocess -d "
                                 f"{s.dataset} -c {s.configuration} (and nnUNetv2_semi_preprocess) first.")
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans, self.dataset_json = load_plans_and_dataset_json(preprocessed, s.plans)
        self.labels = PlansManager(self.plans).get_label_manager(self.dataset_json).foreground_labels
        self.val_iterations = s.val_iterations if s.val_iterations is not None else max(1, s.iterations // 5)
        self._resolve_trainers()
        os.makedirs(join(s.out_dir, "runs"), exist_ok=True)
        # the benchmark's own copy of the preprocessed folder: its trainings read the split from there, the
        # dataset's splits_final.json is never written (workspace.py)
        self.workspace_root = join(s.out_dir, "nnunet_preprocessed")
        self.workspace = link_preprocessed_copy(preprocessed, self.workspace_root)
        self._draw_splits(preprocessed)
        if s.rampup_iterations is not None:
            self._print_ramps()
        self.planned = {count: self._count_runs(count) for count in s.num_labeled}
        self._start_progress()
        self._check_identities()
        self.info = provenance(self.device)
        self.rows, self.member_rows, self.failures, self.left_out = [], [], [], []

    # ------------------------------------------------------------------------------------------------- planning
    def _resolve_trainers(self) -> None:
        s = self.s
        self.methods = [t for t in s.trainers if t not in (BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN)]
        self.classes = {t: resolve_trainer(t) for t in [BASELINE_TRAINER, *self.methods]}
        # warm-start mode: the labeled-only runs the methods' peers start from (stock: its second seed), and the
        # ones a method starts from instead of stock's (BCP's copy-paste pre-training)
        self.peer_sources = {t: getattr(self.classes[t], "peer_labeled_only_trainer", None)
                             for t in self.methods} if s.warm_start else {}
        self.start_sources = {t: getattr(self.classes[t], "warm_start_trainer", None)
                              for t in self.methods} if s.warm_start else {}
        for source in (set(self.peer_sources.values()) | set(self.start_sources.values())) - {None}:
            self.classes[source] = resolve_trainer(source)
        if s.warm_start:
            self.classes[CONTROL_TRAINER] = resolve_trainer(CONTROL_TRAINER)

    def _print_ramps(self) -> None:
        """The one ramp length set for every method, and per trainer which terms it multiplies: a method may enter
        some or all of its unsupervised terms from the first step (BCP, CIFP), and the length then changes nothing."""
        s = self.s
        print(f"unsupervised ramp: sigmoid over {s.rampup_iterations} iterations (of {s.epochs * s.iterations}) "
              f"for every method's ramped terms")
        for name in self.methods:
            if hasattr(self.classes[name], "describe_ramp"):
                print(f"  {name}: {self.classes[name].describe_ramp(s.rampup_iterations)}")

    def _draw_splits(self, preprocessed: str) -> None:
        """Every count's split (into the workspace), the data identities and the identity columns of the rows."""
        s = self.s
        self.splits = {}
        for count in s.num_labeled:
            if count == "all":  # the full split, with the labeled subsets' held-out cases
                full = full_splits(preprocessed, self.raw)
                self.splits[count] = holdout_split(full, s.num_val) if s.num_val is not None else full
            else:
                self.splits[count] = make_labeled_split(self.dataset_name, int(count), s.order, s.seed,
                                                        num_val=s.num_val, write_to=self.workspace)
            if s.fold >= len(self.splits[count]):
                raise SemiInputError(f"-f {s.fold}: the split of {count} labeled has folds 0 to "
                                     f"{len(self.splits[count]) - 1}.")
        test_digest = files_digest(s.test_labels, self.dataset_json["file_ending"])
        self.data_identities = {count: data_identity(splits[s.fold], s.order, s.seed, s.num_val, test_digest)
                                for count, splits in self.splits.items()}
        # in every row: what of the data identity a table needs (the split's hash stands for its cases)
        self.data_columns = {count: {"order": s.order, "split": short_hash(identity["split"]),
                                     "test_labels": test_digest} for count, identity in self.data_identities.items()}

    def schedule_of(self, repeat: int, tag: str, warm: tuple | None = None) -> tuple:
        """The arguments of ``with_schedule`` after the class: one run's schedule, seed and start."""
        s = self.s
        return (s.epochs, s.iterations, self.val_iterations, tag + (f"_r{repeat}" if repeat else ""),
                s.rampup_iterations, s.seed + repeat, s.checkpoint_every, warm)

    def trainer_class(self, run: Run) -> type:
        return with_schedule(self.classes[run.trainer], *run.schedule)

    def name_of(self, run: Run) -> str:
        return run_name(run.trainer, run.schedule, self.classes)

    def checkpoint_of(self, trainer: str, schedule: tuple) -> str:
        return join(fold_folder(with_schedule(self.classes[trainer], *schedule), self.plans, self.s.configuration,
                                self.s.fold), "checkpoint_final.pth")

    def _count_runs(self, count: str) -> list[Run]:
        """One labeled count's runs, every run after the runs it starts from. Names:
        ``bench_<N>lab_<E>x<I>[_ramp<R>][_warm]_<hash of the data identity>[_r<k>]``."""
        s, data = self.s, short_hash(self.data_identities[count])

        def tag(extra: str = "") -> str:
            return f"bench_{count}lab_{s.epochs}x{s.iterations}{extra}_{data}"

        def ramped(name: str) -> str:  # stock has no ramp: its runs keep their names and are shared
            return s.run_suffix if hasattr(self.classes[name], "unsup_rampup_iterations") else ""

        def runs(trainer: str, repeats: int, tag_: str, warm: tuple | None = None) -> list[Run]:
            return [Run(trainer, r, self.schedule_of(r, tag_, warm), count) for r in range(repeats)]

        if count == "all":
            return runs(BASELINE_TRAINER, s.repeats, tag())
        if not s.warm_start:
            return runs(BASELINE_TRAINER, s.repeats, tag()) + [
                run for name in self.methods for run in runs(name, s.method_repeats, tag(ramped(name)))]
        planned = runs(BASELINE_TRAINER, 2 if BASELINE_TRAINER in self.peer_sources.values() else 1, tag())
        for source in dict.fromkeys([*self.peer_sources.values(), *self.start_sources.values()]):
            if source not in (None, BASELINE_TRAINER):
                planned += runs(source, 1, tag())
        stock_start = self.checkpoint_of(BASELINE_TRAINER, planned[0].schedule)
        for name in [CONTROL_TRAINER, *self.methods]:
            peer_source, own_start = self.peer_sources.get(name), self.start_sources.get(name)
            peer = None if peer_source is None else self.checkpoint_of(
                peer_source, self.schedule_of(1 if peer_source == BASELINE_TRAINER else 0, tag()))
            start = stock_start if own_start is None else self.checkpoint_of(own_start, self.schedule_of(0, tag()))
            planned += runs(name, s.repeats if name == CONTROL_TRAINER else s.method_repeats,
                            tag(f"{ramped(name)}_warm"), (start, peer))
        return planned

    def identity_of(self, run: Run) -> dict:
        """Everything a run's numbers depend on besides the code (``workspace``): recorded and checked."""
        s = self.s
        return {"dataset": self.dataset_name, "plans": s.plans, "configuration": s.configuration, "fold": s.fold,
                "trainer": run.trainer, "num_labeled": run.count, **self.data_identities[run.count],
                "epochs": s.epochs, "iterations_per_epoch": s.iterations,
                "val_iterations_per_epoch": self.val_iterations, "rampup_iterations": s.rampup_iterations,
                "run_seed": run.schedule[5], **warm_start_columns(run.warm)}

    def _check_identities(self) -> None:
        """A run or checkpoint folder of another identity is refused before anything trains."""
        for runs in self.planned.values():
            for run in runs:
                results = os.path.dirname(self.checkpoint_of(run.trainer, run.schedule))
                for folder, what in ((self._run_dir(self.name_of(run)), "the run folder"),
                                     (results, "the nnUNet_results folder")):
                    if isdir(folder):
                        check_identity(folder, self.identity_of(run), what)

    def _start_progress(self) -> None:
        s = self.s
        entries, self.index = [], {}  # the progress display's runs; run name -> its position there
        for count, runs in self.planned.items():
            for run in runs:
                self.index[self.name_of(run)] = len(entries)
                entries.append((f"{run.trainer}{f' (repeat {run.repeat})' if run.repeat else ''}, {count} "
                                f"labeled{' warm' if run.warm else ''}", s.epochs))
            if SELFTRAIN in s.trainers and count != "all":
                for r in range(1, s.selftrain_rounds + 1):
                    self.index[(SELFTRAIN, count, r)] = len(entries)
                    entries.append((f"{SELFTRAIN} round {r} student{' (warm)' if s.warm_start else ''}, {count} "
                                    f"labeled", s.epochs))
        self.progress = CommandProgress(entries, s.progress_stream or (sys.stdout if s.verbose else console_stream()),
                                        live=False if s.verbose else None)

    # ------------------------------------------------------------------------------------------------- running
    def run(self) -> list[dict]:
        self._skip_trained_runs()
        for count, runs in self.planned.items():
            save_json_atomic(self.splits[count], join(self.workspace, SPLITS_FILE))  # the copy, not the dataset's
            split = self.splits[count][self.s.fold]
            cases = scored_cases(self.raw, self.dataset_json, split, self.s.test_labels)
            # with test labels, the fold's validation cases are scored too, apart: the development cases
            development = scored_cases(self.raw, self.dataset_json, split, None) if self.s.test_labels else None
            stopped, failed = self._train(runs)
            for run in runs:
                self._score(run, cases, development, stopped, failed)
            if SELFTRAIN in self.s.trainers and count != "all":
                self._selftrain(count, runs, cases, development)
        if self.rows:
            self._write_tables()
            if self.left_out:
                print(f"results.md leaves out {len(self.left_out)} earlier run(s) of another split, schedule or ramp "
                      f"in {join(self.s.out_dir, 'runs')} ({', '.join(self.left_out)}); nnUNetv2_semi_benchmark "
                      f"report {self.s.out_dir} -o <folder> tabulates every run, each schedule and ramp apart.")
        else:
            print("no run finished: nothing to tabulate")
        if self.failures:
            raise SemiRunsFailed(self.failures)
        return self.rows

    def run_log(self, name: str) -> str | None:
        return None if self.s.verbose else join(self.s.out_dir, "logs", f"{name}.txt")

    def _skip_trained_runs(self) -> None:
        """Runs an earlier command trained (self-training: scored) count as done in the time left from the start."""
        s = self.s
        for count, runs in self.planned.items():
            for run in runs:
                if not self._needs_training(run):
                    self.progress.skip(self.index[self.name_of(run)])
            if SELFTRAIN in s.trainers and count != "all" and \
                    isfile(self._scores_file(self._selftrain_teacher(runs)[1])):
                for r in range(1, s.selftrain_rounds + 1):
                    self.progress.skip(self.index[(SELFTRAIN, count, r)])

    def _run_dir(self, name: str) -> str:
        """A run's folder in the results: its scores, record, identity and packed test predictions."""
        return join(self.s.out_dir, "runs", name)

    def _scores_file(self, name: str) -> str:
        """A run's scores, written last: where it exists, the run is done."""
        return join(self._run_dir(name), "scores.csv")

    def _test_archive(self, name: str) -> str:
        """A run's packed test-set predictions (with ``predict_test``)."""
        return join(self._run_dir(name), "test_predictions.tar.gz")

    def _needs_training(self, run: Run) -> bool:
        """Neither scored by an earlier command nor trained (its final checkpoint)."""
        return not isfile(self._scores_file(self.name_of(run))) and \
            not isfile(self.checkpoint_of(run.trainer, run.schedule))

    def _train(self, runs: list[Run]) -> tuple[list[str], set[str]]:
        """Train the count's unfinished runs in worker processes, which read the benchmark's split; the runs others
        start from first. Returns the runs stopped by the deadline and the failed ones."""
        s = self.s
        pending = [run for run in runs if self._needs_training(run)]
        for run in pending:  # recorded where the run trains
            check_identity(os.path.dirname(self.checkpoint_of(run.trainer, run.schedule)), self.identity_of(run),
                           "the nnUNet_results folder")
        stopped, failed = [], set()
        for phase in ([r for r in pending if r.warm is None], [r for r in pending if r.warm is not None]):
            if stopped:  # the deadline came in the first phase
                stopped += [self.name_of(run) for run in phase]
                continue
            stopped, side_failures = train_side_by_side(
                [(run.trainer, run.schedule) for run in phase], s.jobs, self.plans, s.configuration, s.fold,
                self.dataset_json, self.device, s.stop_training_at, progress=self.progress, index=self.index,
                run_log=self.run_log, environment={"nnUNet_preprocessed": self.workspace_root})
            for name, error in side_failures:
                self._failed(name, error)
            failed |= {name for name, _ in side_failures}
        return stopped, failed

    def _columns(self, run: Run, cases: dict) -> dict:
        """The constant columns of a run's rows."""
        s = self.s
        return {"trainer": run.trainer, "num_labeled": run.count, "repeat": run.repeat, "dataset": self.dataset_name,
                "configuration": s.configuration, "plans": s.plans, "fold": s.fold,
                "num_val": len(cases) if s.test_labels is None else "", "epochs": s.epochs,
                "iterations_per_epoch": s.iterations,
                "rampup_iterations": "" if s.rampup_iterations is None else s.rampup_iterations,
                "seed": s.seed + run.repeat, **warm_start_columns(run.warm), **self.data_columns[run.count],
                "case_set": "test" if s.test_labels else "development",
                "evaluated_on": "imagesTs" if s.test_labels else f"fold {s.fold} val", **s.extra_columns,
                **self.info}

    def _score(self, run: Run, cases: dict, development: dict | None, stopped: list[str], failed: set[str]) -> None:
        """Predict and score one trained run (or read its earlier scores), its members too with score_members."""
        s, trainer_cls, name = self.s, self.trainer_class(run), self.name_of(run)
        run_dir = self._run_dir(name)
        scores_file, archive = self._scores_file(name), self._test_archive(name)
        if name in failed:  # reported already
            return
        if name in stopped:
            keep_unfinished_record(trainer_cls, self.plans, s.configuration, s.fold, self.dataset_json, s.out_dir)
            return
        members = (lambda run_rows: score_members(trainer_cls, run_rows[0], run_dir, cases, s.out_dir, self.plans,
                                                  s.configuration, self.dataset_json, self.labels, self.device,
                                                  self.progress, self.index[name]))
        if isfile(scores_file) and (not s.predict_test or isfile(archive)):
            print(f"{name}: scored earlier ({scores_file}), skipping")
            self.progress.skip(self.index[name])
            run_rows = read_csv(scores_file)
            self.rows += run_rows
            if s.score_members:  # its predictions' output into the run's log, like the run's own
                with captured_output(self.run_log(name)):
                    self.member_rows += members(_headline(run_rows))
            return
        if s.stop_at is not None and time.time() >= s.stop_at:
            print(f"deadline: {name} finished training but is not predicted or scored; run the same command again "
                  f"to score it")
            return
        log = self.run_log(name)
        if log:
            self.progress.message(f"{name}: nnU-Net's output goes to {log}")
        try:
            with captured_output(log):
                run_rows = self._train_and_score(trainer_cls, cases, development, self._columns(run, cases),
                                                 self.index[name])
                self.rows += run_rows
                check_identity(run_dir, self.identity_of(run), "the run folder")  # recorded beside the scores
                if s.score_members:
                    self.member_rows += members(_headline(run_rows))
        except Exception as error:  # the others go on (--stop_on_failure: not)
            self._failed(name, error)
            return
        self._write_tables()  # after every run: a stopped command keeps its tables

    def _train_and_score(self, trainer_cls: type, cases: dict, development: dict | None, common: dict,
                         position: int) -> list[dict]:
        """Train one run (followed on the progress display), predict and score its cases (and the development
        cases apart, where test cases are the headline), keep its record; ``scores.csv`` is written last, so that
        its presence means the run is complete."""
        s = self.s
        output_folder = watched_train(trainer_cls, self.plans, s.configuration, s.fold, self.dataset_json,
                                      self.device, self.progress, position)
        run_dir = self._run_dir(trainer_cls.__name__)
        common = common | {"deployed": deployed_model(output_folder),
                           "train_seconds": round(training_seconds(output_folder), 1)}
        run_rows = []
        for case_set, scored, folder in ((common["case_set"], cases, trainer_cls.__name__),
                                         ("development", development, f"{trainer_cls.__name__}__development")):
            if not scored:  # no development cases apart without test cases
                continue
            predictions = join(s.out_dir, "predictions", folder)
            predict(trainer_cls, output_folder, self.plans, s.configuration, self.dataset_json, scored, predictions,
                    self.device, announce=announcer(self.progress, position, f"{case_set} cases"))
            run_rows += as_written(score_run(scored, predictions, self.dataset_json, self.labels,
                                             common | {"case_set": case_set}))
        os.makedirs(run_dir, exist_ok=True)
        keep_run_record(output_folder, run_dir)
        if s.predict_test:
            pack_test_predictions(trainer_cls, output_folder, self.plans, s.configuration, self.dataset_json,
                                  self.raw, join(s.out_dir, "test_predictions", trainer_cls.__name__),
                                  self._test_archive(trainer_cls.__name__), self.device, self.progress, position)
        write_csv(run_rows, self._scores_file(trainer_cls.__name__))
        return run_rows

    def _selftrain_teacher(self, runs: list[Run]) -> tuple[Run, str]:
        """A count's self-training teacher (stock's first run) and the self-training run's name."""
        teacher = next(run for run in runs if run.trainer == BASELINE_TRAINER and run.repeat == 0)
        return teacher, selftrain_run_name(teacher.schedule[3], self.s.selftrain_rounds, self.s.warm_start)

    def _selftrain(self, count: str, runs: list[Run], cases: dict, development: dict | None) -> None:
        s = self.s
        teacher, name = self._selftrain_teacher(runs)
        columns = {"num_val": len(cases) if s.test_labels is None else "", "rampup_iterations": "",
                   "evaluated_on": "imagesTs" if s.test_labels else f"fold {s.fold} val", **self.data_columns[count],
                   "case_set": "test" if s.test_labels else "development", **s.extra_columns, **self.info}
        try:
            rows = self_training_run(
                self.dataset_name, count, teacher.schedule, s.selftrain_rounds, self.plans, s.plans, s.configuration,
                s.fold, self.dataset_json, cases, self.labels, s.out_dir, self.raw, self.device, s.predict_test,
                s.stop_at, columns, self.progress, self.index, self.run_log(name), s.warm_start,
                splits_file=join(self.workspace, SPLITS_FILE), development_cases=development)
        except Exception as error:
            self._failed(name, error)
            return
        if rows:
            self.rows += rows
            self._write_tables()

    # ---------------------------------------------------------------------------------------------- reporting
    def _own_runs(self) -> set[str]:
        """This command's run names: their rows are recomputed, the other scored runs of the folder merged."""
        own = {key for key in self.index if isinstance(key, str)}
        if SELFTRAIN in self.s.trainers:
            own |= {self._selftrain_teacher(runs)[1] for runs in self.planned.values()}
        return own

    def _write_tables(self) -> None:
        ramp = "" if self.s.rampup_iterations is None else str(self.s.rampup_iterations)
        earlier, earlier_members, self.left_out = earlier_runs(self.s.out_dir, self._own_runs(), self.rows[0], ramp)
        write_results(self.rows + earlier, self.s.out_dir, self.member_rows + earlier_members)
        if self.s.on_results_written is not None:
            self.s.on_results_written()

    def _failed(self, name: str, error: Exception) -> None:
        """Report a failed run (its error and its log's last lines) and go on, or stop with ``stop_on_failure``."""
        log = self.run_log(name)
        if log:
            with open(log, "a") as f:
                f.write("".join(traceback.format_exception(error)))
        tail = log_tail(log) if log else ""
        self.progress.message(f"{name}: FAILED: {type(error).__name__}: {error}"
                              + (f"\nlast lines of {log}:\n{tail}" if log else ""))
        self.failures.append(f"{name}: {type(error).__name__}: {error}" + (f" (log: {log})" if log else ""))
        if self.s.stop_on_failure:
            raise SemiRunsFailed(self.failures) from error


def _headline(run_rows: list[dict]) -> list[dict]:
    """A run's rows of its headline cases (the test cases where they were scored): what its members are scored
    on."""
    test = [r for r in run_rows if r.get("case_set") == "test"]
    return test or run_rows
