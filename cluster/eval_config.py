"""The ``evaluation`` section: the fixed evaluation set, the gold rewards it is scored with and the
reward-hacking guard.

Training rewards are what the policy optimizes, so they are the first thing a policy learns to game;
the evaluation set is therefore also scored with *gold* rewards that training never sees (a judge, a
different model), per named prompt set (seen prompts, held-out prompts), and a guard can warn or stop
when the training metric keeps rising while the gold metric keeps falling. YAML::

    evaluation:
      every: 10                      # 0: before the first and after the last update
      prompts: {seen: [a cat, a dog], heldout: [a fox]}   # or a plain list: the set "all"
      prompt_files: {heldout: prompts/heldout.txt}        # appended to that set
      rewards: {jpeg_incompressibility: {quality: 95}}    # parsed like the training rewards
      gold: jpeg_incompressibility   # default: the first evaluation reward
      guard: {action: stop, metric: eval/gold_heldout, patience: 3}

The whole section may change on resume: it decides what is measured, not what is trained.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from cluster.config_rules import NON_NEGATIVE, POSITIVE, ConfigError
from cluster.reward_config import RewardConfig, parse_rewards

SET_NAME = re.compile(r"^[a-z0-9_]+$")
RECALL_REWARDS = ("clip_score",)  # rewards that embed images and texts in one space (CLIP Recall@1)

# Keys of earlier versions -> where they live now (a config that still uses one gets this message).
MOVED_KEYS = {
    "prompts.eval": "prompts.eval moved to evaluation.prompts (a list, or named sets: {seen: [...], heldout: [...]})",
    "prompts.eval_file": "prompts.eval_file moved to evaluation.prompt_files (set name -> prompt file, e.g. "
                         "{all: prompts/eval.txt})",
    "prompts.eval_seed": "prompts.eval_seed moved to evaluation.seed",
    "prompts.eval_images_per_prompt": "prompts.eval_images_per_prompt moved to evaluation.images_per_prompt",
    "logging.eval_every": "logging.eval_every moved to evaluation.every",
}


def check_moved_keys(data: dict) -> None:
    """A ConfigError for the first key of ``data`` (the YAML tree with the overrides applied) that moved
    to the ``evaluation`` section, saying where it lives now."""
    for dotted, message in MOVED_KEYS.items():
        section, key = dotted.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"{message}; rename it in the config file or the override (its value was "
                              f"{node[key]!r})")


def _check_set_name(path: str, name: Any) -> None:
    if not isinstance(name, str) or not SET_NAME.match(name):
        raise ConfigError(f"{path}: set name {name!r} is not an identifier; expected lowercase letters, digits "
                          f"and _ (it becomes part of metric names such as eval/gold_<set>)")


def parse_prompt_sets(raw: Any, path: str) -> dict[str, list[str]]:
    """``evaluation.prompts``: a list (the set "all") or {set name: list of prompts}; None = not given."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        raw = {"all": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} = {raw!r} has the wrong type: expected a list of prompts or a mapping of "
                          f"set name -> list of prompts, e.g. {{seen: [a cat], heldout: [a fox]}}")
    sets = {}
    for name, prompts in raw.items():
        _check_set_name(path, name)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{path}.{name} = {prompts!r} has the wrong type: expected a list of prompt strings")
        sets[name] = list(prompts)
    return sets


