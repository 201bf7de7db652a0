"""Device-safe checkpoint state: what leaves a learner is on the CPU.

A learner on a GPU holds its adapter and AdamW moments in CUDA memory; the driver that receives its
state (usually a CPU-only head node) cannot even deserialize a CUDA tensor. ``to_cpu`` copies every
tensor of a nested state (dicts, lists, tuples) to the CPU, detached, so the state is also a snapshot
that later optimizer steps do not change. ``tensors_not_on_cpu`` lists the offenders by path.
"""

from __future__ import annotations

import torch


def to_cpu(tree):
    """The same nested structure with every tensor replaced by a detached CPU copy."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(value) for value in tree)
    return tree


def tensors_not_on_cpu(tree, path: str = "") -> list[str]:
    """Paths (``optimizer.state.3.exp_avg``) of the tensors in ``tree`` that are not on the CPU."""
    if isinstance(tree, torch.Tensor):
        return [] if tree.device.type == "cpu" else [f"{path or '<root>'} ({tree.device})"]
    if isinstance(tree, dict):
        return [bad for key, value in tree.items() for bad in tensors_not_on_cpu(value, f"{path}.{key}".lstrip("."))]
    if isinstance(tree, (list, tuple)):
        return [bad for i, value in enumerate(tree) for bad in tensors_not_on_cpu(value, f"{path}.{i}".lstrip("."))]
    return []
