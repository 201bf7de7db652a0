"""The run's resource demands against what Ray has free: a run that cannot be placed fails before
anything starts, naming the resource, the amount asked (with its parts) and the amount free."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.placement import check_placement, placement_problem, resource_demands

REPO = Path(__file__).resolve().parents[2]


def test_demands_are_summed_per_actor_and_replica():
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["reward_service.backend=serve",
                                                         "rewards.jpeg_compressibility.serve.min_replicas=2",
                                                         "rewards.jpeg_compressibility.serve.max_replicas=3"])
    demands = resource_demands(config)
    # 2 samplers x 0.5 + learner 0.5 + stage 0.1 (Serve backend) + 2 replicas x 0.25
    assert sum(d[1] for d in demands) == pytest.approx(2.1)
    assert ("rewards.jpeg_compressibility (2 replica(s))", 0.5, 0.0) in demands
    assert resource_demands(config, running_apps={"reward-jpeg_compressibility"})[-1][0] == "reward stage"
    problem = placement_problem(demands, {"CPU": 2.0})
    assert problem.startswith("the run asks for 2.1 CPU (sampler 0 0.5, sampler 1 0.5, learner 0.5, reward stage 0.1, "
                              "rewards.jpeg_compressibility (2 replica(s)) 0.5) but the Ray cluster has 2 free")
    assert placement_problem(demands, {"CPU": 2.1}) is None
    gpu = placement_problem([("learner", 0.5, 1.0)], {"CPU": 4.0})
    assert "asks for 1 GPU (learner 1) but the Ray cluster has 0 free" in gpu



def test_the_reward_stage_asks_for_a_gpu_with_serve_only_for_evaluation_models_of_its_own():
    serve = ["reward_service.backend=serve", "cluster.reward_num_gpus=1"]
    stage = lambda *overrides: next(d for d in resource_demands(load_config(  # noqa: E731
        REPO / "configs" / "jpeg_demo.yaml", [*serve, *overrides])) if d[0] == "reward stage")
    assert stage() == ("reward stage", 0.1, 0.0)  # it only waits on the services' handles
    assert stage("evaluation.rewards={clip_score: {device: cuda}}") == ("reward stage", 0.1, 1.0)
    local = resource_demands(load_config(REPO / "configs" / "jpeg_demo.yaml", ["cluster.reward_num_gpus=1"]))
    assert ("reward stage", 0.5, 1.0) in local


def test_an_unplaceable_run_fails_fast_on_a_local_cluster_and_warns_on_a_joined_one(ray_local):
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["reward_service.backend=serve",
                                                         "rewards.jpeg_compressibility.serve.num_cpus=1"])
    with pytest.raises(ConfigError, match=r"the run asks for 2.6 CPU .* but the Ray cluster has 2 free"):
        check_placement(config, strict=True)
    lines = []
    check_placement(config, strict=False, log=lines.append)
    assert len(lines) == 1 and "warning" in lines[0] and "waiting for the cluster to grow" in lines[0]
    check_placement(load_config(REPO / "configs" / "jpeg_demo.yaml", ["reward_service.backend=serve"]), strict=True)
