"""Data-parallel learner ranks: the torch.distributed process group and the few collectives of an update.

Pure helpers (no Ray, no config): ``cluster/learner_group.py`` starts the ranks and hands them the address;
``learner.learner.Learner`` and the update rules call the collectives through a ``RankGroup``.

How N ranks reproduce one learner (every rank holds the whole epoch's batch):

- everything that decides *what* is trained is computed on every rank from the same data and the same
  seeded generator (advantages, per-prompt statistics, B² selection, the shuffled (sample, timestep)
  pairs and their split into optimizer steps), so it is identical on all ranks without communication;
- the pairs of each optimizer step are split evenly across ranks (``RankGroup.shard``); each rank
  backpropagates its share with the single learner's weights (a micro-batch of m pairs of a step of C
  pairs contributes ``loss_micro · m / C``), and ``reduce_gradients`` *sums* the ranks' gradients, so the
  result is the single learner's gradient (1/C) Σ_pairs ∇ℓ, up to float summation order;
- that sum happens before unscaling (fp16) and clipping, and it carries the ranks' non-finite-loss
  flags, so every rank clips the same gradient and skips (or takes) the same steps: the optimizer
  states stay identical (an all-reduce gives every rank the same bits);
- ``state_digest`` / ``check_same`` compare the adapter and the optimizer state across ranks, naming the
  ranks that differ (``LearnerDivergedError``).

Every collective waits at most ``timeout_s`` (the run's remote-call timeout); a collective that fails or
times out (a peer died, the network broke) raises ``CollectiveError``: the group is then unusable and
the caller rebuilds it.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import time

import numpy as np
import torch


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a peer rank died or the network broke): the group is broken."""


