"""The typed ``rewards`` section: one ``RewardConfig`` per reward (its weight, its Serve deployment and
the options its model is built with), parsed and checked from the YAML mapping.

YAML keeps the flat form users write::

    rewards:
      clip_score: {weight: 1.0, model: ViT-H-14, serve: {max_replicas: 4}}

``weight`` and ``serve`` are gard's; every other key is an option of the reward's constructor
(``rewards/registry.py``), checked by name against the constructor's signature, by type against its
annotations and by range against the reward's own ``check_options``, so a bad option fails before Ray
starts with the reward, the option and the valid values named.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.config_rules import ConfigError
from rewards.serve_options import ServeOptions

RESERVED = ("weight", "serve")  # gard's keys in a reward's mapping; the rest are the model's options


@dataclass
class RewardConfig:
    """One entry of ``rewards``: ``weight`` scales its score in the total, ``serve`` places it when
    ``reward_service.backend: serve`` (resume-safe: it does not change what is computed), ``options``
    are the keyword arguments its class is built with (only the ones the config gave)."""

    weight: float = 1.0
    serve: ServeOptions = field(default_factory=ServeOptions, metadata={"resume_safe": True})  # config.RESUMABLE
    options: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> dict:
        """The flat mapping ``parse_reward`` reads back (what a run's config.yaml holds)."""
        return {"weight": self.weight, **self.options, "serve": asdict(self.serve)}


def _error(message: str):
    return ConfigError(message)


def _coerce(path: str, value: Any, tp) -> Any:
    from cluster.config_loader import coerce_value  # the loader imports the config module, which imports this

    return coerce_value(path, value, tp)


def parse_serve(name: str, raw: Any, *, path: str | None = None) -> ServeOptions:
    """``rewards.<name>.serve`` (or ``path``) -> ServeOptions, each setting checked against its type and rule."""
    path = path or f"rewards.{name}.serve"
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _error(f"{path} must be a mapping of deployment settings, got {raw!r}")
    hints = typing.get_type_hints(ServeOptions)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise _error(f"{path}: unknown setting(s) {unknown}; valid settings: {sorted(hints)}")
    values = {k: _coerce(f"{path}.{k}", v, hints[k]) for k, v in raw.items()}
    try:
        return ServeOptions(**values)
    except ValueError as err:
        raise _error(f"{path}: {err}") from None


def _parse_options(name: str, raw: dict, *, path: str) -> dict[str, Any]:
    from rewards.registry import check_reward_options, reward_option_types, reward_options

    valid = reward_options(name)
    types = reward_option_types(name)
    options = {}
    for key, value in raw.items():
        if key not in valid:
            raise _error(f"{path}.{key}: unknown option for reward {name!r}; valid options: "
                         f"{sorted([*RESERVED, *valid])}")
        options[key] = _coerce(f"{path}.{key}", value, types[key]) if key in types else value
    try:
        check_reward_options(name, options)
    except ValueError as err:
        raise _error(f"{path}: {err}") from None
    return options


def parse_reward(name: str, raw: Any, *, path: str | None = None) -> RewardConfig:
    """One reward's YAML mapping (None = all defaults) -> RewardConfig; errors name ``path`` (default
    ``rewards.<name>``)."""
    from rewards.registry import REWARDS

    path = path or f"rewards.{name}"
    if name not in REWARDS:
        raise _error(f"{path}: unknown reward {name!r}; valid rewards: {sorted(REWARDS)}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise _error(f"{path} must be a mapping such as {{weight: 1.0}}, got {raw!r}")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise _error(f"{path}.weight = {weight!r} has the wrong type: expected a number")
    if not math.isfinite(weight):
        raise _error(f"{path}.weight = {weight!r} is not a finite number")
    options = _parse_options(name, {k: v for k, v in raw.items() if k not in RESERVED}, path=path)
    return RewardConfig(weight=float(weight), serve=parse_serve(name, raw.get("serve"), path=f"{path}.serve"),
                        options=options)


def parse_rewards(raw: Any, path: str = "rewards") -> dict[str, RewardConfig]:
    """The ``rewards`` mapping -> {name: RewardConfig}; an already parsed entry is kept as it is."""
    if not isinstance(raw, dict):
        raise _error(f"{path} must be a mapping of reward name -> settings, e.g. {{jpeg_compressibility: "
                     f"{{weight: 1.0}}}}, got {raw!r}")
    return {name: value if isinstance(value, RewardConfig) else parse_reward(name, value, path=f"{path}.{name}")
            for name, value in raw.items()}


def default_rewards() -> dict[str, RewardConfig]:
    return {"jpeg_compressibility": RewardConfig()}

