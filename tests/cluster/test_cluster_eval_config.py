"""The ``evaluation`` section: prompt sets, gold rewards, recall and guard settings, the moved keys of
earlier versions, and the round trip through a run's config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cluster.config import ConfigError, load_config

torch.set_num_threads(1)

BASE = "prompts:\n  train: [a cat, a dog, a cat, a fox, a bird, a fish]\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, overrides, moved", [
    ("prompts:\n  train: [a]\n  eval: [a cat]\n", [], r"prompts.eval moved to evaluation.prompts \(a list, or named "
                                                     r"sets: \{seen: \[...\], heldout: \[...\]\}\)"),
    ("prompts:\n  train: [a]\n  eval_file: e.txt\n", [], r"prompts.eval_file moved to evaluation.prompt_files"),
    ("prompts:\n  train: [a]\n", ["prompts.eval_seed=3"], r"prompts.eval_seed moved to evaluation.seed"),
    ("prompts:\n  train: [a]\n", ["prompts.eval_images_per_prompt=1"],
     r"prompts.eval_images_per_prompt moved to evaluation.images_per_prompt"),
    ("prompts:\n  train: [a]\nlogging:\n  eval_every: 5\n", [], r"logging.eval_every moved to evaluation.every; "
                                                               r"rename it .*value was 5"),
])
def test_the_keys_of_earlier_versions_say_where_they_moved(tmp_path, text, overrides, moved):
    with pytest.raises(ConfigError, match=moved):
        load_config(_write(tmp_path, text), overrides)


def test_prompt_sets_list_form_named_sets_files_and_the_default(tmp_path):
    default = load_config(_write(tmp_path, BASE)).evaluation
    assert default.prompts == {"all": ["a cat", "a dog", "a fox", "a bird"]}  # the first four distinct
    assert (default.every, default.seed, default.images_per_prompt) == (0, 1234, 2)
    assert (default.rewards, default.gold, default.recall_reward, default.guard.action) == ({}, None, "off", "off")
    listed = load_config(_write(tmp_path, BASE + "evaluation:\n  prompts: [a cow, a pig]\n")).evaluation
    assert listed.prompts == {"all": ["a cow", "a pig"]}
    (tmp_path / "heldout.txt").write_text("a goat\n# a comment\na yak\n")
    named = load_config(_write(tmp_path, BASE + "evaluation:\n  prompts: {seen: [a cat], heldout: [a cow]}\n"
                                                "  prompt_files: {heldout: heldout.txt, extra: heldout.txt}\n")).evaluation
    assert named.prompts == {"seen": ["a cat"], "heldout": ["a cow", "a goat", "a yak"], "extra": ["a goat", "a yak"]}
    assert named.prompt_files == {}  # read into the sets


@pytest.mark.parametrize("text, overrides, pattern", [
    (BASE + "evaluation:\n  prompts: {seen: [a cat], heldout: []}\n", [],
     r"evaluation.prompts.heldout is empty: give at least one prompt"),
    (BASE + "evaluation:\n  prompts: {seen: [a cat, ' ']}\n", [], r"evaluation.prompts.seen\[1\] is an empty string"),
    (BASE + "evaluation:\n  prompts: [a cat, '']\n", [], r"evaluation.prompts.all\[1\] is an empty string"),
    (BASE + "evaluation:\n  prompts: {Held-Out: [a cat]}\n", [],
     r"evaluation.prompts: set name 'Held-Out' is not an identifier; expected lowercase letters, digits and _"),
    (BASE + "evaluation:\n  prompts: {seen: a cat}\n", [], r"evaluation.prompts.seen = 'a cat' has the wrong type"),
    (BASE + "evaluation:\n  prompt_files: {seen: nowhere.txt}\n", [],
     r"evaluation.prompt_files.seen = 'nowhere.txt': no such prompt file"),
    (BASE + "evaluation:\n  rewards: {jpeg: {}}\n", [],
     r"evaluation.rewards.jpeg: unknown reward 'jpeg'; valid rewards: .*'jpeg_incompressibility'"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {quality: 500}}\n", [],
     r"evaluation.rewards.jpeg_incompressibility: jpeg_incompressibility: quality must be an int in \[1, 100\]"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {qual: 5}}\n", [],
     r"evaluation.rewards.jpeg_incompressibility.qual: unknown option .*quality"),
    (BASE + "evaluation:\n  rewards: {shapes_judge: {serve: {replicas: 2}}}\n", [],
     r"evaluation.rewards.shapes_judge.serve: unknown setting\(s\) \['replicas'\]"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {}}\n  gold: shapes_judge\n", [],
     r"evaluation.gold = 'shapes_judge' is not an evaluation reward; expected one of evaluation.rewards "
     r"\['jpeg_incompressibility'\]"),
    (BASE + "evaluation:\n  guard: {action: stop}\n", [],
     r"evaluation.guard.action = 'stop' compares a gold metric .* evaluation.rewards is empty"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {}}\n  guard: {action: warn, metric: eval/gold_heldout}\n",
     [], r"evaluation.guard.metric = 'eval/gold_heldout' is not a metric the evaluation writes; expected one of "
         r"\[.*'eval/jpeg_incompressibility/all', 'eval/gold_all'"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {}}\n", ["evaluation.keep_best=eval/gold_val"],
     r"evaluation.keep_best = 'eval/gold_val' is not a metric the evaluation writes; expected one of "
     r"\[.*'eval/gold_all'"),
    (BASE + "evaluation:\n  rewards: {jpeg_incompressibility: {}}\n", ["evaluation.guard.train_metric=reward/mean"],
     r"evaluation.guard.train_metric = 'reward/mean' is not a metric the evaluation writes"),
    (BASE, ["evaluation.guard.action=always"], r"evaluation.guard.action = 'always' is out of range: expected one of "
                                              r"\['off', 'warn', 'stop'\]"),
    (BASE, ["evaluation.guard.patience=0"], r"evaluation.guard.patience = 0 is out of range: expected > 0"),
    (BASE, ["evaluation.images_per_prompt=0"], r"evaluation.images_per_prompt = 0 is out of range: expected > 0"),
    (BASE, ["evaluation.every=-1"], r"evaluation.every = -1 is out of range: expected >= 0"),
    (BASE, ["evaluation.recall_reward=aesthetic"], r"evaluation.recall_reward = 'aesthetic': expected one of "
                                                   r"\['clip_score'\] configured in evaluation.rewards or rewards"),
    (BASE, ["evaluation.recall_reward=clip_score"], r"evaluation.recall_reward = 'clip_score': expected one of"),
    (BASE + "evaluation:\n  rewards: {clip_score: {device: cuda}}\n", [],
     r"evaluation.rewards.clip_score.device = 'cuda', but evaluation rewards run in the reward-stage actor, which "
     r"gets no GPU \(cluster.reward_num_gpus = 0.0\)"),
    (BASE + "rewards:\n  clip_score: {device: cuda}\n", [],
     r"rewards.clip_score \(the recall reward\).device = 'cuda'.*evaluation.recall_reward=off"),
    (BASE + "evaluation:\n  oops: 1\n", [], r"unknown config key\(s\) \['evaluation.oops'\] in evaluation"),
])
def test_bad_evaluation_settings_give_a_clear_error(tmp_path, text, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text), overrides)


def test_gold_recall_and_guard_metric_defaults(tmp_path):
    text = (BASE + "rewards:\n  clip_score: {model: 'tiny:clip'}\nevaluation:\n  prompts: {seen: [a cat], heldout: [a cow]}\n"
            "  rewards: {shapes_judge: {mode: partial}, jpeg_incompressibility: {}}\n  guard: {action: warn}\n")
    e = load_config(_write(tmp_path, text)).evaluation
    assert (e.gold, e.recall_reward, e.recall) == ("shapes_judge", "clip_score", "clip_score")  # recall: training
    assert (e.guard.metric, e.guard.train_metric, e.guard.patience) == ("eval/gold_seen", "eval/reward_mean", 3)
    assert e.rewards["shapes_judge"].options == {"mode": "partial"}
    # A bare YAML `off` (read as false) is "off"; a cuda clip for recall is fine with a GPU on the stage.
    off = load_config(_write(tmp_path, text + "  recall_reward: off\n"), ["evaluation.guard.action=off"]).evaluation
    assert (off.recall_reward, off.recall, off.guard.action) == ("off", None, "off")
    on_gpu = load_config(_write(tmp_path, BASE + "rewards:\n  clip_score: {device: cuda}\n"), ["cluster.reward_num_gpus=1"])
    assert on_gpu.evaluation.recall == "clip_score"


def test_the_evaluation_round_trips_through_the_run_config_and_may_change_on_resume(tmp_path):
    from cluster.checkpoint import config_differences, is_resume_safe

    text = (BASE + "evaluation:\n  every: 2\n  seed: 7\n  images_per_prompt: 3\n  prompts: {seen: [a cat], heldout: [a cow]}\n"
            "  rewards: {jpeg_incompressibility: {quality: 80, weight: 2}, shapes_judge: {}}\n"
            "  gold: jpeg_incompressibility\n  guard: {action: stop, metric: eval/shapes_judge/heldout, patience: 2}\n")
    config = load_config(_write(tmp_path, text))
    data = config.to_dict()
    assert data["evaluation"]["rewards"]["jpeg_incompressibility"] == {
        "weight": 2.0, "quality": 80, "serve": data["evaluation"]["rewards"]["shapes_judge"]["serve"]}  # flat form
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_config(dumped).evaluation == config.evaluation
    assert load_config(dumped).to_dict() == data
    assert all(is_resume_safe(k) for k in ("evaluation.every", "evaluation.prompts", "evaluation.guard.action",
                                           "evaluation.rewards.shapes_judge.mode"))
    # A checkpoint written before the section existed (its eval keys in prompts and logging) still resumes.
    old = {**data, "prompts": {**data["prompts"], "eval": ["a cat"], "eval_file": None, "eval_seed": 1234,
                               "eval_images_per_prompt": 2},
           "logging": {**data["logging"], "eval_every": 0}}
    del old["evaluation"]
    assert config_differences(old, data) == []


def test_evaluation_chunks_follow_evaluation_batch_size_whatever_the_sampling_batch_size(tmp_path):
    from actors.seeding import eval_seed
    from cluster.evaluation import eval_jobs

    text = BASE + "evaluation:\n  prompts: {seen: [a cat, a dog, a fox]}\n  images_per_prompt: 3\n"
    default = load_config(_write(tmp_path, text), ["sampling.batch_size=4"])
    # 0 (the default): chunks of sampling.batch_size; 9 images -> 4 + 4 + 1, seeds 0, 1, 2 of evaluation.seed
    jobs = eval_jobs(default, num_samplers=2)
    assert [len(job.prompts) for job in jobs] == [4, 4, 1] and [job.worker for job in jobs] == [0, 1, 0]
    assert [job.seed for job in jobs] == [eval_seed(1234, chunk=k) for k in range(3)]
    # a fixed evaluation.batch_size gives the same chunks and seeds for two sampling batch sizes: the same images
    fixed = [eval_jobs(load_config(_write(tmp_path, text), [f"sampling.batch_size={b}", "evaluation.batch_size=6"]),
                       num_samplers=2) for b in (4, 16)]
    for jobs in fixed:
        assert [(job.prompts, job.seed) for job in jobs] == [
            (["a cat"] * 3 + ["a dog"] * 3, eval_seed(1234, chunk=0)), (["a fox"] * 3, eval_seed(1234, chunk=1))]
    with pytest.raises(ConfigError, match=r"evaluation.batch_size"):
        load_config(_write(tmp_path, text), ["evaluation.batch_size=-1"])