class LearnerDivergedError(RuntimeError):
    """The learner ranks' adapters or optimizer states differ; names the ranks and the epoch."""


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def collective_timeout_s(call_timeout_s: float) -> float:
    """The bound on the rendezvous and each collective: half the driver's bound on the whole call, so a
    rank blocked by a hung peer fails (and names the collective) while the driver still waits for the call;
    the group is then rebuilt (``cluster/learner_group.py``). Ranks enter each collective within one
    micro-batch of each other, far less than half of any useful call timeout."""
    return 0.5 * float(call_timeout_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (rank 0 binds it for the group's rendezvous right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RankGroup:
    """One rank's view of the learner group. ``RankGroup()`` is the single learner: no process group,
    ``shard`` returns everything and the collectives are never called."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, timeout_s: float = 600.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.comm_s = 0.0  # seconds spent in collectives (time/allreduce_s)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def join(cls, *, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
             device: torch.device | None = None) -> RankGroup:
        """``init_process_group`` over TCP at ``host:port`` (rank 0 listens there), with ``timeout_s`` for the
        rendezvous and every later collective. One group per process: a previous one is destroyed first."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if backend == "nccl" and device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as err:  # noqa: BLE001 - any failed rendezvous means the same: no group
            raise CollectiveError(f"learner rank {rank} of {world_size} could not join the group at {host}:{port} "
                                  f"({backend}, timeout {timeout_s:g} s): {type(err).__name__}: {err}") from err
        return cls(rank=rank, world_size=world_size, timeout_s=timeout_s)

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # ----- work split --------------------------------------------------------------------------
    def shard(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of ``items`` (along the first axis; shares differ by at most one)."""
        if not self.active:
            return items
        return np.array_split(items, self.world_size)[self.rank]

    # ----- collectives -------------------------------------------------------------------------
    def _run(self, what: str, call):
        start = time.perf_counter()
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistError subclasses
            raise CollectiveError(f"learner rank {self.rank} of {self.world_size}: {what} failed or timed out "
                                  f"(timeout {self.timeout_s:g} s): {type(err).__name__}: "
                                  f"{str(err).strip()[:300]}") from err
        finally:
            self.comm_s += time.perf_counter() - start

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place (every rank gets the same bits); returns it."""
        import torch.distributed as dist

        if not self.active:
            return tensor
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._run("all_reduce", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True).wait(timeout))
        return tensor

    def all_gather_object(self, value) -> list:
        """``value`` of every rank, by rank (small picklable values: stats, digests)."""
        import torch.distributed as dist

        if not self.active:
            return [value]
        out: list = [None] * self.world_size
        self._run("all_gather_object", lambda: dist.all_gather_object(out, value))  # bounded by the group timeout
        return out

    def reduce_gradients(self, params: list[torch.nn.Parameter], *, loss_finite: bool) -> bool:
        """Sums the ranks' accumulated gradients (one flat buffer, one all-reduce) and agrees on the step.

        The buffer also carries, per parameter, whether any rank has a gradient for it (a parameter no
        rank touched keeps ``grad = None``, as on a single learner, so AdamW skips it the same way), and
        the count of ranks whose loss was not finite. Returns whether every rank's loss was finite; a
        non-finite gradient anywhere makes the summed gradient non-finite on every rank.
        """
        if not self.active:
            return loss_finite
        device = params[0].device
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float() for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if loss_finite else 1.0],
                             dtype=torch.float32, device=device)
        buffer = self.all_reduce_sum_(torch.cat([*flat, flags]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = buffer[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        for p, present in zip(params, buffer[offset:-1].tolist(), strict=True):
            if present == 0:
                p.grad = None
        return float(buffer[-1]) == 0.0

    def merge_means(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Weighted means over all ranks: Σ_ranks sums[name] / Σ_ranks counts[name] (ranks sum in rank order)."""
        total_sums: dict[str, float] = {}
        total_counts: dict[str, int] = {}
        for rank_sums, rank_counts in self.all_gather_object((sums, counts)):
            for name, value in rank_sums.items():
                total_sums[name] = total_sums.get(name, 0.0) + value
                total_counts[name] = total_counts.get(name, 0) + rank_counts[name]
        return {name: total_sums[name] / total_counts[name] for name in sorted(total_sums)}

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over the ranks, name by name (in rank order)."""
        if not self.active:
            return dict(values)
        total: dict[str, float] = {}
        for rank_values in self.all_gather_object(values):
            for name, value in rank_values.items():
                total[name] = total.get(name, 0.0) + value
        return total

    def check_same(self, digest: str, *, epoch: int, what: str = "adapter and optimizer state") -> None:
        """Raises LearnerDivergedError on every rank when the ranks' digests differ, naming the ranks whose
        digest differs from rank 0's and ``epoch`` (the epochs trained so far)."""
        digests = self.all_gather_object(digest)
        check_digests(digests, epoch=epoch, what=what)


def check_digests(digests: list[str], *, epoch: int, what: str = "adapter and optimizer state") -> None:
    """LearnerDivergedError naming the ranks whose digest differs from rank 0's (None when all agree)."""
    differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differing:
        listed = ", ".join(f"rank {r} ({digests[r][:12]})" for r in differing)
        raise LearnerDivergedError(
            f"the learner ranks disagree after {epoch} epoch(s): the {what} of {listed} differs from rank 0's "
            f"({digests[0][:12]}); the ranks must stay identical (same gradients, same steps). The run stops "
            f"with rank 0's state; check for non-deterministic kernels or a rank that skipped a step, then "
            f"resume (every rank loads the same checkpoint)")


def state_digest(named_params: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of the adapter tensors (by name) and the optimizer's per-parameter state (moments, steps):
    equal on two ranks exactly when their training states are bit-identical."""
    digest = hashlib.sha256()

    def add(tensor: torch.Tensor) -> None:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(str((cpu.dtype, tuple(cpu.shape))).encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, param in named_params:
        digest.update(name.encode())
        add(param)
    for index, (_, param) in enumerate(named_params):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            digest.update(f"{index}.{key}".encode())
            add(value if isinstance(value, torch.Tensor) else torch.tensor(float(value)))
    return digest.hexdigest()
