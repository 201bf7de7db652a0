"""The learner actor as the driver uses it: every call with the run's timeout, and a learner that dies
restarted and put back where it was.

The driver keeps a snapshot of the learner's state (``Learner.state_dict``: adapter, AdamW moments,
statistics, RNG states) taken with every update, in the same call sequence, so an update and its
snapshot succeed together or are redone together. When the learner actor dies (Ray restarts it: the
constructor runs again), the handle waits for it, loads the last snapshot and repeats the call that
failed: the update of the epoch in flight is computed again from exactly the state it started from, so
the run continues with every epoch applied once. ``max_failures`` deaths in a row (restores included)
raise ``LearnerFailedError`` naming the cause; the driver then stops with a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LearnerFailedError(RuntimeError):
    """The learner kept dying; names the count and the last cause."""


def first_line(err: BaseException) -> str:
    """The exception's type and first line; for an error raised inside an actor, its cause's (Ray's own
    first line only names the actor method and the pid)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class LearnerHandle:
    """Calls on one learner actor (created by the driver with ``max_restarts=-1``) that survive its deaths."""

    def __init__(self, actor, *, timeout_s: float, max_failures: int, log=print):
        import ray

        self.actor = actor
        self.instance = ray.get(actor.instance_id.remote(), timeout=timeout_s)
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.log = log
        self.snapshot: dict | None = None  # the state after the last applied update (None: the constructor's)
        self.restarts = 0  # deaths survived over the run

    @property
    def actors(self) -> list:
        """The one learner actor, as a list (as ``LearnerGroup.actors``)."""
        return [self.actor]

    def _call(self, submit: Callable, what: str):
        """``ray.get(submit(actor, instance))``; on the actor's death, restore it and submit again. A call
        that reached a restarted actor before the death was seen is refused by it (LearnerRestarted):
        the same case. A learner that hangs (the call outlives ``cluster.call_timeout_s``) is killed, and
        Ray's restart is restored the same way."""
        import ray

        from cluster.remote import LearnerRestarted

        failures, restore = 0, False
        while True:
            try:
                if restore:
                    self._restore()
                return ray.get(submit(self.actor, self.instance), timeout=self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, LearnerRestarted) as err:
                hung = isinstance(err, ray.exceptions.GetTimeoutError)
                how = "hung" if hung else "died"
                if hung:  # ended so that Ray starts it again (max_restarts=-1); its call is abandoned
                    ray.kill(self.actor, no_restart=False)
                    err = TimeoutError(f"{what} did not finish within cluster.call_timeout_s = {self.timeout_s:g} s")
                failures += 1
                if failures >= self.max_failures:
                    raise LearnerFailedError(
                        f"the learner {how} {failures} times in a row (during {what}; cluster.max_actor_failures = "
                        f"{self.max_failures}); last cause: {first_line(err)}") from err
                self.restarts += 1
                self.log(f"gard: the learner {how} during {what} ({first_line(err)}); restarting it from the state "
                         f"after the last update")
                restore = True

    def _restore(self) -> None:
        import ray

        deadline = time.monotonic() + self.timeout_s
        previous = self.instance
        while True:  # the death was counted by the caller; "unavailable" only says Ray is restarting the actor
            try:
                instance = ray.get(self.actor.instance_id.remote(), timeout=self.timeout_s)
                if instance != previous:  # a killed (hung) learner's old process must not answer for the new
                    self.instance = instance
                    break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError):
                pass
            if time.monotonic() > deadline:
                raise ray.exceptions.GetTimeoutError(f"the learner did not restart within {self.timeout_s:g} s")
            time.sleep(0.5)
        if self.snapshot is not None:
            ray.get(self.actor.checked_load_state_dict.remote(instance=self.instance, state=ray.put(self.snapshot)),
                    timeout=self.timeout_s)

    # ----- the calls the driver makes ----------------------------------------------------------
    def update(self, **inputs) -> dict:
        """One epoch's update; its result and the new snapshot come back together or not at all."""
        stats, state = self._call(lambda a, i: [a.update.remote(instance=i, **inputs),
                                                a.checked_state_dict.remote(instance=i)], "the update")
        self.snapshot = state
        return stats

    def publish(self):
        """The current adapter as an ObjectRef (it goes to the samplers, not through the driver), after
        checking that it was produced: the small version record is fetched, the buffer is not."""
        def submit(actor, instance):
            submit.packet, version = actor.publish_with_version.options(num_returns=2).remote(instance=instance)
            return version

        self._call(submit, "publishing the adapter")
        return submit.packet

    def state(self) -> dict:
        """The learner's state (for a checkpoint): the snapshot of the last update, fetched if none."""
        if self.snapshot is None:
            self.snapshot = self._call(lambda a, i: a.checked_state_dict.remote(instance=i), "reading its state")
        return self.snapshot

    def export_lora(self) -> dict[str, bytes]:
        return self._call(lambda a, i: a.checked_export_lora.remote(instance=i), "exporting the adapter")

    def load_state(self, state: dict) -> int:
        """Puts the learner at ``state`` (a checkpoint's); returns the restored policy version."""
        import ray

        self.snapshot = state
        return self._call(lambda a, i: a.checked_load_state_dict.remote(instance=i, state=ray.put(state)),
                          "loading a checkpoint")
