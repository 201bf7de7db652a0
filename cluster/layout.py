"""Where the samplers and learner ranks of a run go: the layout rules and the placement groups they
need, as pure functions of the ``cluster`` section and the nodes' free resources (no Ray here;
``cluster/placement_groups.py`` creates the groups).

Layouts (``cluster.layout``):

- ``disaggregated``: samplers and learner ranks on resources of their own. The learner ranks form one
  placement group of ``num_learners`` bundles ``{learner_num_cpus, learner_num_gpus}``: STRICT_PACK when
  one node has room for all of them (their gradient all-reduce then stays inside the node), else PACK (as
  few nodes as possible). The samplers form another of ``num_samplers`` bundles, SPREAD over the nodes
  (they sample independently; spreading them spreads the reward traffic and the weight broadcast).
- ``colocated``: one bundle per device holding sampler i and learner rank i, ``{sampler + learner CPUs,
  sampler + learner share of one GPU}``, STRICT_PACK when one node has room for every bundle, else PACK;
  sampler i and rank i both take bundle i, so they share its node and its GPU. With ``max_staleness: 0``
  they take turns on it, as ddpo-pytorch's processes do on every GPU. The share is in (0.5, 1]: no two
  bundles fit on one GPU, so no GPU holds two learner ranks (NCCL needs one rank per GPU), and the rest of
  a GPU (e.g. 0.1 of it with 0.45 + 0.45) can hold the reward stage or a reward replica.

The reward stage and the Serve replicas are not in a placement group: Ray places them as any actor. A
bundle needs a non-zero resource, so a role that asks for none (0 CPUs and 0 GPUs) gets no group and its
actors are placed by Ray alone (``Slot`` None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.config_rules import ConfigError

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

STRICT_PACK, PACK, SPREAD = "STRICT_PACK", "PACK", "SPREAD"
RESOURCES = ("CPU", "GPU")


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: its name (``learners``, ``samplers`` or ``colocated``), bundles and strategy."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str

    def describe(self) -> str:
        """'learners 2 x {CPU: 0.5} STRICT_PACK' (bundles of several shapes are listed with their counts)."""
        shapes: dict[str, int] = {}
        for b in self.bundles:
            key = "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"
            shapes[key] = shapes.get(key, 0) + 1
        return f"{self.name} " + " + ".join(f"{n} x {shape}" for shape, n in shapes.items()) + f" {self.strategy}"


@dataclass(frozen=True)
class Slot:
    """The bundle an actor takes: the group's name and the bundle's index in it."""

    group: str
    bundle: int


@dataclass(frozen=True)
class LayoutPlan:
    """The groups of a layout, and the slot of every sampler and learner rank (None: no group)."""

    layout: str
    groups: tuple[GroupPlan, ...]
    samplers: tuple[Slot | None, ...]
    learners: tuple[Slot | None, ...]

    def describe(self) -> str:
        groups = "; ".join(g.describe() for g in self.groups) or "no placement groups (no actor asks for resources)"
        return f"{self.layout}: {groups}"


def bundle(*, cpus: float, gpus: float) -> dict[str, float]:
    """A bundle of ``cpus`` and ``gpus`` (zero amounts left out; Ray counts resources in 1e-4 units)."""
    return {k: round(v, 4) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def total(bundles) -> dict[str, float]:
    """The resources of ``bundles`` summed."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = round(out.get(k, 0.0) + v, 4)
    return out


def fits_on_one_node(bundles, *, nodes: list[dict[str, float]]) -> bool:
    """Whether one node's free resources (``nodes``: one mapping per node) hold every bundle at once."""
    need = total(bundles)
    return any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes)


def pack_strategy(bundles, *, nodes: list[dict[str, float]]) -> str:
    """STRICT_PACK when one node has room for all ``bundles``, else PACK (as few nodes as possible; a
    cluster that autoscales may add nodes later, which STRICT_PACK could wait for forever)."""
    return STRICT_PACK if fits_on_one_node(bundles, nodes=nodes) else PACK


def colocated_gpu_share(c: ClusterConfig) -> float:
    """The GPU share of one colocated bundle (sampler + learner rank), 0 on CPUs."""
    return c.sampler_num_gpus + c.learner_num_gpus


