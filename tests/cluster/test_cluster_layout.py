"""``cluster.layout`` without Ray: the bundles and strategies of each layout, its config rules, the banner
lines, and the presets that use it (loaded through the config loader; no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.cost_model import EpochWork
from cluster.layout import PACK, SPREAD, STRICT_PACK, Slot, bundle, fits_on_one_node, plan_layout
from cluster.placement import learner_problem
from cluster.placement_groups import Node, placement_report, unplaced_message
from cluster.specs import banner

REPO = Path(__file__).resolve().parents[2]
ONE_GPU_NODE = {"CPU": 64.0, "GPU": 8.0}


def _cluster(*overrides: str):
    return load_config(REPO / "configs" / "jpeg_demo.yaml", list(overrides)).cluster


# ----- bundles and strategies ------------------------------------------------------------------
def test_disaggregated_packs_the_learner_ranks_and_spreads_the_samplers():
    c = _cluster("cluster.num_learners=2")
    plan = plan_layout(c, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    learners, samplers = plan.groups
    assert (learners.name, learners.bundles, learners.strategy) == ("learners", ({"CPU": 0.5},) * 2, STRICT_PACK)
    assert (samplers.name, samplers.bundles, samplers.strategy) == ("samplers", ({"CPU": 0.5},) * 2, SPREAD)
    assert plan.samplers == (Slot("samplers", 0), Slot("samplers", 1))
    assert plan.learners == (Slot("learners", 0), Slot("learners", 1))
    assert plan.describe() == "disaggregated: learners 2 x {CPU: 0.5} STRICT_PACK; samplers 2 x {CPU: 0.5} SPREAD"


def test_learner_ranks_that_no_single_node_holds_are_packed_on_as_few_nodes_as_possible():
    c = _cluster("cluster.num_learners=4", "cluster.learner_num_gpus=1")
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert plan_layout(c, nodes=nodes).groups[0].strategy == PACK
    assert plan_layout(c, nodes=[*nodes, {"CPU": 16.0, "GPU": 4.0}]).groups[0].strategy == STRICT_PACK
    assert not fits_on_one_node([{"GPU": 1.0}] * 3, nodes=nodes) and fits_on_one_node([{"GPU": 1.0}] * 2, nodes=nodes)


def test_colocated_puts_sampler_i_and_learner_rank_i_in_bundle_i():
    c = _cluster("cluster.layout=colocated", "cluster.num_samplers=8", "cluster.num_learners=8",
                 "cluster.sampler_num_gpus=0.45", "cluster.learner_num_gpus=0.45")
    plan = plan_layout(c, nodes=[ONE_GPU_NODE])
    (group,) = plan.groups
    assert group.bundles == ({"CPU": 1.0, "GPU": 0.9},) * 8 and group.strategy == STRICT_PACK
    assert plan.samplers == plan.learners == tuple(Slot("colocated", i) for i in range(8))
    # 64 pairs on 8 nodes of 8 GPUs: no node holds all, so PACK (8 bundles per node).
    many = _cluster("cluster.layout=colocated", "cluster.num_samplers=64", "cluster.num_learners=64",
                    "cluster.sampler_num_gpus=0.45", "cluster.learner_num_gpus=0.45")
    assert plan_layout(many, nodes=[ONE_GPU_NODE] * 8).groups[0].strategy == PACK


def test_colocated_with_one_learner_gives_the_other_bundles_a_sampler_only():
    """``gard eval`` starts one learner whatever the config says."""
    c = _cluster("cluster.layout=colocated", "cluster.num_learners=2")
    c.num_learners = 1
    plan = plan_layout(c, nodes=[{"CPU": 4.0}])
    assert plan.groups[0].bundles == ({"CPU": 1.0}, {"CPU": 0.5})
    assert plan.samplers == (Slot("colocated", 0), Slot("colocated", 1)) and plan.learners == (Slot("colocated", 0),)


def test_a_role_that_asks_for_no_resources_gets_no_placement_group():
    plan = plan_layout(_cluster("cluster.sampler_num_cpus=0"), nodes=[{"CPU": 2.0}])
    assert [g.name for g in plan.groups] == ["learners"] and plan.samplers == (None, None)
    assert bundle(cpus=0, gpus=0) == {} and bundle(cpus=0.1 + 0.2, gpus=0) == {"CPU": 0.3}


# ----- config rules ---------------------------------------------------------------------------
def test_colocated_needs_as_many_samplers_as_learner_ranks():
    with pytest.raises(ConfigError, match=r"cluster.layout = 'colocated' pairs sampler i with learner rank i on one "
                                          r"device, but cluster.num_samplers = 2 and cluster.num_learners = 3; set both"):
        _cluster("cluster.layout=colocated", "cluster.num_learners=3")
    with pytest.raises(ConfigError, match=r"cluster.layout = 'bogus' is out of range: expected one of "
                                          r"\['disaggregated', 'colocated'\]"):
        _cluster("cluster.layout=bogus")


def test_colocated_gpu_shares_share_one_gpu_and_allow_fractional_learner_ranks():
    both = ["cluster.layout=colocated", "cluster.num_learners=2"]
    ok = _cluster(*both, "cluster.sampler_num_gpus=0.5", "cluster.learner_num_gpus=0.5")
    assert ok.learner_num_gpus == 0.5 and ok.num_learners == 2  # NCCL: still one rank per GPU bundle
    with pytest.raises(ConfigError, match=r"0.25 \+ 0.25 = 0.5, expected more than 0.5 and at most 1: .*NCCL needs one "
                                          r"learner rank per GPU"):
        _cluster(*both, "cluster.sampler_num_gpus=0.25", "cluster.learner_num_gpus=0.25")
    with pytest.raises(ConfigError, match=r"= 1 \+ 1 = 2, expected more than 0.5 and at most 1"):
        _cluster(*both, "cluster.sampler_num_gpus=1", "cluster.learner_num_gpus=1")
    with pytest.raises(ConfigError, match=r"cluster.sampler_num_gpus = 1 and cluster.learner_num_gpus = 0; give both"):
        _cluster(*both, "cluster.sampler_num_gpus=1")
    # Disaggregated ranks on GPUs still need whole GPUs, and the error offers the colocated layout.
    with pytest.raises(ConfigError, match=r"whole GPU per rank.*cluster.layout=colocated"):
        _cluster("cluster.num_learners=2", "cluster.learner_num_gpus=0.5")


def test_colocated_ranks_need_a_gpu_each_before_anything_starts():
    config = load_config(REPO / "configs" / "sd15_8gpu_colocated.yaml")
    assert learner_problem(config, {"CPU": 64.0, "GPU": 8.0}) is None
    problem = learner_problem(config, {"CPU": 64.0, "GPU": 7.6})
    assert problem.startswith("cluster.layout = 'colocated' with cluster.num_learners = 8: every learner rank and its "
                              "sampler take one GPU (cluster.sampler_num_gpus + cluster.learner_num_gpus = 0.9 of it), "
                              "so 8 GPUs are required, but the Ray cluster has 7 GPU(s) available")


# ----- what is printed ------------------------------------------------------------------------
def test_the_banner_gives_the_layout_and_the_report_gives_every_actors_node_and_gpu():
    config = load_config(REPO / "configs" / "sd15_8gpu_colocated.yaml")
    assert "  layout              : colocated: 8 bundles of (sampler + learner rank) = 4 CPU, 0.9 GPU, packed" in \
        banner(config, Path("run"), "auto")
    plan = plan_layout(config.cluster, nodes=[ONE_GPU_NODE])
    a, b = {"node_id": "aaaa1111" * 7, "node_ip": "10.0.0.1"}, {"node_id": "bbbb2222" * 7, "node_ip": "10.0.0.2"}
    report = placement_report(plan, {"sampler 0": {**a, "gpu_ids": ["0"]}, "learner rank 0": {**a, "gpu_ids": ["0"]},
                                     "sampler 1": {**b, "gpu_ids": ["3"]}, "reward stage": {**b, "gpu_ids": []}})
    assert report.splitlines() == [
        "  placement           : colocated: colocated 8 x {CPU: 4, GPU: 0.9} STRICT_PACK",
        "    node 10.0.0.1 (aaaa1111): sampler 0 [GPU 0], learner rank 0 [GPU 0]",
        "    node 10.0.0.2 (bbbb2222): sampler 1 [GPU 3], reward stage"]


def test_a_group_that_was_not_placed_is_named_with_the_free_resources():
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["cluster.num_learners=4", "cluster.placement_timeout_s=2"])
    text = unplaced_message(config, group="learners 4 x {CPU: 0.5} PACK",
                            nodes=[Node("ab" * 28, "127.0.0.1", {"CPU": 1.0})])
    assert text.startswith("cluster.layout = 'disaggregated': Ray could not reserve the placement group learners 4 x "
                           "{CPU: 0.5} PACK within cluster.placement_timeout_s = 2 s; free before it was asked for: node "
                           "127.0.0.1 (abababab) {CPU: 1, GPU: 0}. Lower cluster.num_learners")


# ----- presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "layout", "samplers", "learners", "staleness", "samples"), [
    ("sd15_8gpu_colocated.yaml", "colocated", 8, 8, 0, 192),
    ("sd15_8gpu_disaggregated.yaml", "disaggregated", 2, 6, 1, 192),
    ("sd15_multinode.yaml", "colocated", 64, 64, 0, 512),
])
def test_the_placement_presets_load(preset, layout, samplers, learners, staleness, samples):
    path = REPO / "configs" / preset
    config = load_config(path)
    c = config.cluster
    assert (c.layout, c.num_samplers, c.num_learners, c.max_staleness) == (layout, samplers, learners, staleness)
    assert config.samples_per_epoch == EpochWork.from_config(config).samples == samples
    assert config.policy.pretrained == "runwayml/stable-diffusion-v1-5" and "aesthetic" in config.rewards
    head = path.read_text().split("\nname:")[0]
    assert "Hardware:" in head and f"python -m cluster train configs/{preset}" in head
