"""The shipped recipes (`spaceft/recipes/*.yaml`, named without a path: `spaceft run tiny`) and the
accelerate configs (`accelerate/*.yaml`); pyproject.toml ships both in the wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def shipped_recipe(name: str) -> Path | None:
    """The path of the shipped recipe `name` (with or without `.yaml`), or None."""
    stem = name.removesuffix(".yaml")
    if not stem or "/" in stem or "\\" in stem:
        return None
    candidate = resources.files(__name__) / f"{stem}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None
