"""The run's Ray placement groups: created from the layout's plan (``cluster/layout.py``) before any
actor starts, waited for with ``cluster.placement_timeout_s``, removed when the run ends or fails.

Samplers and learner ranks are started with ``PlacementGroupSchedulingStrategy(placement_group=...,
placement_group_bundle_index=i)``. That strategy is part of the actor's creation spec, so when Ray
restarts an actor (``max_restarts``) it schedules it into the same bundle again: the bundle's resources
stay reserved for it while it is down, and it comes back on the same node (checked by
``tests/cluster/test_cluster_placement_groups.py``). Removing a group kills the actors in it, and an
actor with ``max_restarts`` counts that as one more death: it would wait, RESTARTING, for a bundle that no
longer exists, and every call on its handle would fail with ActorUnavailableError for as long as the
handle lives. So ``Placement.remove`` first ends the actors started into the groups for good
(``ray.kill(no_restart=True)``: calls on them then fail at once with ActorDiedError).

After the actors start, ``locate`` asks each where it runs (``where()``: node id, node IP, GPU ids) and
``placement_report`` prints it by node, under the start-up banner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.config import Config, ConfigError
from cluster.layout import LayoutPlan, Slot, plan_layout


class PlacementError(ConfigError):
    """A placement group Ray could not reserve in time (names the layout, bundles and free resources)."""


@dataclass
class Node:
    node_id: str
    ip: str
    available: dict[str, float]

    def label(self) -> str:
        return f"{self.ip} ({self.node_id[:8]})"


def nodes() -> list[Node]:
    """The alive nodes with their free CPUs and GPUs (totals where Ray does not say what is free)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: fall back to the public totals
        free = {}
    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"),
                 {k: float(v) for k, v in free.get(n["NodeID"], n.get("Resources", {})).items()
                  if k in ("CPU", "GPU")})
            for n in ray.nodes() if n.get("Alive")]


