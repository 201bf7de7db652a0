"""The actor classes as the driver starts them: the plain classes, with the object references they
are sent resolved in the actor's own process first.

The plain ``Sampler`` and ``Learner`` take values, so tests and the GPU device check run them
in-process. The driver moves references only (latents never pass through it); Ray resolves references
passed as top-level arguments by itself, but not inside lists, so these subclasses fetch the lists'
references with the run's call timeout (``cluster.call_timeout_s``) and call the plain method.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

from actors.sampler import Sampler
from learner.learner import Learner


def resolve(values: list, *, timeout_s: float) -> list:
    """``values`` with every ``ray.ObjectRef`` replaced by its value (one ``ray.get`` for all)."""
    import ray

    refs = [i for i, value in enumerate(values) if isinstance(value, ray.ObjectRef)]
    out = list(values)
    if refs:
        for i, value in zip(refs, ray.get([values[i] for i in refs], timeout=timeout_s), strict=True):
            out[i] = value
    return out


def _reward_totals(scored: list) -> list[np.ndarray]:
    """The reward stage's ScoredBatches (or plain arrays) -> the float32 totals the learner trains on."""
    from rewards.base import ScoredBatch

    return [s.total if isinstance(s, ScoredBatch) else np.asarray(s, dtype=np.float32) for s in scored]


class Locatable:
    """``where()``: the node and GPUs of the actor (the banner's placement block, cluster/placement_groups.py)."""

    def where(self) -> dict:
        from cluster.placement_groups import where

        return where()


class LearnerRestarted(RuntimeError):
    """A call meant for a learner instance that is gone: Ray restarted the actor (fresh state) since."""


class RemoteLearner(Locatable, Learner):
    """``Learner`` whose ``update`` accepts lists of references (trajectories, scores, pairs), and whose
    stateful calls name the instance they expect: a call queued to an actor that Ray restarted in
    between is refused (``LearnerRestarted``) instead of running on the constructor's state."""

    def __init__(self, *, call_timeout_s: float, **kwargs):
        super().__init__(**kwargs)
        self.call_timeout_s = call_timeout_s
        self.instance = uuid.uuid4().hex

    def instance_id(self) -> str:
        return self.instance

    def _expect(self, instance: str) -> None:
        if instance != self.instance:
            raise LearnerRestarted(f"this learner ({self.instance[:8]}) was restarted; the call expected "
                                   f"{instance[:8]}")

    def update(self, *, instance: str, trajectories: list, rewards: list, epoch: int,
               pairs: list | None = None) -> dict[str, float]:
        self._expect(instance)
        start = time.perf_counter()
        trajectories = resolve(trajectories, timeout_s=self.call_timeout_s)
        totals = _reward_totals(resolve(rewards, timeout_s=self.call_timeout_s))
        pairs = None if pairs is None else resolve(pairs, timeout_s=self.call_timeout_s)
        waited = time.perf_counter() - start  # train_s excludes waiting for the samplers and rewards
        stats = super().update(trajectories=trajectories, rewards=totals, epoch=epoch, pairs=pairs)
        return {**stats, "time/wait_inputs_s": waited}

    def publish_with_version(self, *, instance: str) -> tuple:
        """``publish()`` and its version as two returns: the driver fetches the small one to learn that
        the adapter was produced, and hands the packet's reference to the samplers."""
        self._expect(instance)
        packet = self.publish()
        return packet, packet.version

    def checked_state_dict(self, *, instance: str) -> dict:
        self._expect(instance)
        return self.state_dict()

    def checked_export_lora(self, *, instance: str) -> dict[str, bytes]:
        self._expect(instance)
        return self.export_lora()

    def checked_load_state_dict(self, *, instance: str, state: dict) -> int:
        self._expect(instance)
        return self.load_state_dict(state=state)

    # ----- data-parallel ranks (cluster/learner_group.py) --------------------------------------
    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP) of this learner: ranks on one node meet on 127.0.0.1, else on rank 0's IP."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def group_port(self, *, instance: str, host: str) -> int:
        """A free port on ``host`` for the group's rendezvous (called on rank 0, which listens there)."""
        from learner.distributed import free_port

        self._expect(instance)
        return free_port(host)

    def join_ranks(self, *, instance: str, host: str, port: int, rank: int, world_size: int, backend: str) -> int:
        """Joins the learners' process group (every rank at once; half the run's call timeout bounds the
        rendezvous and every collective, see ``collective_timeout_s``). Returns the rank."""
        from learner.distributed import RankGroup, collective_timeout_s

        self._expect(instance)
        self.join_group(RankGroup.join(host=host, port=port, rank=rank, world_size=world_size, backend=backend,
                                       timeout_s=collective_timeout_s(self.call_timeout_s), device=self.policy.device))
        return rank

    def checked_check_replicas(self, *, instance: str, epoch: int) -> str:
        self._expect(instance)
        return self.check_replicas(epoch=epoch)


class RemoteSampler(Locatable, Sampler):
    """``Sampler`` whose ``dfusion`` accepts references to the source trajectory batches."""

    def __init__(self, *, call_timeout_s: float, **kwargs):
        super().__init__(**kwargs)
        self.call_timeout_s = call_timeout_s

    def dfusion(self, *, sources: list, poor: list[tuple[int, int]], good: list[tuple[int, int]], spec) -> tuple:
        return super().dfusion(sources=resolve(sources, timeout_s=self.call_timeout_s), poor=poor, good=good,
                               spec=spec)
