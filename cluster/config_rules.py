"""The building blocks of the config sections: the user-error type and the field rules (range checks,
choices, the resume-safe mark), shared by ``cluster/config.py`` and the sections kept in their own
modules (``cluster/eval_config.py``), which the config tree imports."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the config: printed as one paragraph, exit code 2, no traceback."""


def _rule(check, text: str, **extra) -> dict:
    return {"check": check, "rule": text, **extra}


POSITIVE = _rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = _rule(lambda v: v >= 0, ">= 0")
FRACTION = _rule(lambda v: 0 < v <= 1, "in (0, 1]")

RESUMABLE = {"resume_safe": True}  # may change when a run is resumed (see config.resume_safe_fields)


def choice(*options: str) -> dict:
    return _rule(lambda v: v in options, f"one of {list(options)}")
