"""The learner actors as the driver uses them: one (``cluster.learner_handle.LearnerHandle``) or a group of
``cluster.num_learners`` data-parallel ranks (``LearnerGroup``), with the same calls.

The ranks form a torch.distributed group (gloo on CPU, NCCL on GPU; ``learner/distributed.py``): rank 0
finds a free port on its address (127.0.0.1 when every rank runs on its node, else its node IP), the
driver hands the address to every rank through Ray, and the run's call timeout bounds the rendezvous and
every collective. Every rank receives the epoch's trajectory references and fetches the whole batch (the
batch is small next to the model, and every rank then derives the same advantages, selection and
shuffled pairs without communication); each trains its share of every optimizer step and the gradients
are summed before clipping, so all ranks hold the same adapter and optimizer state. Rank 0 publishes the
adapter and its state is the one snapshotted and checkpointed; a checkpoint is loaded on every rank.
Every ``cluster.learner_check_every`` epochs the ranks compare digests of their adapter and optimizer
state; a mismatch raises ``LearnerDivergedError`` naming the ranks and the epoch (the driver then stops
with rank 0's checkpoint).

Rank death: the group is rebuilt from the last snapshot, and the call that failed is repeated. A
torch.distributed group cannot lose a member: the other ranks are blocked in, or fail at, their next
collective, and a process that held a broken group is not reliably reusable. So when any rank dies (or a
collective fails because one did), the handle kills every rank (Ray restarts them, ``max_restarts=-1``),
forms a new group on a fresh port, loads the snapshot (rank 0's state after the last applied update) on
every rank and repeats the call, as ``LearnerHandle`` does for one learner: every epoch is applied once,
from the state it started from, and the run equals the uninterrupted one. ``cluster.max_actor_failures``
failures in a row raise ``LearnerFailedError``; the driver then stops with a checkpoint. Restarting every
rank costs N model loads, but it reuses the single learner's proven restore path instead of a second,
partial one.

A rank that hangs (alive, but never reaching the collective) is handled the same way. Each collective is
bounded by half the run's call timeout (``collective_timeout_s``), so a rank waiting for a hung peer fails
with ``CollectiveError`` well before the driver's wait on the call runs out; and if the driver's wait does
run out first (every rank hung), that too counts as a failure of the group and rebuilds it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from cluster.config import Config
from cluster.errors import actor_start_error
from cluster.learner_handle import LearnerFailedError, LearnerHandle, first_line
from cluster.placement_groups import Placement
from cluster.specs import learner_spec, policy_spec
from learner.distributed import CollectiveError, LearnerDivergedError, backend_for


def start_learner_actors(config: Config, *, pretrained: str, env: dict, placement: Placement) -> list:
    """Starts ``cluster.num_learners`` learner actors, rank i in its bundle of ``placement`` (not waited for:
    they load while the rest starts; ``placement.remove()`` ends them). Ray restarts one that dies, into the
    same bundle; the handle puts it back at the state where it was."""
    import ray

    from cluster.remote import RemoteLearner

    c = config.cluster
    cls = ray.remote(num_cpus=c.learner_num_cpus, num_gpus=c.learner_num_gpus, runtime_env=env, max_restarts=-1,
                     max_task_retries=0)(RemoteLearner)
    return placement.started([cls.options(**placement.learner_options(rank=rank)).remote(
        policy_spec=policy_spec(config, pretrained=pretrained, num_gpus=c.learner_num_gpus),
        spec=learner_spec(config), torch_threads=c.torch_threads, init_adapter=config.policy.init_adapter,
        call_timeout_s=c.call_timeout_s) for rank in range(c.num_learners)])


def connect_learners(actors: list, *, config: Config, pretrained: str) -> LearnerHandle | LearnerGroup:
    """Waits for the actors to start (an adapter refused by a learner becomes the ConfigError that says
    why) and returns the handle the driver calls: ``LearnerHandle`` for one, ``LearnerGroup`` for more."""
    import ray

    c = config.cluster
    for actor in actors:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=c.call_timeout_s)
        except ray.exceptions.RayActorError as err:
            raise actor_start_error(err, "learner") from err
    if len(actors) == 1:
        return LearnerHandle(actors[0], timeout_s=c.call_timeout_s, max_failures=c.max_actor_failures)
    device = policy_spec(config, pretrained=pretrained, num_gpus=c.learner_num_gpus).device
    return LearnerGroup(actors, timeout_s=c.call_timeout_s, max_failures=c.max_actor_failures,
                        backend=backend_for(device), check_every=c.learner_check_every)


class LearnerGroup:
    """Calls on N learner ranks that survive the death of any of them (see the module docstring)."""

    def __init__(self, actors: list, *, timeout_s: float, max_failures: int, backend: str, check_every: int,
                 log=print):
        import ray

        self.actors = actors
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.backend = backend
        self.check_every = check_every
        self.log = log
        self.instances = ray.get([a.instance_id.remote() for a in actors], timeout=timeout_s)
        self.snapshot: dict | None = None  # rank 0's state after the last applied update (None: the constructors')
        self.restarts = 0  # group rebuilds over the run
        self.formed = False
        self.broken = False
        self._call(lambda actors, instances: [], "forming the learner group")

    @property
    def actor(self):
        """Rank 0 (it publishes, exports and is checkpointed)."""
        return self.actors[0]

    # ----- calls that survive a rank's death ---------------------------------------------------
    def _call(self, submit: Callable, what: str) -> list:
        """``submit(actors, instances)`` -> refs, waited for together; when a rank dies (or a collective
        fails because one did), every rank is restarted, the group formed again, the snapshot loaded and
        the call submitted again."""
        import ray

        from cluster.remote import LearnerRestarted

        failures = 0
        while True:
            try:
                if self.broken:
                    self._restart_all()
                if not self.formed:
                    self._form()
                return self._wait(submit(self.actors, self.instances), what)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, LearnerRestarted,
                    CollectiveError) as err:
                failures += 1
                if failures >= self.max_failures:
                    raise LearnerFailedError(
                        f"the learner group failed {failures} times in a row (during {what}; "
                        f"cluster.max_actor_failures = {self.max_failures}, cluster.num_learners = "
                        f"{len(self.actors)}); last cause: {first_line(err)}") from err
                self.restarts += 1
                how = ("hung" if isinstance(err, ray.exceptions.GetTimeoutError) else
                       "failed in a collective" if isinstance(err, CollectiveError) else "died")
                self.log(f"gard: a learner rank {how} during {what} ({first_line(err)}); restarting all "
                         f"{len(self.actors)} ranks from the state after the last update")
                for actor in self.actors:
                    ray.kill(actor, no_restart=False)
                self.broken, self.formed = True, False

    def _wait(self, refs: list, what: str) -> list:
        """Every ref's value, by position; the first failure is raised as soon as it is known (a dead rank
        leaves the others blocked in a collective: waiting for them would only wait for the timeout)."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        pending, values = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ray.exceptions.GetTimeoutError(
                    f"the learner group did not finish {what} within cluster.call_timeout_s = {self.timeout_s:g} s")
            for ref in ready:
                values[ref] = ray.get(ref)
        return [values[ref] for ref in refs]

    def _restart_all(self) -> None:
        """Waits until every killed rank runs again (a new instance id)."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        for rank, actor in enumerate(self.actors):
            while True:
                try:
                    instance = ray.get(actor.instance_id.remote(), timeout=self.timeout_s)
                    if instance != self.instances[rank]:
                        self.instances[rank] = instance
                        break
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError):
                    pass  # Ray is restarting it
                if time.monotonic() > deadline:
                    raise ray.exceptions.GetTimeoutError(f"learner rank {rank} did not restart within "
                                                         f"{self.timeout_s:g} s")
                time.sleep(0.5)
        self.broken = False

    def _form(self) -> None:
        """The process group on a fresh port of rank 0, then every rank at the snapshot (or, for a new
        group, a check that the constructors built the same state)."""
        import ray

        nodes = self._wait([a.node.remote() for a in self.actors], "locating the ranks")
        host = "127.0.0.1" if len({node for node, _ in nodes}) == 1 else nodes[0][1]
        port = self._wait([self.actors[0].group_port.remote(instance=self.instances[0], host=host)],
                          "finding a port")[0]
        world = len(self.actors)
        self._wait([a.join_ranks.remote(instance=i, host=host, port=port, rank=rank, world_size=world,
                                        backend=self.backend)
                    for rank, (a, i) in enumerate(zip(self.actors, self.instances, strict=True))],
                   f"forming the {self.backend} group at {host}:{port}")
        if self.snapshot is not None:
            state = ray.put(self.snapshot)
            self._wait([a.checked_load_state_dict.remote(instance=i, state=state)
                        for a, i in zip(self.actors, self.instances, strict=True)], "loading the snapshot")
        else:
            with _diverged():
                self._wait(_compare(self.actors, self.instances, epoch=0), "comparing the ranks")
        self.formed = True

    # ----- the calls the driver makes ----------------------------------------------------------
    def update(self, *, epoch: int, **inputs) -> dict:
        """One epoch's update on every rank (each gets the same references); rank 0's stats and state come
        back. Every ``check_every`` epochs the ranks first compare their state (after ``epoch`` epochs)."""
        if self.check_every and epoch > 0 and epoch % self.check_every == 0:
            with _diverged():
                self._call(lambda actors, instances: _compare(actors, instances, epoch=epoch), "comparing the ranks")

        def submit(actors, instances):
            # Every rank fetches the whole batch by reference (see the module docstring).
            updates = [a.update.remote(instance=i, epoch=epoch, **inputs)
                       for a, i in zip(actors, instances, strict=True)]
            return [*updates, actors[0].checked_state_dict.remote(instance=instances[0])]

        results = self._call(submit, "the update")
        self.snapshot = results[-1]
        return results[0]

    def publish(self):
        """Rank 0's adapter as an ObjectRef, after checking that it was produced (as ``LearnerHandle``)."""
        def submit(actors, instances):
            submit.packet, version = actors[0].publish_with_version.options(num_returns=2).remote(
                instance=instances[0])
            return [version]

        self._call(submit, "publishing the adapter")
        return submit.packet

    def state(self) -> dict:
        """Rank 0's state (for a checkpoint): the snapshot of the last update, fetched if none."""
        if self.snapshot is None:
            self.snapshot = self._call(lambda a, i: [a[0].checked_state_dict.remote(instance=i[0])],
                                       "reading its state")[0]
        return self.snapshot

    def export_lora(self) -> dict[str, bytes]:
        return self._call(lambda a, i: [a[0].checked_export_lora.remote(instance=i[0])], "exporting the adapter")[0]

    def load_state(self, state: dict) -> int:
        """Puts every rank at ``state`` (a checkpoint's); returns the restored policy version."""
        import ray

        self.snapshot = state
        ref = ray.put(state)
        versions = self._call(lambda actors, instances: [a.checked_load_state_dict.remote(instance=i, state=ref)
                                                         for a, i in zip(actors, instances, strict=True)],
                              "loading a checkpoint")
        return versions[0]


def _compare(actors: list, instances: list[str], *, epoch: int) -> list:
    """Every rank compares its state digest with the others' (a collective): refs of the digests."""
    return [a.checked_check_replicas.remote(instance=i, epoch=epoch) for a, i in zip(actors, instances, strict=True)]


@contextlib.contextmanager
def _diverged():
    """A rank's LearnerDivergedError (wrapped by Ray) raised as a plain one, for the driver to catch."""
    try:
        yield
    except LearnerDivergedError as err:
        raise LearnerDivergedError(str(getattr(err, "cause", None) or err)) from None
