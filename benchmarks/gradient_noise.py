"""How noisy is each estimator's gradient? The cosine between the LoRA gradients of independent batches.

At the base shapes pipeline (`configs/shapes_ddpo.yaml`'s policy and sampling), for one prompt: B batches
of N samples (fixed seeds), each scored by a reward and turned into advantages A = (r − mean) / std
within the batch. Two gradients per batch:
  score function (DDPO, and the trajectory form of online DPO):  ∇ mean_i A_i Σ_t log p_θ(x_{t−1} | x_t)
  denoising (the denoising form of Diffusion-DPO, diffusion_dpo): ∇ mean_i A_i ‖ε − ε_θ(x_t(x0_i, ε), t)‖²
      with K draws of (t ~ U{0..999}, ε) per sample.
If g_b = μ + noise_b, the mean cosine between two batches' gradients is about |μ|² / (|μ|² + σ²/N): near
0 when a batch's gradient is mostly noise. The score-function cosine is also reported per group of
denoising steps (which steps carry the reward's signal).

Usage: python benchmarks/gradient_noise.py [--prompt "three green circles"] [--reward judge|clip]
       [--batches 6] [--batch-size 32] [--draws 8]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def mean_pairwise_cosine(vectors: torch.Tensor) -> tuple[float, float]:
    """Mean cosine over distinct pairs of rows of [B, P], with its standard error (pairs share rows, so the
    error counts B/2 independent pairs)."""
    unit = torch.nn.functional.normalize(vectors, dim=1)
    cos = unit @ unit.T
    off = cos[~torch.eye(len(vectors), dtype=torch.bool)]
    return float(off.mean()), float(off.std() / np.sqrt(len(vectors) / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="three green circles")
    parser.add_argument("--reward", choices=["judge", "clip"], default="judge")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from actors.policy import Policy
    from actors.sampler import Sampler
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import policy_spec
    from learner.transitions import TransitionBatch, transition_log_prob
    from rewards.clip_score import ClipScore
    from rewards.shapes_judge import ShapesJudge
    from rewards.tiny import shapes_clip_options

    config = load_config("configs/shapes_ddpo.yaml", [])
    spec = policy_spec(config, pretrained=resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir),
                       num_gpus=0)
    sampler, policy = Sampler(spec=spec), Policy(spec)
    judge = ShapesJudge(mode="correct")
    reward = judge if args.reward == "judge" else ClipScore(**shapes_clip_options())
    params = [p for _, p in policy.named_trainable_parameters()]

    def flat_grad() -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in params]).clone()

    score_grads, denoise_grads, accuracy = [], [], []
    n, prompts = args.batch_size, [args.prompt] * args.batch_size
    for b in range(args.batches):
        trajectory, images = sampler.sample(prompts=prompts, seed=1000 + b)
        r = np.asarray(reward(images.images, images.prompts).scores, dtype=np.float64)
        accuracy.append(float(judge(images.images, images.prompts).scores.mean()))
        adv = torch.tensor((r - r.mean()) / (r.std() + 1e-6), dtype=torch.float32)
        batch = TransitionBatch.from_trajectory(policy, trajectory)
        per_step = []
        for j in range(trajectory.latents.shape[1] - 1):
            for p in params:
                p.grad = None
            log_prob = transition_log_prob(policy, batch, torch.arange(n), torch.full((n,), j))[0]
            (-(adv * log_prob).mean()).backward()
            per_step.append(flat_grad())
        score_grads.append(torch.stack(per_step))
        for p in params:
            p.grad = None
        x0 = torch.from_numpy(trajectory.latents[:, -1]).float()
        embeds = batch.embeds
        generator = torch.Generator().manual_seed(77 + b)
        for _ in range(args.draws):
            t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (n,), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            pred = policy.unet(policy.scheduler.add_noise(x0, eps, t), t, embeds).sample.float()
            ((adv * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean() / args.draws).backward()
        denoise_grads.append(flat_grad())
        print(f"batch {b}: judge accuracy {accuracy[-1]:.3f}, reward {r.mean():.4f}", flush=True)

    score = torch.stack(score_grads)  # [B, T, P]
    steps = score.shape[1]
    third = max(1, steps // 3)
    groups = {"all steps": range(steps), "first third": range(third), "middle": range(third, steps - third),
              "last third": range(steps - third, steps)}
    result = {"prompt": args.prompt, "reward": args.reward, "batches": args.batches, "batch_size": n,
              "judge_accuracy": float(np.mean(accuracy)), "denoising_draws": args.draws,
              "score_function": {name: mean_pairwise_cosine(score[:, list(s)].sum(1)) for name, s in groups.items()},
              "denoising": mean_pairwise_cosine(torch.stack(denoise_grads))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
