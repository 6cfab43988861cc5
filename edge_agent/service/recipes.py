"""Recipes: the products one box inspects, preloaded, switched at a frame boundary (docs/recipes.md).

A recipe (``[[recipes]]`` in the config, edge_agent/config_recipes.py) is a bundle with its own rotation,
ROI, decision (log10 epsilon, minimum region area) and tracked-parts settings. ``RecipeBook.load`` loads
and warms up every recipe's model before the agent starts, so a switch loads nothing: it replaces the
source's :class:`FrameGeometry` (rotation, ROI and the recipe's name, one object read once per frame) and
the pipeline's current model.

No frame is judged by the wrong recipe: the frame carries the name of the recipe whose geometry cut it,
and the inference stage takes that recipe's model for it (``Pipeline.model_for``), so frames already in
the queues when the switch comes finish with the old recipe, and the first frame cut the new way is
inferred, scored and labelled (``model.recipe`` in every inspection and part message) by the new one.

Selection comes from ``cmd/recipe`` (MQTT, like every command: validated, answered, retained refused),
``edge-agent recipe`` (which sends that command) and the PLC's RecipeSelect (an index into the list);
an unknown name or index is refused and the active recipe stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.config import AgentSettings, ConfigError, NfaConfig, PartsConfig
from edge_agent.config_recipes import RecipeConfig
from edge_agent.inspection.drivers import Frame, FrameGeometry
from edge_agent.inspection.loaded_model import LoadedModel, ModelLoadError, load_model
from edge_agent.messages import ModelRef, PartMessage, RecipeCommand, ReloadCommand, UpdateCommand
from edge_agent.publish.commands import CommandFailed, Done

if TYPE_CHECKING:
    from edge_agent.inspection.parts import PartsView, TrackedParts
    from edge_agent.inspection.pipeline import Pipeline
    from edge_agent.inspection.scoring import Verdict
    from edge_agent.plc.handshake import PlcHandshake
    from edge_agent.service.agent import Agent

log = logging.getLogger(__name__)


class RecipeRefused(ValueError):
    """A selection naming no recipe; the text lists what exists. The active recipe stays."""


@dataclass(frozen=True)
class Recipe:
    """One preloaded recipe: what a switch puts in place."""

    index: int  # position in [[recipes]]: the PLC's RecipeSelect/RecipeActive
    name: str
    bundle: Path
    geometry: FrameGeometry
    nfa: NfaConfig
    parts: PartsConfig
    model: LoadedModel


def recipe_settings(settings: AgentSettings, config: RecipeConfig) -> tuple[FrameGeometry, NfaConfig, PartsConfig]:
    """A recipe's geometry, decision and parts settings: its own keys over the box-wide sections."""
    source = settings.source
    geometry = FrameGeometry(
        config.roi if config.roi is not None else source.roi,
        config.rotate if config.rotate is not None else source.rotate,
        config.name,
    )
    nfa_changes = {"log10_epsilon": config.log10_epsilon, "min_region_area": config.min_region_area}
    nfa = settings.nfa.model_copy(update={k: v for k, v in nfa_changes.items() if v is not None})
    parts = settings.parts.model_copy(update=config.parts.overrides())
    return geometry, nfa, parts


