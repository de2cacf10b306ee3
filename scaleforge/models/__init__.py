"""Recipes. The launcher resolves ``model.recipe`` through ``RECIPES`` (import paths, so that importing
this package stays cheap and one broken recipe cannot break the others)."""
from __future__ import annotations

import difflib
import importlib

RECIPES: dict[str, str] = {
    "llm": "scaleforge.models.llm.recipe:LLMRecipe",
    "sana": "scaleforge.models.sana.recipe:SanaRecipe",
    "nvila": "scaleforge.models.nvila.recipe:NVILARecipe",
    "ps3": "scaleforge.models.ps3.recipe:PS3Recipe",
}


def get_recipe_class(name: str):
    from scaleforge.platform.config import ConfigError

    if name not in RECIPES:
        hint = difflib.get_close_matches(name, list(RECIPES), n=1)
        raise ConfigError(
            f"model.recipe: unknown recipe {name!r}"
            + (f"; did you mean {hint[0]}?" if hint else f" (known: {', '.join(RECIPES)})")
        )
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def recipe_config_class(name: str) -> type:
    return get_recipe_class(name).config_class
