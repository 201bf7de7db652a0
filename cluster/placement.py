"""Will the run fit? The CPUs and GPUs every actor and reward replica of a run asks for, checked against
what the Ray cluster has free before anything is started.

Ray and Serve queue an actor or replica that no node can hold and wait (Serve only warns in its own log
every 30 s), so a run that cannot be placed would make no progress and say nothing. On a cluster this
driver started itself (nothing can be added to it) a shortfall is a ConfigError naming the resource,
the amount asked with its parts and the amount free; on a cluster it joined (which may autoscale) it
is a warning.
"""

from __future__ import annotations

from cluster.config import Config, ConfigError
from cluster.specs import reward_stage_resources

RESOURCES = ("CPU", "GPU")


def resource_demands(config: Config, *, running_apps: set[str] = frozenset()) -> list[tuple[str, float, float]]:
    """(what, CPUs, GPUs) of every actor and of the reward replicas not running yet."""
    c = config.cluster
    serve = config.reward_service.backend == "serve"
    demands = [(f"sampler {i}", c.sampler_num_cpus, c.sampler_num_gpus) for i in range(c.num_samplers)]
    if c.num_learners == 1:
        demands.append(("learner", c.learner_num_cpus, c.learner_num_gpus))
    else:
        demands.extend((f"learner rank {i}", c.learner_num_cpus, c.learner_num_gpus) for i in range(c.num_learners))
    # With Serve the stage mostly waits on handles (0.1 CPU; a GPU only for evaluation models on CUDA).
    demands.append(("reward stage", *reward_stage_resources(config)))
    if serve:
        from rewards.serve import app_name

        placed_groups: set[str] = set()
        for name, reward in config.rewards.items():
            s = reward.serve
            if app_name(name) in running_apps or (s.group is not None and s.group in placed_groups):
                continue  # running already, or served by its group's shared replica
            if s.group is not None:
                placed_groups.add(s.group)
            replicas = max(1, s.initial_replicas if s.initial_replicas is not None else s.min_replicas)
            demands.append((f"rewards.{name} ({replicas} replica(s))", replicas * s.num_cpus, replicas * s.num_gpus))
    return demands


def placement_problem(demands: list[tuple[str, float, float]], available: dict[str, float]) -> str | None:
    """The first resource whose total demand exceeds what is free, said in one paragraph; None if all fit."""
    for index, resource in enumerate(RESOURCES):
        parts = [(what, amounts[index]) for what, *amounts in demands if amounts[index] > 0]
        asked = sum(amount for _, amount in parts)
        free = float(available.get(resource, 0.0))
        if asked > free + 1e-9:
            listed = ", ".join(f"{what} {amount:g}" for what, amount in parts)
            return (f"the run asks for {asked:g} {resource} ({listed}) but the Ray cluster has {free:g} free; "
                    f"lower cluster.*_num_{resource.lower()}s or rewards.<name>.serve.num_{resource.lower()}s, use "
                    f"fewer samplers or learner ranks (cluster.num_samplers, cluster.num_learners), or give Ray "
                    f"more (cluster.local_num_cpus, a larger cluster)")
    return None


def learner_problem(config: Config, available: dict[str, float]) -> str | None:
    """With several learner ranks: the paragraph saying the ranks alone do not fit what is free (None if
    they do), naming ``cluster.num_learners``, the resources they require and those available."""
    c = config.cluster
    if c.layout == "colocated" and c.learner_num_gpus > 0:
        # Each (sampler, rank) bundle takes more than half of one GPU: n bundles need n whole GPUs.
        free = int(float(available.get("GPU", 0.0)) + 1e-9)
        if c.num_learners > free:
            return (f"cluster.layout = 'colocated' with cluster.num_learners = {c.num_learners}: every learner rank "
                    f"and its sampler take one GPU (cluster.sampler_num_gpus + cluster.learner_num_gpus = "
                    f"{c.sampler_num_gpus + c.learner_num_gpus:g} of it), so {c.num_learners} GPUs are required, but "
                    f"the Ray cluster has {free} GPU(s) available; lower cluster.num_samplers and "
                    f"cluster.num_learners to at most {free}, or give Ray more GPUs")
    if c.num_learners == 1:
        return None
    for resource, each, field in (("CPU", c.learner_num_cpus, "learner_num_cpus"),
                                  ("GPU", c.learner_num_gpus, "learner_num_gpus")):
        required, free = c.num_learners * each, float(available.get(resource, 0.0))
        if required > free + 1e-9:
            return (f"cluster.num_learners = {c.num_learners}: {c.num_learners} learner ranks x {each:g} {resource} "
                    f"(cluster.{field}) = {required:g} {resource} required, but the Ray cluster has {free:g} "
                    f"{resource} available; lower cluster.num_learners (at most {int(free // each + 1e-9)} fit) or "
                    f"cluster.{field}, or give Ray more (cluster.local_num_cpus, a larger cluster)")
    return None


def check_placement(config: Config, *, strict: bool, log=print) -> None:
    """Compares the run's demands with ``ray.available_resources()``: ConfigError when ``strict`` (a
    cluster this process started), else a warning. Learner ranks that alone cannot fit are named first."""
    import ray

    running: set[str] = set()
    if config.reward_service.backend == "serve":
        from rewards.serve import running_apps

        running = set(running_apps())
    available = ray.available_resources()
    problem = learner_problem(config, available) or placement_problem(
        resource_demands(config, running_apps=running), available)
    if problem is None:
        return
    if strict:
        raise ConfigError(problem)
    log(f"gard: warning: {problem} (waiting for the cluster to grow)")
