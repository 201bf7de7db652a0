"""Placement groups on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``: a head with the
custom resource ``node_a`` and a worker with ``node_b``, 3 logical CPUs each on this machine): learner ranks
packed and samplers spread, a restarted actor back in its bundle, the actors ended with their groups, a group
that cannot be placed refused quickly with its bundles named, a reward stage that no node can hold
refused after the groups, and a short colocated run whose pairs land on the node of their bundle."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.placement_groups import PlacementError, create_placement, locate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes():
    """The simulated cluster, joined by this process (a run then uses it: "already initialized")."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": {"node_a": 1}, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=3, resources={"node_b": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        yield {n["NodeID"]: ("a" if "node_a" in n["Resources"] else "b") for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _config(cache_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "jpeg_demo.yaml", [
        f"cache_dir={cache_dir}", "logging.progress=false", "logging.tensorboard=false", "cluster.max_staleness=0",
        "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1", "checkpoint.every_epochs=0", *overrides])


def _probe(cpus: float, **options):
    """A small actor with ``where()`` as the run's actors have (without importing torch: it starts in a
    second), started with ``options`` (its bundle)."""
    import ray

    class Probe:
        def where(self) -> dict:
            return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    return ray.remote(num_cpus=cpus, max_restarts=1, max_task_retries=0)(Probe).options(**options).remote()


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def _wait_free(cpus: float, *, timeout_s: float = 60) -> float:
    """The free CPUs once they reach ``cpus`` (Ray reports a removed group's resources a moment later)."""
    deadline = time.monotonic() + timeout_s
    while _free_cpus() < cpus - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.2)
    return _free_cpus()


@pytest.fixture(autouse=True)
def _idle(two_nodes):
    """Every test starts on an idle cluster (the groups of the one before are gone)."""
    assert _wait_free(6.0) == pytest.approx(6.0)


def test_learner_ranks_share_a_node_and_samplers_spread(two_nodes, tmp_path):
    config = _config(tmp_path, "cluster.num_learners=2")
    placement = create_placement(config)
    try:
        assert placement.plan.describe() == ("disaggregated: learners 2 x {CPU: 0.5} STRICT_PACK; "
                                             "samplers 2 x {CPU: 0.5} SPREAD")
        actors = {f"sampler {i}": _probe(0.5, **placement.sampler_options(index=i)) for i in range(2)}
        actors.update({f"learner rank {r}": _probe(0.5, **placement.learner_options(rank=r)) for r in range(2)})
        nodes = {name: two_nodes[w["node_id"]] for name, w in locate(actors, timeout_s=120).items()}
        assert nodes["learner rank 0"] == nodes["learner rank 1"]
        assert {nodes["sampler 0"], nodes["sampler 1"]} == {"a", "b"}
        assert _free_cpus() == pytest.approx(4.0)  # the bundles stay reserved for their actors
    finally:
        placement.remove()
    assert _wait_free(6.0) == pytest.approx(6.0)  # removing the groups ended the actors


def test_a_restarted_actor_goes_back_into_its_bundle(two_nodes, tmp_path):
    """Ray keeps the scheduling strategy in the actor's creation spec: a restart lands in the same bundle."""
    import ray

    placement = create_placement(_config(tmp_path))
    try:
        actor = _probe(0.5, **placement.sampler_options(index=1))
        before = ray.get(actor.where.remote(), timeout=120)
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        actor.__ray_call__.remote(lambda self: os._exit(1))
        deadline, after = time.monotonic() + 120, None
        while after is None and time.monotonic() < deadline:
            try:
                after = ray.get(actor.where.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                time.sleep(0.2)  # the call reached the dying actor; the restarted one answers the next
        assert after is not None and ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != pid
        assert after["node_id"] == before["node_id"]
        # The group's bundle resources are the only ones in use: the restart took no resources outside it.
        assert _free_cpus() == pytest.approx(6.0 - 1.0 - 0.5)
    finally:
        placement.remove()


def test_removing_the_groups_ends_their_actors_for_good(two_nodes, tmp_path):
    """An actor with restarts counts its group's removal as a death and would wait, RESTARTING, for a bundle
    that no longer exists (every call: ActorUnavailableError); ``remove`` ends the recorded ones first."""
    import ray

    placement = create_placement(_config(tmp_path))
    try:
        actor = placement.started([_probe(0.5, **placement.sampler_options(index=0))])[0]
        ray.get(actor.where.remote(), timeout=120)
    finally:
        placement.remove()
    start = time.monotonic()
    with pytest.raises(ray.exceptions.ActorDiedError, match="killed by `ray.kill`"):
        ray.get(actor.where.remote(), timeout=60)
    assert time.monotonic() - start < 30 and placement.actors == []


def test_a_group_that_cannot_be_placed_is_refused_quickly_with_its_bundles_named(two_nodes, tmp_path):
    import ray

    config = _config(tmp_path, "cluster.num_learners=4", "cluster.learner_num_cpus=2",
                     "cluster.placement_timeout_s=2")
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        create_placement(config)
    assert time.monotonic() - start < 30
    text = str(err.value)
    assert text.startswith("cluster.layout = 'disaggregated': Ray could not reserve the placement group learners 4 x "
                           "{CPU: 2} PACK within cluster.placement_timeout_s = 2 s; free before it was asked for: node "
                           "127.0.0.1 ("), text
    assert text.count("{CPU: 3, GPU: 0}") == 2 and "Lower cluster.num_learners" in text
    # Nothing is left reserved (the samplers' group, created first, was removed too).
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert _wait_free(6.0) == pytest.approx(6.0)


def test_a_reward_stage_no_node_can_hold_is_refused_after_the_groups_with_the_free_resources(two_nodes, tmp_path):
    import ray

    # The groups fit (2 x 0.5 samplers, 1 x 0.5 learner); the reward stage, outside them, asks for more CPUs
    # than any node has: refused within the placement timeout instead of hanging on the stage's first call.
    config = _config(tmp_path, "cluster.reward_num_cpus=4", "cluster.placement_timeout_s=2")
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        create_placement(config)
    assert time.monotonic() - start < 30
    text = str(err.value)
    assert text.startswith("the reward stage asks for {CPU: 4, GPU: 0} outside the samplers' and learner ranks' "
                           "placement groups, but once they were reserved no node had that free within "
                           "cluster.placement_timeout_s = 2 s: node 127.0.0.1 ("), text
    assert "Lower cluster.reward_num_cpus" in text
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.mark.slow  # 46 s on 2 idle cores, 80-110 s on busy ones (five actors load the tiny pipeline)
def test_a_colocated_run_places_each_sampler_with_its_learner_rank(two_nodes, tmp_path):
    """Two (sampler + rank) bundles of 2 CPUs cannot share a 3-CPU node: PACK puts one on each node, and
    sampler i and learner rank i sit in bundle i. The run trains across the nodes (gloo) and ends with
    the groups removed."""
    import ray

    from cluster.run import train

    lines: list[str] = []
    config = _config(tmp_path / "cache", "epochs=2", "cluster.layout=colocated", "cluster.num_samplers=2",
                     "cluster.num_learners=2", "cluster.sampler_num_cpus=1", "cluster.learner_num_cpus=1")
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lines.append)
    text = "\n".join(lines)
    print(text)
    assert "  layout              : colocated: 2 bundles of (sampler + learner rank) = 2 CPU, 0 GPU, packed" in text
    assert "  placement           : colocated: colocated 2 x {CPU: 2} PACK" in text
    placed = {}
    for line in text.splitlines():
        if (found := re.match(r"    node 127\.0\.0\.1 \((\w{8})\): (.*)", line)) is not None:
            node = next(v for k, v in two_nodes.items() if k.startswith(found[1]))
            placed.update({name: node for name in found[2].split(", ")})
    assert placed["sampler 0"] == placed["learner rank 0"] != placed["sampler 1"] == placed["learner rank 1"], placed
    assert "reward stage" in placed
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
