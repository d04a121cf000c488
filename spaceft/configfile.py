"""Reading a run configuration: YAML recipes (with `base:` inheritance) and dotted command-line
overrides, checked against the dataclasses of `spaceft.config` field by field.

Values are converted only where that is lossless (an int where a float is wanted, a YAML 1.1 "5e-7"
string to a float); anything else is an error naming the key, and an unknown key is an error that names
the nearest key of its section.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from spaceft.config import RunConfig
from spaceft.losses import LossType

log = logging.getLogger(__name__)


class _SettingsLoader(yaml.SafeLoader):
    """YAML as a person types a setting: only true and false are booleans. YAML 1.1 also reads yes, no,
    on and off as booleans, which would turn `train.mixed_precision: no` and
    `eval.lm_eval_chat_template: off` into False; here they stay strings, and a boolean setting still
    accepts them (`_coerce`)."""


_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
BOOL_WORDS = {"yes": True, "y": True, "on": True, "no": False, "n": False, "off": False}
"""YAML 1.1's other spellings of a boolean, read as one where a setting is a boolean."""


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SettingsLoader)  # a SafeLoader: builds plain data only


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-07-26 as a date
            return value.isoformat()
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if tp is LossType:
        try:
            return LossType(value)
        except ValueError:
            choices = ", ".join(t.value for t in LossType)
            raise ValueError(f"{key}: unknown loss {value!r}; choose one of {choices}") from None
    return value


RENAMED: dict[str, tuple[str, Any, typing.Callable[[Any], Any]]] = {
    "train.chunked_logps": ("logps_path", bool, lambda chunked: "chunked" if chunked else "logits"),
}
"""Keys read under a newer name, with a warning: old key -> (new key in the same section, the old key's
type, the old value's new one). Recipes and runs' recorded configs written before the rename keep working."""


def _renamed(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`data` with its section's old keys (`RENAMED`) replaced by their new ones."""
    for old_key, (new_key, tp, convert) in RENAMED.items():
        section, _, name = old_key.rpartition(".")
        if f"{section}." != prefix or name not in data:
            continue
        if new_key in data:
            raise ValueError(f"{old_key} and {prefix}{new_key} are both set: keep only {prefix}{new_key}")
        value = convert(_coerce(data[name], tp, old_key))
        log.warning("%s is deprecated: read as %s%s=%s; set that instead", old_key, prefix, new_key, value)
        data = {(new_key if k == name else k): (value if k == name else v) for k, v in data.items()}
    return data


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    data = _renamed(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key '{prefix}{key}'{_suggest(cls, str(key), prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"invalid config: {e}") from None


# Names that other trainers use for a spaceft key, so a typo of them still finds the right key.
SYNONYMS = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "max_length": "max_new_tokens",
    "model_name_or_path": "name",
    "dataset": "train",
    "output": "output_dir",
}


def _suggest(cls: type, key: str, prefix: str) -> str:
    """' (did you mean 'train.lr'?)' for the nearest key of the same section, or ''."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    sections = [name for name in names if dataclasses.is_dataclass(hints[name])]
    if not prefix:  # a section key given without its section: `lr=1e-7` for `train.lr=1e-7`
        for name in sections:
            inner = {f.name for f in dataclasses.fields(hints[name])}
            exact = key if key in inner else SYNONYMS.get(key)
            if exact in inner:
                return f" (did you mean '{name}.{exact}'?)"
    candidates = {name: name for name in names}
    candidates.update({alias: name for alias, name in SYNONYMS.items() if name in names})
    close = difflib.get_close_matches(key.lower(), list(candidates), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{candidates[close[0]]}'?)"
    for name in sections if not prefix else []:
        found = _suggest(hints[name], key, f"{name}.")
        if found:
            return found
    return ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-7", "model.name=x"] into a nested dict."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = _read_yaml(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data)


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; a top-level `base: other.yaml` (relative to this file) is read first and
    this recipe's keys are merged over it, so a variant states only what it changes."""
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    if path.resolve() in _seen:
        raise ValueError(f"{path}: recipe 'base' chain loops back to itself")
    try:
        data = _read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # path:line:column, as editors read it
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: 'base' must name a recipe file or a shipped recipe, got {base!r}")
    base_path = path.parent / (base if base.endswith((".yaml", ".yml")) else f"{base}.yaml")
    if not base_path.is_file():
        from spaceft.recipes import shipped_recipe, shipped_recipe_names

        shipped = shipped_recipe(base)
        if shipped is None:
            raise FileNotFoundError(
                f"{path}: base recipe {base!r} is neither a file next to it ({base_path}) nor a shipped "
                f"recipe ({', '.join(shipped_recipe_names())})"
            )
        base_path = shipped
    return _merge(read_recipe(base_path, (*_seen, path.resolve())), data)


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (a path, or the name of a shipped one such as `demo`; or none), apply dotted
    overrides and validate."""
    data = read_recipe(_recipe_path(recipe)) if recipe is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def _recipe_path(recipe: str | Path) -> Path:
    """A file that exists wins; otherwise a shipped recipe of that name (as `spaceft run demo`)."""
    from spaceft.recipes import shipped_recipe

    path = Path(recipe)
    if path.exists():
        return path
    return shipped_recipe(str(recipe)) or path  # read_recipe names the missing file
