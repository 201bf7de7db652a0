"""Config tree: loading, overrides, and one clear error per kind of bad input (CLI exit code 2)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_config
from rewards.serve_options import ServeOptions

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "prompts:\n  train: [a cat, a dog]\n"


def test_demo_config_loads_with_overrides():
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["epochs=2", "seed=3", "train.learning_rate=1e-3",
                                                          "rewards.jpeg_compressibility.weight=2"])
    assert config.epochs == 2 and config.seed == 3
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.rewards["jpeg_compressibility"].weight == 2
    assert config.samples_per_epoch == config.cluster.num_samplers * config.sampling.batches_per_sampler * 8


def test_every_preset_is_valid():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        load_config(preset)


@pytest.mark.parametrize(
    "text, overrides, pattern",
    [
        (BASE + "epochz: 3\n", [], r"unknown config key\(s\) \['epochz'\].*valid keys: .*'epochs'"),
        (BASE + "train:\n  lr: 1\n", [], r"\['train.lr'\] in train; valid keys: .*learning_rate"),
        (BASE, ["epochs=two"], r"epochs = 'two' has the wrong type: expected int"),
        (BASE, ["sampling.num_steps=-5"], r"sampling.num_steps = -5 is out of range: expected > 0"),
        (BASE, ["sampling.eta=0"], r"sampling.eta = 0.0 is out of range: expected > 0 \(training needs stochastic"),
        (BASE, ["train.clip_range=0"], r"train.clip_range = 0.0 is out of range: expected > 0"),
        (BASE, ["train.algorithm=trpo"], r"train.algorithm = 'trpo' is out of range: expected one of \['ppo', 'pg', 'dpo', 'diffusion_dpo', 'rwr'\]"),
        (BASE, ["sampling.resolution=60"], r"sampling.resolution = 60 .* multiple of 8"),
        (BASE, ["cluster.max_staleness=3"], r"cluster.max_staleness = 3 .*0 \(synchronous\) or 1"),
        (BASE, ["checkpoint.keep_last=0"], r"checkpoint.keep_last = 0 is out of range: expected > 0"),
        (BASE, ["checkpoint.every_epochs=-1"], r"checkpoint.every_epochs = -1 is out of range: expected >= 0"),
        (BASE, ["cluster.max_sampler_failures=0"], r"cluster.max_sampler_failures = 0 is out of range: expected > 0"),
        (BASE, ["cluster.num_learners=0"], r"cluster.num_learners = 0 is out of range: expected > 0"),
        (BASE, ["cluster.num_learners=two"], r"cluster.num_learners = 'two' has the wrong type: expected int"),
        (BASE, ["cluster.learner_check_every=-1"], r"cluster.learner_check_every = -1 is out of range: expected >= 0"),
        (BASE, ["cluster.num_learners=2", "cluster.learner_num_gpus=0.5"],
         r"cluster.num_learners = 2 with cluster.learner_num_gpus = 0.5: .* one whole GPU per rank"),
        (BASE, ["reward_service.down_timeout_s=-1"], r"reward_service.down_timeout_s = -1.0 is out of range"),
        (BASE, ["reward_service.max_request_pixels=0"], r"reward_service.max_request_pixels = 0 is out of range"),
        (BASE, ["reward_service.max_aspect_ratio=0.5"], r"reward_service.max_aspect_ratio = 0.5 .*expected >= 1"),
        (BASE, ["reward_service.max_inflight_images=8"], r"reward_service: max_inflight_images = 8 is below "
                                                         r"max_batch = 256: a request of max_batch images could never"),
        (BASE, ["reward_service.max_request_pixels=100"], r"reward_service: max_request_pixels = 100 is below "
                                                          r"max_image_pixels = 4194304"),
        ("prompts:\n  train: []\n", [], r"prompts.train is empty"),
        ("prompts:\n  train: ['a', '  ']\n", [], r"prompts.train\[1\] is an empty string"),
        ("prompts:\n  train: [a]\n  train_file: nowhere.txt\n", [], r"prompts.train_file = 'nowhere.txt': no such prompt file"),
        (BASE + "epochs: 2\nseed: 1\nepochs: 3\n", [], r"duplicate key 'epochs' at line 5 \(first at line 3\) in '.*c.yaml'"),
        (BASE + "train:\n  learning_rate: 1e-3\n  learning_rate: 1e-2\n", [], r"duplicate key 'learning_rate' at line 5"),
        (BASE, ["train.learning_rate=.inf"], r"train.learning_rate = inf is not a finite number"),
        (BASE, ["sampling.guidance_scale=.nan"], r"sampling.guidance_scale = nan is not a finite number"),
        (BASE + "rewards:\n  jpeg_compressibility: {weight: .nan}\n", [], r"rewards.jpeg_compressibility.weight = nan is not a finite"),
        (BASE + "rewards:\n  jpeg: {weight: 1}\n", [], r"unknown reward 'jpeg'; valid rewards: .*jpeg_compressibility"),
        (BASE + "rewards:\n  jpeg_compressibility: {weight: x}\n", [], r"rewards.jpeg_compressibility.weight = 'x'"),
        (BASE + "rewards:\n  jpeg_compressibility: {qual: 3}\n", [], r"rewards.jpeg_compressibility.qual: unknown option.*quality"),
        (BASE + "rewards: {}\n", [], r"rewards is empty"),
        (BASE + "rewards: [jpeg_compressibility]\n", [], r"rewards must be a mapping of reward name -> settings"),
        (BASE + "rewards:\n  jpeg_compressibility: {quality: 500}\n", [],
         r"rewards.jpeg_compressibility: jpeg_compressibility: quality must be an int in \[1, 100\].*500"),
        (BASE + "rewards:\n  jpeg_compressibility: {quality: high}\n", [],
         r"rewards.jpeg_compressibility.quality = 'high' has the wrong type: expected int"),
        (BASE + "rewards:\n  clip_score: {seed: 1.5}\n", [], r"rewards.clip_score.seed = 1.5 has the wrong type"),
        (BASE + "rewards:\n  shapes_judge: {mode: lenient}\n", [], r"shapes_judge: mode must be one of \['correct', 'partial', 'overlap'\]"),
        (BASE + "rewards:\n  llava_bertscore: {max_tokens: 0}\n", [], r"llava_bertscore: max_tokens must be an int >= 1"),
        (BASE + "rewards:\n  llava_bertscore: {gpu_memory_utilization: 1.5}\n", [],
         r"gpu_memory_utilization must be in \(0, 1\]"),
        (BASE, ["volume.gamma=0.5"], r"volume.gamma = 0.5 needs text and image embeddings"),
        (BASE, ["b2.enabled=true", "sampling.num_steps=10", "b2.tau_start=7", "b2.tau_end=10", "b2.share_start=false"],
         r"b2.share_start = false needs branch rollouts from x_T at every stage .*sampling.num_steps = 10\); got "
         r"branching = True, tau 7 -> 10"),
        (BASE, ["train.algorithm=dpo", "train.target_kl=0.01"],
         r"train.target_kl = 0.01 stops PPO/PG steps by their approx_kl, but train.algorithm = 'dpo' has none"),
        (BASE, ["train.target_kl=0"], r"train.target_kl = 0.0 is out of range: expected > 0"),
        (BASE, ["train.step_range=[2, 2]"],
         r"train.step_range = \[2, 2\]: expected \[first, last\] with 0 <= first < last <= sampling.num_steps = "),
        (BASE, ["train.step_range=[0, 99]"], r"train.step_range = \[0, 99\]: expected \[first, last\]"),
        (BASE, ["train.step_range=[0.5, 2]"], r"train.step_range\[0\] = 0.5 has the wrong type: expected int"),
        (BASE, ["train.step_range=[0, 1, 2]"], r"train.step_range = \[0, 1, 2\]: expected \[first, last\]"),
        (BASE, ["train.step_range=[0, 2]", "train.algorithm=rwr"],
         r"train.step_range = \[0, 2\] picks sampled transitions to train, but train.algorithm = 'rwr'"),
        (BASE, ["train.step_range=[0, 2]", "b2.enabled=true"],
         r"train.step_range = \[0, 2\] fixes the trained steps, but b2.enabled = true"),
        (BASE, ["b2.neg_threshold=0.2"], r"b2.neg_threshold = 0.2 is out of range: expected <= 0"),
        (BASE, ["rewards.jpeg_compressibility.serve.pad_batches=3"],
         r"rewards.jpeg_compressibility.serve.pad_batches = 3 has the wrong type: expected bool, got int"),
        (BASE, ["b2.selection=top"],
         r"b2.selection = 'top' is out of range: expected one of \['contrastive', 'all'\]"),
        (BASE, ["train.advantage=group"],
         r"train.advantage = 'group' is out of range: expected one of \['per_prompt', 'per_group', 'batch'\]"),
        (BASE, ["b2.enabled=true", "b2.selection=all", "train.algorithm=dpo"],
         r"b2.selection = 'all' trains every leaf .* train.algorithm = 'dpo'"),
        (BASE, ["epochs"], r"override 'epochs' is not of the form key=value"),
        (BASE, ["policy.lora_targets=to_q"], r"policy.lora_targets = 'to_q' has the wrong type: expected a list"),
        (BASE, ["policy.train_targets=[vae]"], r"policy.train_targets = \['vae'\]: expected a non-empty list .*'unet', 'text_encoder'"),
        (BASE, ["policy.train_targets=[]"], r"policy.train_targets = \[\]: expected a non-empty list"),
        (BASE, ["policy.init_adapter=no/dir"], r"policy.init_adapter = 'no/dir': no pytorch_lora_weights.safetensors"),
        (BASE, ["logging.wandb_mode=cloud"],
         r"logging.wandb_mode = 'cloud' is out of range: expected one of \['offline', 'online', 'disabled'\]"),
        (BASE, ["logging.wandb=maybe"], r"logging.wandb = 'maybe' has the wrong type: expected bool"),
        (BASE, ["logging.wandb_project=' '"], r"logging.wandb_project = ' ' is out of range: expected a non-empty name"),
    ],
)
def test_bad_config_gives_a_clear_error(tmp_path, text, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text), overrides)


def test_wandb_logging_is_off_by_default_offline_when_on_and_may_change_on_resume(tmp_path):
    from cluster.checkpoint import is_resume_safe

    default = load_config(_write(tmp_path, BASE)).logging
    assert (default.wandb, default.wandb_project, default.wandb_mode) == (False, "gard", "offline")
    on = load_config(_write(tmp_path, BASE), ["logging.wandb=true", "logging.wandb_project=shapes",
                                              "logging.wandb_mode=online"]).logging
    assert (on.wandb, on.wandb_project, on.wandb_mode) == (True, "shapes", "online")
    assert all(is_resume_safe(f"logging.{name}") for name in ("wandb", "wandb_project", "wandb_mode"))


def test_prompt_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n# a comment\na dog\n")
    config = load_config(_write(tmp_path, "prompts:\n  train_file: prompts.txt\n"))
    assert config.prompts.train == ["a cat", "a dog"]
    assert config.evaluation.prompts == {"all": ["a cat", "a dog"]}  # defaults to the first training prompts


def test_prompt_and_config_files_must_be_utf8_text_with_prompts(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=r"prompts.train_file = 'empty.txt': '.*empty.txt' holds no prompts"):
        load_config(_write(tmp_path, "prompts:\n  train_file: empty.txt\n"))
    (tmp_path / "latin1.txt").write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"prompts.train_file file '.*latin1.txt' is not UTF-8 text \(byte 5"):
        load_config(_write(tmp_path, "prompts:\n  train_file: latin1.txt\n"))
    (tmp_path / "bad.yaml").write_bytes(b"prompts:\n  train: [caf\xe9]\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not UTF-8 text"):
        load_config(tmp_path / "bad.yaml")


def test_resume_from_a_path_that_is_not_a_checkpoint_exits_2(tmp_path):
    config = _write(tmp_path, BASE)
    for target, reason in ((tmp_path / "missing", "no such checkpoint or run directory"),
                           (tmp_path, "is not a complete gard checkpoint: not a directory named epoch-NNNNNN")):
        proc = _gard("train", str(config), "--resume", str(target), f"cache_dir={tmp_path / 'cache'}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--resume {target}: " in proc.stderr and reason in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'no/such.yaml' does not exist"):
        load_config("no/such.yaml")


def _gard(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_help_and_config_errors_exit_2_without_traceback(tmp_path):
    help_run = _gard("--help")
    assert help_run.returncode == 0 and "train" in help_run.stdout
    train_help = _gard("train", "--help")
    assert train_help.returncode == 0 and "--output-dir" in train_help.stdout
    bad = _gard("train", str(_write(tmp_path, BASE)), "train.clip_range=-1")
    assert bad.returncode == 2
    assert "config error: train.clip_range = -1.0 is out of range" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = _gard("train", "missing.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_reward_serve_settings_are_validated(tmp_path):
    config = load_config(_write(tmp_path, BASE + "rewards:\n  jpeg_compressibility: {serve: {max_replicas: 3}}\n"))
    assert config.rewards["jpeg_compressibility"].serve == ServeOptions(max_replicas=3)
    with pytest.raises(ConfigError, match=r"rewards.jpeg_compressibility.serve: unknown setting\(s\) \['replicas'\]"):
        load_config(_write(tmp_path, BASE + "rewards:\n  jpeg_compressibility: {serve: {replicas: 3}}\n"))
    with pytest.raises(ConfigError, match=r"min_replicas=3, max_replicas=2"):
        load_config(_write(tmp_path, BASE + "rewards:\n  jpeg_compressibility: {serve: {min_replicas: 3, max_replicas: 2}}\n"))
    with pytest.raises(ConfigError, match=r"reward_service.backend = 'grpc' is out of range"):
        load_config(_write(tmp_path, BASE), ["reward_service.backend=grpc"])


def test_reward_config_is_typed_and_round_trips_through_the_run_config(tmp_path):
    text = BASE + "rewards:\n  jpeg_compressibility: {weight: 2, quality: 80, serve: {max_replicas: 3}}\n  clip_score:\n" \
        + "evaluation:\n  rewards: {jpeg_incompressibility: {quality: 70}}\n"
    config = load_config(_write(tmp_path, text))
    jpeg, clip = config.rewards["jpeg_compressibility"], config.rewards["clip_score"]
    assert (jpeg.weight, jpeg.options, jpeg.serve.max_replicas) == (2.0, {"quality": 80}, 3)
    assert (clip.weight, clip.options, clip.serve) == (1.0, {}, ServeOptions())  # empty mapping = defaults
    # The run directory's config.yaml (to_dict) holds the flat form users write, and loads back equal.
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load_config(dumped).rewards == config.rewards
    assert config.to_dict()["rewards"]["jpeg_compressibility"]["quality"] == 80
    # The gold rewards of the evaluation section keep the same flat form.
    assert load_config(dumped).evaluation == config.evaluation
    assert config.to_dict()["evaluation"]["rewards"]["jpeg_incompressibility"]["quality"] == 70


def test_volume_modalities_are_validated(tmp_path):
    text = BASE + "rewards:\n  clip_score: {model: 'tiny:clip'}\n"
    with pytest.raises(ConfigError, match=r"expected k >= 2 distinct names"):
        load_config(_write(tmp_path, text), ["volume.modalities=[text, audio]"])
    with pytest.raises(ConfigError, match=r"'caption' modality embeds llava_bertscore's captions"):
        load_config(_write(tmp_path, text), ["volume.modalities=[text, image, caption]"])


def test_cli_accepts_overrides_after_options(tmp_path):
    bad = _gard("train", str(_write(tmp_path, BASE)), "--output-dir", str(tmp_path / "r"), "train.clip_range=-1")
    assert bad.returncode == 2 and "train.clip_range = -1.0 is out of range" in bad.stderr
    stray = _gard("train", str(_write(tmp_path, BASE)), "--bogus")
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr


def test_actor_specs_are_built_from_the_config_sections_field_by_field():
    """Every spec field has one source: the config field of the same name (or an explicit cross-section
    setting), so a default, a type and a rule live in the config only."""
    import dataclasses

    from actors.policy import PolicySpec
    from cluster.config import PolicyConfig, SamplingConfig, TrainConfig
    from cluster.specs import learner_spec, policy_spec
    from learner.spec import LearnerSpec

    from_sections = {f.name for c in (PolicyConfig, SamplingConfig) for f in dataclasses.fields(c)}
    assert {f.name for f in dataclasses.fields(PolicySpec)} <= from_sections  # pretrained: resolved (tiny:sd -> dir)
    explicit = {"max_staleness", "seed", "bpt", "b2_threshold", "b2_neg_threshold", "b2_history_epochs", "b2_selection",
                "dpo_beta",
                "dpo_denoise_beta", "dpo_noise_draws", "rwr_weighting", "rwr_temperature", "rwr_noise_draws"}
    assert {f.name for f in dataclasses.fields(LearnerSpec)} - {f.name for f in dataclasses.fields(TrainConfig)} \
        == explicit

    config = load_config(None, ["prompts.train=[a cat]", "policy.lora_rank=7", "sampling.timestep_spacing=trailing",
                                "train.learning_rate=0.5", "train.mixed_precision=bf16", "cluster.max_staleness=1",
                                "dpo.beta=7.0", "dpo.noise_draws=3", "rwr.weighting=exponential",
                                "rwr.temperature=0.25"])
    policy = policy_spec(config, pretrained="/models/x", num_gpus=1)
    assert (policy.lora_rank, policy.timestep_spacing, policy.device, policy.pretrained) == (7, "trailing", "cuda",
                                                                                            "/models/x")
    assert isinstance(policy.lora_targets, tuple)
    learner = learner_spec(config)
    assert (learner.learning_rate, learner.mixed_precision, learner.max_staleness) == (0.5, "bf16", 1)
    assert (learner.dpo_denoise_beta, learner.dpo_noise_draws) == (7.0, 3)
    assert (learner.rwr_weighting, learner.rwr_temperature, learner.rwr_noise_draws) == ("exponential", 0.25, 2)


def test_make_demo_trains_a_held_out_combination_judged_on_every_prompt_set():
    """`make demo`'s preset (README, "The default job"): every training prompt asks for a kind the UNet never
    saw, and the judge scores the training prompts, all held-out prompts and all seen prompts, none of the
    seen ones with a held-out kind."""
    from testbed.judge import parse_caption
    from testbed.world import HELD_OUT

    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    preset = next(word for word in recipe.split() if word.startswith("configs/"))
    config = load_config(REPO / preset)
    assert config.policy.pretrained == "tiny:shapes" and "clip_score" in config.rewards
    assert config.evaluation.gold == "shapes_judge"
    for prompt in config.prompts.train:
        assert set(parse_caption(prompt).kinds) & HELD_OUT, prompt
    sets = config.evaluation.prompts
    assert sets["heldout"] == config.prompts.train  # every prompt with a held-out kind, all caption families
    assert set(sets["yellow"]) < set(config.prompts.train)  # the yellow squares: a subset, also shown apart
    assert all(set(parse_caption(p).kinds) & HELD_OUT for p in sets["heldout"]) and len(sets["heldout"]) == 12
    assert not any(set(parse_caption(p).kinds) & HELD_OUT for p in sets["seen"]) and len(sets["seen"]) == 18
    assert config.evaluation.every == config.epochs  # one evaluation before, one after: the printed gains


def test_the_ddpo_preset_is_judged_on_the_demos_images():
    """configs/shapes_ddpo_yellow.yaml is the yellow preset's DDPO counterpart (BENCHMARKS, "DDPO on the yellow
    squares"): its gains are paired against the same base images as the yellow preset's (and `make demo`'s)
    only if it trains the same prompts from the same pipeline and reward, and samples and evaluates exactly as
    the yellow preset does; only the method and the number of samples per epoch differ."""
    yellow = load_config(REPO / "configs" / "shapes_dpo_yellow.yaml")
    ddpo = load_config(REPO / "configs" / "shapes_ddpo_yellow.yaml")
    assert (yellow.train.algorithm, ddpo.train.algorithm) == ("diffusion_dpo", "ppo")
    assert ddpo.prompts.train == yellow.prompts.train and ddpo.policy == yellow.policy
    assert ddpo.rewards == yellow.rewards and ddpo.evaluation == yellow.evaluation
    assert (ddpo.seed, ddpo.epochs) == (yellow.seed, yellow.epochs)
    differing = {f.name for f in dataclasses.fields(yellow.sampling)
                 if getattr(yellow.sampling, f.name) != getattr(ddpo.sampling, f.name)}
    assert differing == {"batches_per_sampler"}
    assert ddpo.sampling.batches_per_sampler > yellow.sampling.batches_per_sampler  # a less noisy DDPO gradient


def test_the_heldout_ddpo_preset_is_the_yellow_ddpo_preset_on_the_twelve_heldout_prompts():
    """configs/shapes_ddpo_heldout.yaml is the DDPO preset (PPO, 256 samples per epoch) trained on the 12
    held-out prompts of configs/shapes_dpo_heldout.yaml (Diffusion-DPO) for 30 epochs: paired against the same
    base images as both only if the method's settings are the yellow DDPO preset's and the evaluation is the
    Diffusion-DPO job's; the length (chosen on the validation draw), the evaluation period and the number of
    learner ranks (the same update up to float summation order) may differ."""
    dpo = load_config(REPO / "configs" / "shapes_dpo_heldout.yaml")
    yellow = load_config(REPO / "configs" / "shapes_ddpo_yellow.yaml")
    ddpo = load_config(REPO / "configs" / "shapes_ddpo_heldout.yaml")
    assert ddpo.prompts.train == dpo.prompts.train and len(ddpo.prompts.train) == 12
    for section in ("policy", "sampling", "train", "rewards"):
        assert getattr(ddpo, section) == getattr(yellow, section), section
    learners = {"num_learners": yellow.cluster.num_learners, "learner_num_cpus": yellow.cluster.learner_num_cpus}
    assert dataclasses.replace(ddpo.cluster, **learners) == yellow.cluster
    assert (ddpo.cluster.num_learners, yellow.cluster.num_learners) == (2, 1)
    assert ddpo.train.algorithm == "ppo" and ddpo.seed == dpo.seed == 0
    assert (ddpo.epochs, ddpo.evaluation.every) == (30, 30)  # one evaluation before training, one after
    assert dataclasses.replace(ddpo.evaluation, every=dpo.evaluation.every) == dpo.evaluation


def test_the_b2_preset_is_the_ddpo_preset_on_groups_that_share_x_T():
    """configs/shapes_b2_yellow.yaml (BENCHMARKS, "DDPO on the yellow squares") is the DDPO preset's PPO on
    B²-DiffuRL's branch groups: its gain against DDPO's says what the groups and the selection add only if
    the PPO settings, the samples per epoch, the prompts, pipeline, reward and the evaluation images are the
    same; the leaves of a group share x_T alone (tau = T from the first epoch), and it evaluates before and
    after training only, on the demo's images."""
    yellow = load_config(REPO / "configs" / "shapes_dpo_yellow.yaml")
    ddpo = load_config(REPO / "configs" / "shapes_ddpo_yellow.yaml")
    b2 = load_config(REPO / "configs" / "shapes_b2_yellow.yaml")
    assert b2.train == ddpo.train and not ddpo.b2.enabled and b2.b2.enabled
    assert b2.b2.tau_start == b2.b2.tau_end == b2.sampling.num_steps and b2.b2.num_stages == 1
    assert b2.b2.history_epochs >= b2.epochs - 1  # z-scores over every epoch of the run (its header says why)
    assert b2.prompts.train == yellow.prompts.train and b2.policy == yellow.policy and b2.rewards == yellow.rewards
    assert b2.cluster.num_samplers == ddpo.cluster.num_samplers
    samples = (b2.sampling.batch_size * b2.b2.n_branch * b2.sampling.batches_per_sampler
               == ddpo.sampling.batch_size * ddpo.sampling.batches_per_sampler)
    assert samples  # per sampler and epoch: 4 prompts x 4 leaves x 8 batches = 16 prompts x 8 batches
    differing = {f.name for f in dataclasses.fields(yellow.sampling)
                 if getattr(yellow.sampling, f.name) != getattr(b2.sampling, f.name)}
    assert differing == {"batch_size", "batches_per_sampler"}
    assert b2.evaluation.every == b2.epochs  # one evaluation before training, one after
    assert dataclasses.replace(b2.evaluation, every=yellow.evaluation.every) == yellow.evaluation


