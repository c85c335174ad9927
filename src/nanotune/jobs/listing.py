"""`nanotune models` and `nanotune recipes`: the presets (and whether each one's weights are on
this machine), the packaged recipes."""

from __future__ import annotations

from nanotune.jobs.config import ModelsCommand, RecipesCommand
from nanotune.models import DEFAULT_MODEL, PRESETS
from nanotune.recipes import list_recipes, recipe_text
from nanotune.weights.resolve import package_installed


def offline(preset) -> bool:
    """Whether the preset's weights are on this machine now (package or hub cache); no network."""
    if package_installed(preset):  # a chunked package counts before its first assembly
        return True
    if preset.hub_id:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(preset.hub_id, "config.json"), str)
    return False


def models_command(c: ModelsCommand) -> int:
    """One line a preset: its family (HF model_type), context length, description, where its
    weights come from, and whether they are on this machine now."""
    rows = [("preset", "family", "context", "description", "source", "offline")]
    for name, preset in PRESETS.items():
        sources = [s for s in (preset.hub_id, preset.package and f"package {preset.package}") if s]
        mark = " (default)" if name == DEFAULT_MODEL else ""
        rows.append(
            (
                name + mark,
                preset.config.family,
                f"{preset.config.block_size:,}",
                preset.description,
                ", ".join(sources),
                "yes" if offline(preset) else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def recipes_command(c: RecipesCommand) -> int:
    if c.name:
        print(recipe_text(c.name), end="")
        return 0
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name.ljust(width)}  {description}")
    return 0