@dataclass
class Placement:
    """The created groups of a ``LayoutPlan``; hands each actor its scheduling options."""

    plan: LayoutPlan
    groups: dict = field(default_factory=dict)  # group name -> ray PlacementGroup
    actors: list = field(default_factory=list)  # the samplers and learner ranks started with these options

    def _options(self, slot: Slot | None) -> dict:
        if slot is None or slot.group not in self.groups:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.groups[slot.group], placement_group_bundle_index=slot.bundle)}

    def sampler_options(self, *, index: int) -> dict:
        """``.options(**...)`` of sampler ``index`` (empty when it is in no group)."""
        return self._options(self.plan.samplers[index] if index < len(self.plan.samplers) else None)

    def learner_options(self, *, rank: int) -> dict:
        return self._options(self.plan.learners[rank] if rank < len(self.plan.learners) else None)

    def started(self, actors: list) -> list:
        """Records ``actors`` (started with this placement's options) for ``remove`` to end; returns them."""
        self.actors.extend(actors)
        return actors

    def remove(self) -> None:
        """Ends the recorded actors (no restart), then removes every group; safe to call twice."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead, or Ray already gone
                pass
        self.actors.clear()
        for name in list(self.groups):
            try:
                remove_placement_group(self.groups.pop(name))
            except Exception:  # noqa: BLE001 - Ray already gone (its shutdown removed everything)
                pass


def create_placement(config: Config) -> Placement:
    """Creates the layout's placement groups and waits until Ray has reserved them all; a group that is
    not reserved within ``cluster.placement_timeout_s`` raises PlacementError, with nothing left behind."""
    import ray
    from ray.util import placement_group

    c = config.cluster
    found = nodes()
    plan = plan_layout(c, nodes=[n.available for n in found])
    placement = Placement(plan)
    try:
        for group in plan.groups:
            placement.groups[group.name] = placement_group([dict(b) for b in group.bundles], strategy=group.strategy)
        deadline = time.monotonic() + c.placement_timeout_s
        for group in plan.groups:
            try:
                ray.get(placement.groups[group.name].ready(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(unplaced_message(config, group=group.describe(), nodes=found)) from None
        _wait_for_reward_stage_room(config, deadline=time.monotonic() + c.placement_timeout_s)
    except BaseException:
        placement.remove()
        raise
    return placement


def _wait_for_reward_stage_room(config: Config, *, deadline: float) -> None:
    """The reward stage runs outside the groups: once they are reserved, some node must have its CPUs and
    GPUs free (waited for until ``deadline``, for a cluster that is still adding nodes). Without this a
    stage that cannot be scheduled would leave the run waiting on its first call until the cluster timeout."""
    from cluster.specs import reward_stage_resources

    cpus, gpus = reward_stage_resources(config)
    while True:
        found = nodes()
        if any(n.available.get("CPU", 0.0) >= cpus - 1e-9 and n.available.get("GPU", 0.0) >= gpus - 1e-9
               for n in found):
            return
        if time.monotonic() >= deadline:
            free = "; ".join(f"node {n.label()} {_amounts(n.available)}" for n in found) or "no alive node"
            raise PlacementError(
                f"the reward stage asks for {_amounts({'CPU': cpus, 'GPU': gpus})} outside the samplers' and learner "
                f"ranks' placement groups, but once they were reserved no node had that free within "
                f"cluster.placement_timeout_s = {config.cluster.placement_timeout_s:g} s: {free}. Lower "
                f"cluster.reward_num_cpus / cluster.reward_num_gpus or the samplers' and learners' shares "
                f"(cluster.sampler_num_*, cluster.learner_num_*), or give Ray more or larger nodes")
        time.sleep(0.5)


def unplaced_message(config: Config, *, group: str, nodes: list[Node]) -> str:
    """The paragraph of a group Ray did not reserve in time."""
    c = config.cluster
    free = "; ".join(f"node {n.label()} {_amounts(n.available)}" for n in nodes) or "no alive node"
    fix = ("lower cluster.num_samplers and cluster.num_learners or their shares (cluster.sampler_num_*, "
           "cluster.learner_num_*)" if c.layout == "colocated" else
           "lower cluster.num_learners, cluster.num_samplers or cluster.{learner,sampler}_num_{cpus,gpus}, or use "
           "cluster.layout=colocated")
    return (f"cluster.layout = {c.layout!r}: Ray could not reserve the placement group {group} within "
            f"cluster.placement_timeout_s = {c.placement_timeout_s:g} s; free before it was asked for: {free}. "
            f"{fix[0].upper()}{fix[1:]}, give Ray more or larger nodes, or raise cluster.placement_timeout_s for a "
            f"cluster that is still adding nodes")


def _amounts(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in ("CPU", "GPU")) + "}"


# ----- where the actors run ------------------------------------------------------------------------
def where() -> dict:
    """Where the calling actor runs: its node id and IP and the GPU ids Ray gave it (called inside actors)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def _where_of(_actor) -> dict:
    return where()


def locate(actors: dict[str, object], *, reward_stage=None, timeout_s: float) -> dict[str, dict]:
    """``where()`` of every named actor (their ``where`` method), and of the reward stage (a plain class:
    through Ray's ``__ray_call__``) when given, waited for together with ``timeout_s``."""
    import ray

    refs = {name: actor.where.remote() for name, actor in actors.items()}
    if reward_stage is not None:
        refs["reward stage"] = reward_stage.__ray_call__.remote(_where_of)
    found = ray.get(list(refs.values()), timeout=timeout_s)
    return dict(zip(refs, found, strict=True))


def placement_report(plan: LayoutPlan, locations: dict[str, dict]) -> str:
    """The banner's placement block: the groups, then one line per node with its actors and their GPUs."""
    by_node: dict[tuple[str, str], list[str]] = {}
    for name, where_ in locations.items():
        gpus = f" [GPU {','.join(where_['gpu_ids'])}]" if where_["gpu_ids"] else ""
        by_node.setdefault((where_["node_ip"], where_["node_id"]), []).append(name + gpus)
    lines = [f"  placement           : {plan.describe()}"]
    for (ip, node_id), names in by_node.items():
        lines.append(f"    node {ip} ({node_id[:8]}): " + ", ".join(names))
    return "\n".join(lines)