def plan_layout(c: ClusterConfig, *, nodes: list[dict[str, float]]) -> LayoutPlan:
    """The placement groups of ``c.layout`` for the nodes' free resources (see the module docstring).

    Colocated bundles beyond the learner count (``gard eval`` starts one learner) hold a sampler only."""
    groups: list[GroupPlan] = []
    if c.layout == "colocated":
        pairs = max(c.num_samplers, c.num_learners)
        bundles = tuple(bundle(cpus=(c.sampler_num_cpus if i < c.num_samplers else 0)
                               + (c.learner_num_cpus if i < c.num_learners else 0),
                               gpus=(c.sampler_num_gpus if i < c.num_samplers else 0)
                               + (c.learner_num_gpus if i < c.num_learners else 0)) for i in range(pairs))
        placed = all(bundles)
        if placed:
            groups.append(GroupPlan("colocated", bundles, pack_strategy(bundles, nodes=nodes)))
        slot = (lambda i: Slot("colocated", i)) if placed else (lambda i: None)
        return LayoutPlan(c.layout, tuple(groups), tuple(slot(i) for i in range(c.num_samplers)),
                          tuple(slot(i) for i in range(c.num_learners)))
    learner = bundle(cpus=c.learner_num_cpus, gpus=c.learner_num_gpus)
    sampler = bundle(cpus=c.sampler_num_cpus, gpus=c.sampler_num_gpus)
    if learner:
        learners = (learner,) * c.num_learners
        groups.append(GroupPlan("learners", learners, pack_strategy(learners, nodes=nodes)))
    if sampler:
        groups.append(GroupPlan("samplers", (sampler,) * c.num_samplers, SPREAD))
    return LayoutPlan(c.layout, tuple(groups),
                      tuple(Slot("samplers", i) if sampler else None for i in range(c.num_samplers)),
                      tuple(Slot("learners", i) if learner else None for i in range(c.num_learners)))


def describe_layout(c: ClusterConfig) -> str:
    """The banner's layout line, from the config alone (the strategies depend on the nodes)."""
    if c.layout == "colocated":
        return (f"colocated: {c.num_samplers} bundles of (sampler + learner rank) = "
                f"{c.sampler_num_cpus + c.learner_num_cpus:g} CPU, {colocated_gpu_share(c):g} GPU, packed")
    return (f"disaggregated: {c.num_learners} learner bundle(s) packed, {c.num_samplers} sampler bundle(s) spread; "
            f"max_staleness {c.max_staleness}")


def validate_layout(c: ClusterConfig) -> None:
    """The rules of ``cluster.layout`` and of learner ranks on GPUs (a ConfigError names the first broken one)."""
    if c.layout == "colocated":
        if c.num_samplers != c.num_learners:
            raise ConfigError(f"cluster.layout = 'colocated' pairs sampler i with learner rank i on one device, but "
                              f"cluster.num_samplers = {c.num_samplers} and cluster.num_learners = {c.num_learners}; "
                              f"set both to the number of devices, or cluster.layout=disaggregated")
        if (c.sampler_num_gpus > 0) != (c.learner_num_gpus > 0):
            raise ConfigError(f"cluster.layout = 'colocated' puts sampler i and learner rank i on one device, but "
                              f"cluster.sampler_num_gpus = {c.sampler_num_gpus:g} and cluster.learner_num_gpus = "
                              f"{c.learner_num_gpus:g}; give both a share of the GPU (e.g. 0.45 each) or neither")
        share = colocated_gpu_share(c)
        if share > 0 and not 0.5 < share <= 1:
            raise ConfigError(f"cluster.layout = 'colocated': cluster.sampler_num_gpus + cluster.learner_num_gpus = "
                              f"{c.sampler_num_gpus:g} + {c.learner_num_gpus:g} = {share:g}, expected more than 0.5 and "
                              f"at most 1: the pair's bundle takes that share of one GPU, and no two bundles may fit on "
                              f"one GPU (NCCL needs one learner rank per GPU); e.g. 0.45 + 0.45 (the rest of each GPU "
                              f"can hold the reward stage or a reward replica)")
    elif c.num_learners > 1 and 0 < c.learner_num_gpus < 1:
        raise ConfigError(f"cluster.num_learners = {c.num_learners} with cluster.learner_num_gpus = "
                          f"{c.learner_num_gpus}: learner ranks on GPUs form an NCCL group, which needs one whole GPU "
                          f"per rank; set cluster.learner_num_gpus=1 (or 0 for CPU ranks), cluster.num_learners=1, or "
                          f"cluster.layout=colocated (a sampler and one rank share each GPU)")