class RecipeBook:
    """The preloaded recipes and the active one (thread-safe: commands, the PLC and the pipeline call it)."""

    def __init__(self, settings: AgentSettings, recipes: list[Recipe], active: str) -> None:
        self.settings = settings
        self.recipes = recipes
        self._by_name = {r.name: r for r in recipes}
        self._active = self._by_name[active]
        self._lock = threading.Lock()
        self._pipeline: Pipeline | None = None
        self.switches = 0
        self._update_thread: threading.Thread | None = None
        # Told of every switch with the new recipe (the PLC's RecipeActive); called on the switch thread.
        self.listeners: list[Callable[[Recipe], None]] = []
        # Finishes the switches one at a time, in order (select): one thread, started at the first switch.
        self._switcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recipe-switch")

    @classmethod
    def load(cls, settings: AgentSettings, live: bool = False) -> RecipeBook:
        """Load and warm up every recipe's bundle; ModelLoadError naming the recipe when one cannot be served."""
        from edge_agent.fleet.signing import SigningError, verify_installed_bundle

        recipes: list[Recipe] = []
        try:
            for index, config in enumerate(settings.recipes):
                geometry, nfa, parts = recipe_settings(settings, config)
                try:
                    verify_installed_bundle(config.bundle, settings.update.public_key)
                    model = load_model(config.bundle, settings.model, nfa, live=live)
                except (ModelLoadError, SigningError) as exc:
                    raise ModelLoadError(f"recipe {config.name!r}: {exc}") from exc
                model.ref = model.ref.model_copy(update={"recipe": config.name})
                recipes.append(Recipe(index, config.name, config.bundle, geometry, nfa, parts, model))
        except BaseException:
            for recipe in recipes:
                recipe.model.close()
            raise
        active = settings.recipe or settings.recipes[0].name
        log.info("recipes loaded", extra={"event": "recipes_loaded", "recipes": [r.name for r in recipes], "active": active, "versions": {r.name: r.model.ref.version for r in recipes}})  # fmt: skip
        return cls(settings, recipes, active)

    # -- views --------------------------------------------------------------------------------------

    @property
    def active(self) -> Recipe:
        """The recipe new frames are cut and judged with."""
        return self._active

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.recipes]

    def find(self, key: str | int) -> Recipe:
        """The recipe named ``key`` or at index ``key``; RecipeRefused saying what exists."""
        if isinstance(key, int):
            if 0 <= key < len(self.recipes):
                return self.recipes[key]
            raise RecipeRefused(
                f"recipe index {key} does not exist: this box has recipes 0..{len(self.recipes) - 1} "
                f"({', '.join(f'{r.index} {r.name}' for r in self.recipes)})"
            )
        recipe = self._by_name.get(key)
        if recipe is None:
            raise RecipeRefused(f"no recipe named {key!r}: this box has {', '.join(self.names)}")
        return recipe

    def model_for(self, frame: Frame) -> LoadedModel:
        """The pipeline's ``model_for``: the model of the recipe that cut ``frame`` (under the model lock)."""
        if frame.recipe is None:  # cannot happen once attached: every frame is cut by a recipe's geometry
            return self._active.model
        return self._by_name[frame.recipe].model

    # -- switching ----------------------------------------------------------------------------------

    def attach(self, pipeline: Pipeline) -> None:
        """Serve the active recipe from the first frame on (before the pipeline starts)."""
        self._pipeline = pipeline
        pipeline.model_for = self.model_for
        pipeline.source.geometry = self._active.geometry
        pipeline.swap_model(self._active.model)
        from edge_agent.inspection.parts import TrackedParts

        if isinstance(pipeline.parts, TrackedParts):
            pipeline.parts = RecipeParts(pipeline.parts, self)

    def select(self, key: str | int, by: str, wait: bool = True) -> tuple[Recipe, Recipe]:
        """Switch to the recipe named (or at index) ``key`` from the next frame cut; (new, previous).

        RecipeRefused when there is no such recipe: nothing changes. The geometry is in place when this
        returns, so every frame cut from then on is cut and judged by the new recipe. The rest of the switch
        (the pipeline's current model, which waits for an inference in progress, the log line and the
        listeners: the PLC's RecipeActive) runs on the switch thread, in switch order; ``wait=False`` returns
        without waiting for it (the PLC servers: their thread must not wait for an inference).
        """
        with self._lock:
            recipe = self.find(key)
            previous = self._active
            if recipe is previous:
                return recipe, previous
            self._check_fits(recipe)
            started = time.monotonic()
            self._active = recipe
            if self._pipeline is not None:
                # A frame cut the new way picks its model by name (model_for): the geometry is the switch.
                self._pipeline.source.geometry = recipe.geometry
            self.switches += 1
            done = self._switcher.submit(self._finish_switch, recipe, previous, by, started)
        if wait:
            done.result()
        return recipe, previous

    def _finish_switch(self, recipe: Recipe, previous: Recipe, by: str, started: float) -> None:
        """The switch thread: the pipeline's current model (status line, stats, cmd/threshold), then the log line
        and the listeners. Switches finish in the order they were made, so RecipeActive ends on the last one."""
        if self._pipeline is not None:
            with self._lock:
                current = self._active.model  # the latest switch's (and a reloaded recipe's new) model
            self._pipeline.swap_model(current)  # waits for an inference in progress (the model lock)
        log.info(
            "recipe %s -> %s (%s)", previous.name, recipe.name, by,
            extra={"event": "recipe_switched", "recipe": recipe.name, "index": recipe.index,
                   "previous": previous.name, "by": by, "version": recipe.model.ref.version,
                   "seconds": round(time.monotonic() - started, 6)},
        )  # fmt: skip
        for listener in self.listeners:
            try:
                listener(recipe)
            except Exception as exc:  # a PLC server's trouble must not undo or fail the switch
                log.exception("recipe listener failed", extra={"event": "recipe_listener_failed", "error": str(exc)})

    def _check_fits(self, recipe: Recipe) -> None:
        """RecipeRefused when the recipe's ROI cannot be cut from the camera's frames (the last one seen): a
        switch must not turn a working source into a failing one."""
        last = self._pipeline.last_frame if self._pipeline is not None else None
        roi = recipe.geometry.roi
        if last is None or roi is None:
            return
        width, height = last.frame_size  # rotated the way the recipe that cut it says
        cut_by = self._by_name.get(last.recipe) if last.recipe is not None else None
        turned = cut_by.geometry.rotate if cut_by is not None else 0
        if (turned - recipe.geometry.rotate) % 180:
            width, height = height, width
        x, y, w, h = roi
        if x + w > width or y + h > height:
            raise RecipeRefused(
                f"recipe {recipe.name}: roi {list(roi)} does not fit the camera's {width}x{height} frames "
                f"(rotated {recipe.geometry.rotate})"
            )

    def select_index(self, index: int) -> None:
        """The PLC's RecipeSelect (handshake.RecipeSelector): ValueError when there is no recipe ``index``.

        Returns once the switch is made (frames cut from now on are the new recipe's) without waiting for an
        inference in progress: RecipeActive shows the new index when the switch is done."""
        self.select(index, "plc", wait=False)

    # -- commands -----------------------------------------------------------------------------------

    def command(self, command: RecipeCommand) -> Done:
        """``cmd/recipe``: switch by name or index; refused (the active recipe stays) when there is none."""
        key: str | int = command.name if command.name is not None else int(command.index or 0)
        try:
            recipe, previous = self.select(key, "mqtt")
        except RecipeRefused as exc:
            raise CommandFailed(f"{exc}; still inspecting {self._active.name}") from exc
        ref = recipe.model.ref
        verb = "already inspecting" if recipe is previous else "now inspecting"
        return Done(
            f"{verb} recipe {recipe.name} (index {recipe.index}, model {ref.name} {ref.version}) from the next frame",
            {"recipe": recipe.name, "index": recipe.index, "previous": previous.name, "model": ref.model_dump()},
        )

    def reload(self, command: ReloadCommand) -> Done:
        """``cmd/reload`` with recipes: load a recipe's bundle (``recipe``, default the active one's) again fully,
        then swap it in; the old model serves until then, and keeps serving when the new one fails."""
        from edge_agent.fleet.signing import SigningError, verify_installed_bundle

        with self._lock:
            try:
                recipe = self._active if command.recipe is None else self.find(command.recipe)
            except RecipeRefused as exc:
                raise CommandFailed(str(exc)) from exc
        try:
            verify_installed_bundle(recipe.bundle, self.settings.update.public_key)
            live = self._pipeline.source.live if self._pipeline is not None else False
            new = load_model(recipe.bundle, self.settings.model, recipe.nfa, live=live)
        except (ModelLoadError, SigningError) as exc:
            raise CommandFailed(f"recipe {recipe.name}: {exc}; still running {recipe.model.ref.version}") from exc
        if command.version is not None and new.ref.version != command.version:
            new.close()
            raise CommandFailed(
                f"recipe {recipe.name}: {recipe.bundle} holds version {new.ref.version}, not the requested "
                f"{command.version}; still running {recipe.model.ref.version}"
            )
        new.ref = new.ref.model_copy(update={"recipe": recipe.name})
        old = self._replace(recipe, new)
        active = self._active.name == recipe.name
        log.info("model reloaded", extra={"event": "model_reloaded", "recipe": recipe.name, "active": active, "old_version": old.ref.version, "version": new.ref.version, "seconds": new.load_s})  # fmt: skip
        return Done(
            f"recipe {recipe.name} now runs {new.ref.name} {new.ref.version} (was {old.ref.version}); "
            f"loaded in {new.load_s:.2f} s" + ("" if active else "; it is not the active recipe"),
            {
                "recipe": recipe.name,
                "active": active,
                "model": new.ref.model_dump(),
                "previous": old.ref.model_dump(),
                "load_s": new.load_s,
            },
        )

    def start_update(self, command: UpdateCommand) -> Done:
        """``cmd/update`` with recipes: every recipe updated one by one in a worker thread (edge-agent update)."""
        from edge_agent.fleet.update import apply_recipe_updates, models_dir_for

        if self._update_thread is not None and self._update_thread.is_alive():
            raise CommandFailed("an update is already running")
        try:
            for config in self.settings.recipes:
                models_dir_for(self.settings, config.name)
        except ConfigError as exc:
            raise CommandFailed(str(exc)) from exc

        def work() -> None:
            try:
                apply_recipe_updates(self.settings)  # source, group, force only from the box's config
            except Exception as exc:  # the update thread must report, never take the agent down
                log.exception("update failed", extra={"event": "update_crashed", "error": str(exc)})

        self._update_thread = threading.Thread(target=work, name="update", daemon=True)
        self._update_thread.start()
        return Done(f"update of {len(self.recipes)} recipes started, one by one; progress on the update topic", {})

    def _replace(self, recipe: Recipe, model: LoadedModel) -> LoadedModel:
        """Put ``model`` in ``recipe``'s place; the old one is closed once no inference runs on it."""
        fresh = Recipe(recipe.index, recipe.name, recipe.bundle, recipe.geometry, recipe.nfa, recipe.parts, model)
        with self._lock:
            self.recipes[recipe.index] = fresh
            self._by_name[recipe.name] = fresh
            if self._active is recipe:
                self._active = fresh
            active = self._active
        if self._pipeline is not None:
            # swap_model takes the inference lock: model_for is read under it, so once this returns no
            # inference runs on the old model and every later one finds the new.
            self._pipeline.swap_model(active.model)
        recipe.model.close()
        return recipe.model

    def close(self, closed: LoadedModel | None = None) -> None:
        """Close every recipe's model (``closed``: one the agent closed already), after the switches in flight."""
        self._switcher.shutdown(wait=True)
        for recipe in self.recipes:
            if recipe.model is not closed:
                recipe.model.close()

    def figures(self) -> dict[str, object]:
        """For logs and the preview: the active recipe and the list."""
        return {"recipe": self._active.name, "recipes": self.names, "recipe_switches": self.switches}


