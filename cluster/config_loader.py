"""Building the config tree: YAML (duplicate keys refused) + ``key=value`` overrides, type coercion with
the fields' rules, the file step (prompt files, the init adapter) and derived defaults; then the pure
``cluster.config.validate``. Errors are ConfigErrors naming the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cluster.config import Config, ConfigError, validate
from cluster.eval_config import check_moved_keys, fill_evaluation_defaults


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce_value(path: str, value: Any, tp) -> Any:
    """Checks ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(path, value, inner[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} = {value!r} has the wrong type: expected a list of {_type_name(item_tp)}")
        return [coerce_value(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r} has the wrong type: expected a mapping")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} = {value!r} is not a finite number: every numeric setting must be finite")
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{path} = {value!r} has the wrong type: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown config key(s) {[f'{prefix}.{k}'.lstrip('.') for k in unknown]} in {where}; "
                          f"valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}".lstrip(".")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, path)
            continue
        if "parse" in fields[name].metadata:  # a section with its own parser (rewards)
            kwargs[name] = fields[name].metadata["parse"](value, path)
            continue
        value = coerce_value(path, value, tp)
        rule = fields[name].metadata
        if value is not None and "check" in rule and not rule["check"](value):
            expected = rule["rule"]() if callable(rule["rule"]) else rule["rule"]
            raise ConfigError(f"{path} = {value!r} is out of range: expected {expected}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}=... descends into {key!r}, which is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (dotted key, YAML-parsed value)."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. epochs=2 or train.learning_rate=1e-3)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return parsed


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML (or starts from the defaults when ``path`` is None), applies overrides, validates."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (pass a YAML file such as configs/jpeg_demo.yaml)")
        try:
            loader = _UniqueKeyLoader(_read_text(path, "config file"))
            loader.name = str(path)
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    check_moved_keys(data)
    config = _build(Config, data, "")
    resolve_files(config, base_dir=path.parent if path is not None else Path("."))
    fill_defaults(config)
    validate(config)
    return config


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                          f"UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                                  f"{seen[key] + 1}) in {self.name!r}: a repeated key would silently override the "
                                  f"first; keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompt file's text: one per line, blank lines and # comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _read_prompt_file(field_path: str, file: str, base_dir: Path) -> list[str]:
    candidates = [Path(file), base_dir / file]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"{field_path} = {file!r}: no such prompt file (one prompt per line expected)")
    text = _read_text(found, f"{field_path} file")
    prompts = prompt_lines(text)
    if not prompts:
        raise ConfigError(f"{field_path} = {file!r}: {str(found)!r} holds no prompts (one prompt per line; "
                          f"blank lines and # comments are skipped)")
    return prompts


def resolve_files(config: Config, *, base_dir: Path) -> None:
    """The loader's file step (the only I/O of building a config): reads prompt files into the prompt
    lists and makes ``policy.init_adapter`` an absolute path to an existing diffusers LoRA directory.
    Relative paths are looked up as given, then next to the config file."""
    p = config.prompts
    if p.train_file:
        p.train = p.train + _read_prompt_file("prompts.train_file", p.train_file, base_dir)
        p.train_file = None
    evaluation = config.evaluation
    for name, file in evaluation.prompt_files.items():  # appended to the set, which they may create
        prompts = _read_prompt_file(f"evaluation.prompt_files.{name}", file, base_dir)
        evaluation.prompts[name] = evaluation.prompts.get(name, []) + prompts
    evaluation.prompt_files = {}
    pol = config.policy
    if pol.init_adapter is not None:
        adapter = Path(pol.init_adapter)
        if not adapter.is_absolute():
            adapter = base_dir / adapter if (base_dir / adapter).exists() else adapter
        if not (adapter / "pytorch_lora_weights.safetensors").is_file():
            raise ConfigError(f"policy.init_adapter = {pol.init_adapter!r}: no pytorch_lora_weights.safetensors "
                              f"there; expected a diffusers LoRA directory (a run's lora/ or gard fuse-lora output)")
        pol.init_adapter = str(adapter.resolve())


def fill_defaults(config: Config) -> None:
    """Defaults that depend on other fields: the evaluation set (the first four distinct training
    prompts), its gold and recall rewards and the guard's metric (``cluster/eval_config.py``)."""
    fill_evaluation_defaults(config.evaluation, train_prompts=config.prompts.train, train_rewards=config.rewards)
