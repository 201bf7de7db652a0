"""Make PyPI's CUDA build of torchvision importable beside the CPU build of torch 2.13.0.

Why: torchvision 0.28.0 is the only release for torch 2.13.0 and PyPI ships it as a CUDA build.
Its ``_C`` extension fails to load against ``torch 2.13.0+cpu``, and the import then dies with
``operator torchvision::nms does not exist``. Defining the two op schemas before
torchvision is imported lets its Python parts (transforms, models) import and work; only the
detection ops stay unusable, and gard uses none of them.

How: ``make setup`` copies this file into the venv's site-packages together with a one-line
``.pth`` file *only when* ``import torchvision`` fails there. The ``.pth`` installs a meta-path hook
that costs nothing until the first ``import torchvision`` in any process (tests, Ray workers, vLLM
subprocesses), and then registers the schemas only if the real extension cannot be loaded. On a
normal GPU install the setup never installs it, so it is a no-op there.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_LIBRARY = None  # keeps the torch.library.Library alive (schemas vanish when it is collected)


def _register_missing_schemas() -> None:
    global _LIBRARY
    import glob
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for so in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(so)
            return  # the real extension works: nothing to do
        except (OSError, RuntimeError):
            break
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _register_missing_schemas()
        return None  # the regular finders do the import


def install() -> None:
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
