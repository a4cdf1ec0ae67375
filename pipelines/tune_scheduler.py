"""ASHA whose rungs survive an interrupted search.

Ray Tune's ``Tuner.restore`` brings back every trial and the searcher's state, but not the
scheduler's: a restored :class:`~ray.tune.schedulers.ASHAScheduler` starts with empty
rungs, so the trials that run after a restore are only compared with each other, and a
bad setting that the first run would have stopped runs to the end. :class:`ResumableASHA`
replays, for every trial that Tune adds back, the scores stored in the trial's latest
checkpoint (``scores.json``, written by pipelines/tune_trial.py) into its bracket, so
that the stopping decisions go on as if the search had never been interrupted.
"""

from __future__ import annotations

import json
import logging

from ray.tune.schedulers import ASHAScheduler

from pipelines.tune_trial import SCORES_FILE

log = logging.getLogger(__name__)


def checkpoint_scores(checkpoint) -> list[tuple[float, float]]:
    """``[(step, score), ...]`` stored in a trial checkpoint ([] if there is none)."""
    if checkpoint is None:
        return []
    try:
        path = f"{checkpoint.path.rstrip('/')}/{SCORES_FILE}"
        with checkpoint.filesystem.open_input_stream(path) as f:
            return [(float(step), float(score)) for step, score in json.loads(f.readall())]
    except (OSError, ValueError, TypeError) as e:
        log.warning("no score history in %s (%s): ASHA starts this trial afresh", checkpoint, e)
        return []


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler that rebuilds its rungs from the trials' checkpoints on restore."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = checkpoint_scores(getattr(trial, "checkpoint", None))
        bracket = self._trial_info[trial.trial_id]
        for step, score in history:
            if step < self._max_t:  # the last rung is max_t itself: nothing to record
                bracket.on_result(trial, step, self._metric_op * score)
