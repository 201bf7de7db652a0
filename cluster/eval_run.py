"""Evaluations during a run: the fixed set sampled on the run's samplers, scored with the training
rewards (like any batch) and with the gold rewards (the reward stage's ``evaluate``), its ``eval/``
metrics in the epoch's row, and the hacking guard watching them (``cluster/hacking_guard.py``).

The driver owns the loop; this class owns what an evaluation is, so the loop only asks for one when
it is due and acts on the guard's alarm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cluster.best_adapter import keep_if_best
from cluster.config import Config
from cluster.errors import reward_failure
from cluster.evaluation import EvalResult, eval_candidates, eval_jobs, eval_result, evaluation_due, save_eval
from cluster.hacking_guard import INITIAL, HackingGuard
from cluster.samplers import EpochBatch
from cluster.specs import evaluation_in_process

ALARM = "eval/hacking_alarm"  # 1 in an evaluation's row when the guard raised its alarm, else 0


class Evaluator:
    """Runs evaluations through ``pool`` (a SamplerPool) and ``reward_stage``; ``complete`` finishes a
    batch of jobs as the driver does (reward failures translated), ``get`` is ``ray.get`` with the call
    timeout."""

    def __init__(self, config: Config, *, pool, reward_stage, complete, get):
        import ray

        self.ray = ray
        self.config = config
        self.pool, self.reward_stage, self.complete, self.get = pool, reward_stage, complete, get
        self.candidates = eval_candidates(config)
        self.with_gold = evaluation_in_process(config)
        g = config.evaluation.guard
        self.guard = None if g.action == "off" else HackingGuard(
            patience=g.patience, action=g.action, train_metric=g.train_metric, gold_metric=g.metric)
        self.initial_metrics: dict[str, float] = {}

    def evaluate(self) -> EvalResult:
        """The evaluation set (prompt sets x images_per_prompt, fixed seeds) with the samplers' weights."""
        jobs = [self.pool.submit(job) for job in eval_jobs(self.config, num_samplers=len(self.pool.samplers))]
        scores = self.complete(EpochBatch(jobs=jobs, submitted_at=time.perf_counter()))
        gold = None
        if self.with_gold:
            refs = [self.reward_stage.evaluate.remote(batch=job.images, candidates=self.candidates) for job in jobs]
            try:
                gold = self.get(refs)
            except (self.ray.exceptions.RayTaskError, self.ray.exceptions.RayActorError) as err:
                failure = reward_failure(err, self.reward_stage, limit=self.config.cluster.max_actor_failures)
                if failure is None:
                    raise
                raise failure from err
        return eval_result(self.config, jobs, scores, self.get([job.images for job in jobs]), gold=gold)

    def initial(self) -> EvalResult:
        """The evaluation before the first update: the guard's first point; its metrics go into the first
        row as ``<metric>_initial``."""
        result = self.evaluate()
        self.initial_metrics = dict(result.metrics)
        if self.guard is not None:
            self.guard.observe(result.metrics)
        return result

    def due(self, epoch: int) -> bool:
        """After every ``evaluation.every`` epochs (0: none in between) and after the last one."""
        return evaluation_due(self.config, epoch=epoch)

    def after_epoch(self, row: dict, *, epoch: int) -> tuple[EvalResult | None, str | None]:
        """Evaluates when due and adds the metrics to ``row`` (with the alarm flag when the guard is on)
        -> (the result, whose grid is saved once the row is written, or None; the guard's alarm or None)."""
        result = self.evaluate() if self.due(epoch) else None
        if result is not None:
            row.update(result.metrics)
        if epoch == 0 and self.initial_metrics:
            row.update({f"{key}{INITIAL}": value for key, value in self.initial_metrics.items()})
        alarm = None
        if result is not None and self.guard is not None:
            alarm = self.guard.observe(row)
            row[ALARM] = int(alarm is not None)
        return result, alarm

    def record(self, result: EvalResult, *, run_dir: Path, updates: int, writer,
               export: Callable[[Path], object]) -> None:
        """Saves an evaluation after ``updates`` updates (its grid and per-image JSON, the grid to the
        writer's sinks) and, with ``evaluation.keep_best``, keeps the adapter if it is the best so far
        (``export(directory)`` writes it)."""
        save_eval(result, run_dir=run_dir, updates=updates, writer=writer)
        if self.config.evaluation.keep_best:
            keep_if_best(run_dir, metric=self.config.evaluation.keep_best, metrics=result.metrics,
                         updates=updates, export=export)

    def restore(self, rows: list[dict]) -> None:
        """The guard's state after a resumed run's rows (it replays their evaluations)."""
        if self.guard is not None:
            self.guard.replay(rows)
