"""``edge-agent doctor`` on a box with ``[[recipes]]``: one row per recipe (docs/recipes.md).

Each row says whether the recipe's bundle loads (hashes and schema, the fleet signature when a key is set),
its version and input size, the epsilon that will judge its frames, and whether its ROI fits the camera's
frames turned its way. The camera's frame size is known only with ``--open-source`` (the raw frame, before
any rotation or ROI); without it the row says so. A module of its own beside edge_agent/cli/doctor.py,
which is long enough (and imports this one: the rows come back as plain (name, status, detail) tuples, so
there is no import back); it imports what it checks lazily, as the other checks do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from edge_agent.config import AgentSettings
    from edge_agent.config_recipes import RecipeConfig

# One row of doctor's report: (name, ok / warn / fail, detail), doctor.Check's fields.
Row = tuple[str, Literal["ok", "warn", "fail"], str]


def active_recipe_settings(settings: AgentSettings) -> AgentSettings:
    """The settings with ``[model] bundle`` set to the active recipe's (the one the agent starts with)."""
    active = settings.recipe or settings.recipes[0].name
    bundle = next(r.bundle for r in settings.recipes if r.name == active)
    return settings.model_copy(update={"model": settings.model.model_copy(update={"bundle": bundle})})


def raw_source_settings(settings: AgentSettings) -> AgentSettings:
    """The settings with the source's own rotation and ROI off: the grab gives the camera's raw frame, which
    each recipe turns and cuts its own way."""
    source = settings.source.model_copy(update={"roi": None, "rotate": 0})
    return settings.model_copy(update={"source": source})


def check_recipes(settings: AgentSettings, raw_hw: tuple[int, int] | None) -> list[Row]:
    """One row per recipe, in the config's order (the PLC's RecipeSelect index); ``raw_hw`` is the camera's raw
    frame (height, width) when one was grabbed."""
    return [check_recipe(settings, index, config, raw_hw) for index, config in enumerate(settings.recipes)]


def check_recipe(settings: AgentSettings, index: int, config: RecipeConfig, raw_hw: tuple[int, int] | None) -> Row:
    """The row of one recipe: fail when its bundle cannot be served or its ROI cannot be cut from the frames."""
    from edge_agent.bundle import BundleError, load_bundle
    from edge_agent.fleet.signing import SigningError, verify_installed_bundle
    from edge_agent.inspection.preprocess import aspect_mismatch
    from edge_agent.inspection.scoring import DecisionRule
    from edge_agent.service.recipes import recipe_settings

    row = f"recipe {config.name}"
    try:
        bundle = load_bundle(config.bundle)
        verify_installed_bundle(config.bundle, settings.update.public_key)
    except (BundleError, SigningError, OSError) as exc:
        return (row, "fail", f"index {index}: {exc}; the agent will not start with this recipe")
    geometry, nfa, _ = recipe_settings(settings, config)
    spec = bundle.manifest.input
    epsilon = DecisionRule.from_bundle(bundle.manifest, nfa).log10_epsilon  # what will judge its frames
    if config.log10_epsilon is not None:
        epsilon_from = "the recipe's"
    else:
        epsilon_from = "[nfa]" if settings.nfa.log10_epsilon is not None else "the bundle's"
    facts = [
        f"index {index}",
        f"{bundle.manifest.name} {bundle.manifest.version} at {spec.width}x{spec.height}",
        f"log10 epsilon {epsilon:g} ({epsilon_from})",
        f"rotate {geometry.rotate}",
    ]
    roi = geometry.roi
    if raw_hw is None:
        where = f"roi {list(roi)}" if roi is not None else "the whole frame"
        facts.append(f"{where} (run with --open-source to check it against the camera's frames)")
        return (row, "ok", ", ".join(facts))
    height, width = raw_hw
    if geometry.rotate in (90, 270):
        width, height = height, width
    if roi is not None:
        x, y, w, h = roi
        if x + w > width or y + h > height:
            facts.append(
                f"roi {list(roi)} does not fit the camera's {width}x{height} frames (rotated {geometry.rotate})"
            )
            return (row, "fail", ", ".join(facts) + ": a switch to it is refused")
        cut_hw = (h, w)
        facts.append(f"roi {list(roi)} fits the camera's {width}x{height} frames")
    else:
        cut_hw = (height, width)
        facts.append(f"the whole {width}x{height} frame")
    ratio = aspect_mismatch(cut_hw, (spec.height, spec.width))
    if ratio is not None:
        facts.append(
            f"but the model takes {spec.width}x{spec.height}: every frame is stretched {ratio:.2f}x horizontally; "
            "give this recipe a roi with the model's aspect"
        )
        return (row, "warn", ", ".join(facts))
    return (row, "ok", ", ".join(facts))