class RecipeParts:
    """Tracked parts across recipe switches (the pipeline's PartStage, publish thread only).

    The first frame of another recipe decides the parts in view with the old recipe's last frame and model,
    then the belt is learned again with the new recipe's parts settings (TrackedParts.switch).
    """

    def __init__(self, inner: TrackedParts, book: RecipeBook) -> None:
        self.inner = inner
        self.book = book
        self._recipe: str | None = book.active.name
        inner.config = book.active.parts
        self._last: tuple[Frame, ModelRef | None] | None = None

    @property
    def view(self) -> PartsView | None:
        return self.inner.view

    def observe(self, frame: Frame, verdict: Verdict, model: ModelRef | None) -> list[PartMessage]:
        """One inspected frame: switch first when it was cut by another recipe."""
        messages: list[PartMessage] = []
        if frame.recipe is not None and frame.recipe != self._recipe:
            last_frame, last_model = self._last if self._last is not None else (None, None)
            messages = self.inner.switch(self.book.find(frame.recipe).parts, last_frame, last_model)
            self._recipe = frame.recipe
        self._last = (frame, model)
        return messages + self.inner.observe(frame, verdict, model)

    def finish(self, frame: Frame | None, model: ModelRef | None) -> list[PartMessage]:
        """End of the stream."""
        return self.inner.finish(frame, model)


