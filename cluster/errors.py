"""Errors that stop a run, and the helpers that find the user-facing error inside Ray's wrappers."""

from __future__ import annotations

from collections.abc import Iterator

from cluster.config import ConfigError


class RewardDownError(RuntimeError):
    """A reward stayed down past reward_service.down_timeout_s; the run stopped after a checkpoint."""


class RewardStageFailedError(RuntimeError):
    """The reward-stage actor kept dying on one batch (Ray's retries on the restarted stage used up)."""


class RewardHackingError(RuntimeError):
    """The hacking guard (``evaluation.guard.action: stop``) saw the training metric rise while the gold
    metric fell over ``evaluation.guard.patience`` evaluations in a row; the run stopped after a checkpoint."""


def reward_failure(err: BaseException, reward_stage, *, limit: int) -> Exception | None:
    """What a failed scoring means: RewardDownError for a reward that stayed down after its retries,
    RewardStageFailedError when the ``reward_stage`` actor itself kept dying (Ray reran the call on the
    restarted stage ``limit - 1`` times), None for anything else."""
    import ray

    from rewards.scoring import RewardServiceError

    chain = list(cause_chain(err))
    down = next((e for e in chain if isinstance(e, RewardServiceError)), None)
    if down is not None:
        return RewardDownError(str(down))
    stage_id = reward_stage._actor_id.hex()
    died = next((e for e in chain if isinstance(e, ray.exceptions.RayActorError)
                 and getattr(e, "actor_id", None) == stage_id), None)
    if died is not None:
        cause = (str(died).strip().splitlines() or [""])[0][:300]
        return RewardStageFailedError(f"the reward stage died {limit} times in a row on one batch "
                                      f"(cluster.max_actor_failures); last cause: {type(died).__name__}: {cause}")
    return None


def cause_chain(err: BaseException | None, *, limit: int = 8) -> Iterator[BaseException]:
    """``err`` and its causes, outermost first: Ray's ``RayTaskError.cause`` (the exception the remote
    task raised) or Python's ``__cause__``."""
    for _ in range(limit):
        if err is None:
            return
        yield err
        err = getattr(err, "cause", None) or err.__cause__


def actor_start_error(err, actor: str) -> Exception:
    """The error an actor's constructor raised, from Ray's ActorDiedError (Ray keeps only its text).

    Refusals of the user's settings (an adapter that binds to nothing, a schedule with σ = 0) become a
    ConfigError naming the field; anything else keeps Ray's error with its traceback."""
    lines = [line.strip() for line in str(getattr(err, "error_msg", "") or "").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    kind, _, message = last.partition(": ")
    if kind.rsplit(".", 1)[-1] in ("AdapterBindingError", "ValueError") and message:
        return ConfigError(f"the {actor} could not start: {message}")
    return err
