"""Reward names -> classes, and construction from config options with clear errors."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from rewards.aesthetic import Aesthetic
from rewards.base import Reward
from rewards.clip_score import ClipScore
from rewards.jpeg import JpegCompressibility, JpegIncompressibility
from rewards.llava_bertscore import LlavaBertScore  # imports vllm/bert_score only when built
from rewards.shapes_judge import ShapesJudge

REWARDS: dict[str, type] = {
    cls.name: cls
    for cls in (JpegCompressibility, JpegIncompressibility, ClipScore, Aesthetic, LlavaBertScore, ShapesJudge)
}


# Constructor arguments that are wiring, not configuration: never read from a config file.
_INTERNAL = {"encoders"}


def _reward_class(name: str) -> type:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {sorted(REWARDS)}")
    return REWARDS[name]


def reward_options(name: str) -> dict[str, Any]:
    """The keyword options reward ``name`` accepts, with defaults (``inspect.Parameter.empty`` if required)."""
    params = inspect.signature(_reward_class(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in _INTERNAL
    }


def reward_option_types(name: str) -> dict[str, Any]:
    """The annotated types of reward ``name``'s options (what the config coerces them to)."""
    cls = _reward_class(name)
    hints = typing.get_type_hints(cls.__init__)
    return {k: v for k, v in hints.items() if k in reward_options(name)}


def check_reward_options(name: str, options: dict[str, Any]) -> None:
    """The reward's own range rules (its ``check_options`` classmethod, where it has one), without building
    it: ValueError naming the option, the value and what was expected."""
    check = getattr(_reward_class(name), "check_options", None)  # optional: most options are names/paths
    if check is not None:
        check(**options)


def build_reward(name: str, *, encoders=None, **options: Any) -> Reward:
    """Constructs reward ``name`` with ``options``; ValueError for an unknown name or option.

    ``encoders``: an ``EncoderCache`` shared by the CLIP-based rewards built in one process.
    """
    valid = reward_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"reward {name!r} got unknown option(s) {unknown}; valid options: {sorted(valid)}")
    missing = sorted(
        k for k, default in valid.items() if default is inspect.Parameter.empty and k not in options
    )
    if missing:
        raise ValueError(f"reward {name!r} needs option(s) {missing}")
    cls = _reward_class(name)
    if encoders is not None and "encoders" in inspect.signature(cls).parameters:
        options = {**options, "encoders": encoders}
    return cls(**options)