def install_recipes(agent: Agent, book: RecipeBook | None) -> None:
    """Hang the recipes on a built agent (before ``serve``): the pipeline, ``cmd/recipe``, ``cmd/reload`` and
    the PLC's RecipeSelect/RecipeActive. Without recipes ``cmd/recipe`` is refused with the reason."""
    if book is None:
        no_recipes = "this box has no [[recipes]] in its config: it runs its one bundle (docs/recipes.md)"

        def refuse(command: RecipeCommand) -> Done:
            raise CommandFailed(no_recipes)

        def reload(command: ReloadCommand) -> Done:
            if command.recipe is not None:
                raise CommandFailed(f"cannot reload recipe {command.recipe!r}: {no_recipes}")
            return agent.reload(command)

        agent.commands.register("recipe", refuse)
        agent.commands.register("reload", reload)
        return
    book.attach(agent.pipeline)
    agent.commands.register("recipe", book.command)
    agent.commands.register("reload", book.reload)  # a recipe's bundle (default the active one's)
    agent.commands.register("update", book.start_update)  # every recipe, one by one
    if agent.plc is not None:
        connect_plc(book, agent.plc.handshake)


def connect_plc(book: RecipeBook, handshake: PlcHandshake) -> None:
    """The PLC's RecipeSelect switches ``book`` (without waiting for an inference); RecipeActive follows every
    switch, whichever interface made it."""
    handshake.selector = book.select_index
    handshake.recipe_changed(book.active.index)
    book.listeners.append(lambda recipe: handshake.recipe_changed(recipe.index))