def parse_prompt_files(raw: Any, path: str) -> dict[str, str]:
    """``evaluation.prompt_files``: {set name: prompt file}; None = not given."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} = {raw!r} has the wrong type: expected a mapping of set name -> prompt file, "
                          f"e.g. {{heldout: prompts/heldout.txt}}")
    for name, file in raw.items():
        _check_set_name(path, name)
        if not isinstance(file, str) or not file.strip():
            raise ConfigError(f"{path}.{name} = {file!r}: expected the path of a prompt file (one prompt per line)")
    return dict(raw)


def _switch(*options: str):
    """A parser for a setting that may be ``off``: YAML 1.1 reads a bare ``off`` as false, so false is
    "off"; other values are strings (one of ``options`` when given; None stays None without options)."""
    expected = f"one of {list(options)}" if options else "a reward name, or off"

    def parse(raw: Any, path: str) -> str | None:
        if raw is False:
            return "off"
        if raw is None and not options:
            return None
        if not isinstance(raw, str) or (options and raw not in options):
            raise ConfigError(f"{path} = {raw!r} is out of range: expected {expected}")
        return raw

    return parse


def parse_eval_rewards(raw: Any, path: str) -> dict[str, RewardConfig]:
    """``evaluation.rewards``: the same form and checks as the training ``rewards``; None = none."""
    return {} if raw is None else parse_rewards(raw, path)


@dataclass
class HackingGuardConfig:
    """Warns or stops when, over ``patience`` evaluations in a row, ``train_metric`` rose and ``metric``
    (a gold metric) fell: the policy improves what it is trained on and gets worse at what was meant."""

    action: str = field(default="off", metadata={"parse": _switch("off", "warn", "stop")})
    metric: str | None = field(default=None, metadata={"doc": "a gold metric; null: eval/gold_<first set>"})
    train_metric: str = "eval/reward_mean"
    patience: int = field(default=3, metadata=POSITIVE)


@dataclass
class EvaluationConfig:
    every: int = field(default=0, metadata={**NON_NEGATIVE, "doc": "0: before the first and after the last update"})
    seed: int = 1234
    images_per_prompt: int = field(default=2, metadata=POSITIVE)
    # The evaluation images depend on how they are chunked (one seed per chunk): a fixed size keeps them the
    # same for runs whose sampling.batch_size differs (B²'s branch rollouts), so their evaluations pair.
    batch_size: int = field(default=0, metadata={**NON_NEGATIVE, "doc": "images per evaluation chunk, each drawn "
                                                 "from its own fixed seed; 0: sampling.batch_size"})
    # set name -> prompts; empty: {all: the first four distinct training prompts} (cluster/config_loader.py)
    prompts: dict[str, list[str]] = field(default_factory=dict, metadata={"parse": parse_prompt_sets})
    prompt_files: dict[str, str] = field(default_factory=dict, metadata={"parse": parse_prompt_files})
    # the gold rewards: scored in the reward stage on the evaluation images only (weight unused)
    rewards: dict[str, RewardConfig] = field(default_factory=dict, metadata={"parse": parse_eval_rewards})
    gold: str | None = field(default=None, metadata={"doc": "written as eval/gold_<set>; null: the first reward"})
    recall_reward: str | None = field(default=None, metadata={
        "parse": _switch(), "doc": "the clip_score reward (evaluation or training) for eval/recall_at_1/<set>; null: clip_score if "
               "configured, else off; off: no recall metric"})
    guard: HackingGuardConfig = field(default_factory=HackingGuardConfig)
    keep_best: str | None = field(default=None, metadata={
        "doc": "a metric the evaluation writes (e.g. eval/gold_val): the adapter of the evaluation with its "
               "highest value is kept in best_lora/ (cluster/best_adapter.py); read it on a validation draw, "
               "not on the images you report; null: off"})

    @property
    def recall(self) -> str | None:
        """The Recall@1 reward's name, or None (``recall_reward`` off, or not yet defaulted)."""
        return None if self.recall_reward in (None, "off") else self.recall_reward

    def to_yaml(self) -> dict:
        """Plain data in the form the loader reads back (rewards flat, as users write them)."""
        data = dataclasses.asdict(self)
        data["rewards"] = {name: reward.to_yaml() for name, reward in self.rewards.items()}
        return data


def fill_evaluation_defaults(evaluation: EvaluationConfig, *, train_prompts: list[str],
                             train_rewards: dict[str, RewardConfig]) -> None:
    """The defaults that depend on other fields: the set ``all`` of the first four distinct training
    prompts, the gold reward (the first evaluation reward), the recall reward (clip_score where
    configured) and the guard's metric (``eval/gold_<first set>``)."""
    if not evaluation.prompts:
        evaluation.prompts = {"all": list(dict.fromkeys(train_prompts))[:4]}
    if evaluation.gold is None and evaluation.rewards:
        evaluation.gold = next(iter(evaluation.rewards))
    if evaluation.recall_reward is None:
        evaluation.recall_reward = next((r for r in RECALL_REWARDS if r in evaluation.rewards or r in train_rewards),
                                        "off")
    if evaluation.guard.metric is None and evaluation.gold is not None:
        evaluation.guard.metric = f"eval/gold_{next(iter(evaluation.prompts))}"