def test_the_yellow_preset_is_the_demo_trained_on_the_three_yellow_square_prompts_only():
    """configs/shapes_dpo_yellow.yaml (the default job until 2026-12-03; BENCHMARKS, "The default job") is
    `make demo`'s job (configs/shapes_dpo_heldout.yaml) trained on 3 of its 12 prompts, the yellow squares,
    for 10 epochs instead of 30 (each length chosen on a validation draw): the two are compared on the same
    base images only if nothing else differs. The DDPO and B² presets are paired against the yellow preset,
    so against the demo's images too."""
    heldout = load_config(REPO / "configs" / "shapes_dpo_heldout.yaml")
    yellow = load_config(REPO / "configs" / "shapes_dpo_yellow.yaml")
    assert heldout.prompts.train == yellow.evaluation.prompts["heldout"] and len(heldout.prompts.train) == 12
    assert yellow.prompts.train == yellow.evaluation.prompts["yellow"]
    assert set(yellow.prompts.train) < set(heldout.prompts.train)
    for section in ("policy", "sampling", "train", "dpo", "rewards", "cluster"):
        assert getattr(heldout, section) == getattr(yellow, section), section
    assert dataclasses.replace(heldout.evaluation, every=yellow.evaluation.every) == yellow.evaluation
    assert (heldout.seed, heldout.epochs, yellow.epochs) == (yellow.seed, 30, 10)
    assert (heldout.evaluation.every, yellow.evaluation.every) == (30, 10)  # each: before and after only
