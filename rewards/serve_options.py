"""Per-reward Ray Serve deployment settings (config: ``rewards.<name>.serve``): a plain dataclass, so the
config tree can hold it without importing Ray Serve."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeOptions:
    """Per-reward deployment settings (config: ``rewards.<name>.serve``)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    # Every call of a batch-shape-sensitive reward (CLIP-based) gets max_batch_size rows (the last item
    # repeated), so an item's score does not depend on how the queue happened to batch it: torch's CPU
    # kernels take other paths for small batches (the shapes CLIP's scores of batches of 1-4 differ from
    # larger ones in the last bit), which made two runs of one config differ with timing. Costs compute
    # only when batches are not full.
    pad_batches: bool = True
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    # How often handles and replicas report queue lengths, and the window the autoscaler averages over
    # (Ray's defaults); short values react faster at the price of more controller traffic.
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    max_ongoing_requests: int | None = None  # default: enough requests in flight to fill a batch
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    health_check_period_s: float = 10.0
    group: str | None = None  # rewards with the same group share one replica (and their CLIP encoders)

    def __post_init__(self):
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"serve replicas must satisfy 0 <= min_replicas <= max_replicas >= 1, got "
                             f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"serve.max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                             f"{self.max_batch_size}, {self.batch_wait_timeout_s}")
        if self.metrics_interval_s <= 0 or self.look_back_period_s <= 0:
            raise ValueError(f"serve.metrics_interval_s and serve.look_back_period_s must be > 0, got "
                             f"{self.metrics_interval_s}, {self.look_back_period_s}")