def eval_metric_names(evaluation: EvaluationConfig, *, train_rewards: dict[str, RewardConfig]) -> list[str]:
    """The scalar metrics every evaluation writes (what the guard may watch); per-group means and the
    standard errors are left out."""
    sets = list(evaluation.prompts)
    names = ["eval/reward_mean", *(f"eval/reward_mean/{s}" for s in sets), *(f"eval/{r}" for r in train_rewards)]
    names += [f"eval/{r}/{s}" for r in evaluation.rewards for s in sets]
    if evaluation.gold is not None:
        names += [f"eval/gold_{s}" for s in sets]
    if evaluation.images_per_prompt >= 2:
        names += [f"eval/diversity/{s}" for s in sets]
    if evaluation.recall is not None:
        names += [f"eval/recall_at_1/{s}" for s in sets]
    return names


def _check_devices(evaluation: EvaluationConfig, *, train_rewards: dict[str, RewardConfig],
                   reward_num_gpus: float) -> None:
    """The gold and recall rewards run in the reward-stage actor: one asking for CUDA needs a GPU there."""
    if reward_num_gpus > 0:
        return
    in_process = {f"evaluation.rewards.{name}": reward for name, reward in evaluation.rewards.items()}
    if evaluation.recall is not None and evaluation.recall not in evaluation.rewards:
        in_process[f"rewards.{evaluation.recall} (the recall reward)"] = train_rewards[evaluation.recall]
    for path, reward in in_process.items():
        device = str(reward.options.get("device", "cpu"))
        if device.startswith("cuda"):
            raise ConfigError(f"{path}.device = {device!r}, but evaluation rewards run in the reward-stage actor, "
                              f"which gets no GPU (cluster.reward_num_gpus = {reward_num_gpus}); set "
                              f"cluster.reward_num_gpus (e.g. 1), the reward's device to cpu, or (for the recall "
                              f"reward) evaluation.recall_reward=off")


def validate_evaluation(evaluation: EvaluationConfig, *, train_rewards: dict[str, RewardConfig],
                        reward_num_gpus: float = 0.0) -> None:
    """The cross-field rules of the section (after the files and defaults): a ConfigError names the
    first violation."""
    for name, prompts in evaluation.prompts.items():
        if not prompts:
            raise ConfigError(f"evaluation.prompts.{name} is empty: give at least one prompt (in "
                              f"evaluation.prompts.{name} or evaluation.prompt_files.{name}), or drop the set")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ConfigError(f"evaluation.prompts.{name}[{i}] is an empty string; every prompt needs text")
    configured = sorted(evaluation.rewards)
    if evaluation.gold is not None and evaluation.gold not in evaluation.rewards:
        raise ConfigError(f"evaluation.gold = {evaluation.gold!r} is not an evaluation reward; expected one of "
                          f"evaluation.rewards {configured} (add it there, or name one of those)")
    recall = evaluation.recall
    if recall is not None and (recall not in RECALL_REWARDS or not (recall in evaluation.rewards or recall in
                                                                    train_rewards)):
        raise ConfigError(f"evaluation.recall_reward = {recall!r}: expected one of {list(RECALL_REWARDS)} configured "
                          f"in evaluation.rewards or rewards (it embeds images and prompts for Recall@1), or "
                          f"off; configured: {sorted({*evaluation.rewards, *train_rewards})}")
    _check_devices(evaluation, train_rewards=train_rewards, reward_num_gpus=reward_num_gpus)
    guard = evaluation.guard
    if guard.action != "off" and not evaluation.rewards:
        raise ConfigError(f"evaluation.guard.action = {guard.action!r} compares a gold metric with the training "
                          f"metric, but evaluation.rewards is empty; add a gold reward (e.g. evaluation.rewards: "
                          f"{{shapes_judge: {{}}}}) or set evaluation.guard.action=off")
    names = eval_metric_names(evaluation, train_rewards=train_rewards)
    for key, value in (("guard.metric", guard.metric), ("guard.train_metric", guard.train_metric),
                       ("keep_best", evaluation.keep_best)):
        if value is not None and value not in names:
            raise ConfigError(f"evaluation.{key} = {value!r} is not a metric the evaluation writes; "
                              f"expected one of {names}")
