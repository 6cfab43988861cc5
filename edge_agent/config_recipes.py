"""``[[recipes]]``: the products one box inspects, each a bundle with its own geometry, decision and parts settings.

A product changeover selects another preloaded recipe (edge_agent/service/recipes.py, docs/recipes.md).
Without ``[[recipes]]`` the box runs ``[model] bundle`` with ``[source]``, ``[nfa]`` and ``[parts]`` as
before: one implicit recipe. A module of its own beside edge_agent/config.py (which imports it; that file
is long enough), on the config's floor (docs/design.md section 8): it imports nothing from the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The same rule as config.ID_PATTERN (a recipe name goes into messages, logs and the PLC's list); repeated here
# because config.py imports this module.
RECIPE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_RECIPES = 256  # RecipeSelect is a 16-bit index; a box with more products than this has a config problem


class RecipePartsConfig(BaseModel):
    """Tracked-parts settings of one recipe; unset keys keep the ``[parts]`` value (docs/parts.md)."""

    model_config = ConfigDict(extra="forbid")

    direction: Literal["right_to_left", "left_to_right"] | None = Field(
        default=None, description="the way the belt runs through this recipe's image"
    )
    decision_line: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="decision line, a fraction of the width from the exit edge"
    )
    speed_px_s: float | None = Field(default=None, ge=0, description="belt speed in this recipe's image pixels/s")
    px_per_m: float | None = Field(default=None, gt=0, description="image pixels per metre of belt (this ROI)")
    threshold_sigma: float | None = Field(default=None, gt=0, description="part pixels: spreads from the belt level")
    min_contrast: float | None = Field(default=None, ge=0, description="part pixels: grey levels from the belt")
    column_fill: float | None = Field(default=None, gt=0, lt=1, description="share of a column's rows that is part")
    min_part_px: int | None = Field(default=None, ge=1, description="shorter parts (along the belt) are noise")
    min_frames: int | None = Field(default=None, ge=1, description="a part seen in fewer frames is noise")
    candidate_slack: float | None = Field(
        default=None, ge=0, description="decades above log10 epsilon that are candidate places of a part"
    )

    def overrides(self) -> dict[str, object]:
        """The keys this recipe sets, for ``PartsConfig.model_copy(update=...)``."""
        return self.model_dump(exclude_none=True)


class RecipeConfig(BaseModel):
    """One product: a bundle and how its frames are cut and judged; unset keys keep the box-wide value. Every
    recipe is preloaded at start; the list's order gives the PLC's RecipeSelect index (from 0); docs/recipes.md."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=RECIPE_NAME_PATTERN,
        description="the recipe's name in messages, cmd/recipe and edge-agent recipe (letters, digits, . _ -)",
    )
    bundle: Path = Field(description="this recipe's bundle directory (e.g. <state_dir>/recipes/<name>/current)")
    roi: tuple[int, int, int, int] | None = Field(
        default=None, description="x, y, w, h crop in source pixels; unset: source.roi"
    )
    rotate: Literal[0, 90, 180, 270] | None = Field(default=None, description="clockwise turn; unset: source.rotate")
    log10_epsilon: float | None = Field(
        default=None, allow_inf_nan=False, description="anomalous when a region's log10 NFA is below; unset: [nfa]"
    )
    min_region_area: int | None = Field(
        default=None,
        ge=0,
        description="reject: regions smaller than this (source pixels) never flag a part; unset: [nfa]",
    )
    parts: RecipePartsConfig = Field(default_factory=RecipePartsConfig)
