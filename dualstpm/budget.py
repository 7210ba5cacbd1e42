"""The training budget of one fit: the demo's fixed epochs, or the real-data recipe in optimizer steps.

`fit.recipe` picks it (:func:`plan_fit`):

- ``fixed``: `fit.epochs` epochs at `image_size`, every one trained (the synthetic demo's
  quick budget, and the behaviour of every fit before the recipe existed);
- ``real``: the real-data recipe (`fit.real.*`). One optimizer step per batch and branch,
  so an epoch of N training images at batch size B is ``ceil(N / B)`` steps per branch.
  The fit trains at least ``ceil(min_steps / steps_per_epoch)`` epochs (the floor: a tiny
  category is still trained), at most ``max(floor epochs, max_steps // steps_per_epoch)``
  (the ceiling, whole epochs), and between the two stops early once no branch has lowered
  its validation selection value (`fit.select`) for ``ceil(patience_steps /
  steps_per_epoch)`` epochs. The image size is `fit.real.image_size` (null: `image_size`);
  with `data.keep_aspect` its longest side, the other following the training images' median
  aspect ratio (`dualstpm.sizes.native_size`, under either recipe). With `fit.real.memory`
  (the default) it builds the memory bank too (`memory.enabled` true, except under tiling),
  so that `dualstpm ablate` can offer the memory views;
- ``auto``: ``fixed`` when the data is the synthetic demo (`data.source: synthetic`, read
  from `data.root` itself, as `tracking.params_for_data` describes the data), ``real`` on
  any other data (a `--data-root` of one's own, `data.source: folder` or `mvtec`).

The plan's `params` are the params the fit runs with: `fit.recipe` the concrete recipe,
`image_size` the recipe's size, `fit.epochs` its ceiling in epochs and `memory.enabled`
whether it builds the memory bank. Planning them again
gives the same plan (a resumed fit, `tracking`'s logged params and the fit agree).

Under tiling (`tiling.enabled`) the fit trains on tiles: an epoch is every tile of every
training frame, so N frames of T tiles each count as N * T training images above, and a
null `tiling.frame_size` becomes the median height and width of the training frames.

Example: battery_weld's 30 training images (37 good, 7 held out) at batch 16 are
``ceil(30 / 16) = 2`` steps per epoch; with ``min_steps: 500`` the floor is
``ceil(500 / 2) = 250`` epochs (500 steps).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualstpm.config import FitParams, Params, validate
from dualstpm.errors import ConfigError
from dualstpm.project import params_for_data
from dualstpm.sizes import STRETCH_NOTE, ImageSize, as_param, aspect_change, describe, hw, native_size, to_json


def epochs_text(n: int) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} epoch" + ("" if n == 1 else "s")


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps per branch in one epoch over `n_images` at `batch_size` (the last batch
    may be smaller): ceil(n_images / batch_size). Raises ValueError for a count below 1."""
    if n_images < 1 or batch_size < 1:
        raise ValueError(f"an epoch needs at least one image and a batch size of at least 1, got {n_images} images "
                         f"at batch size {batch_size}")
    return math.ceil(n_images / batch_size)


def is_synthetic_demo(params: Params, data_root: Path | str | None) -> bool:
    """Whether a fit of `data_root` under `params` trains on the synthetic demo data: the
    params say `data.source: synthetic` and `data_root` is their `data.root` (a
    `--data-root` elsewhere is a folder of one's own, `tracking.params_for_data`)."""
    return params_for_data(params, data_root).data.source == "synthetic"


@dataclass(frozen=True)
class FitPlan:
    """How long one fit trains, and at which image size.

    `params`: the params the fit runs with (module docstring). `min_epochs`..`max_epochs`:
    the epochs it may train (equal under ``fixed``); `patience_epochs`: epochs without a new
    best selection value, of any branch, after which it stops past `min_epochs` (None:
    never early). `reason`: why this recipe, for the log. `aspect`: the median width/height
    of the training images and `stretch` the largest `sizes.aspect_change` of one of them at
    the plan's size (both None when the plan was made from a count alone).
    """

    recipe: str
    reason: str
    params: Params
    train_images: int
    steps_per_epoch: int
    min_epochs: int
    max_epochs: int
    patience_epochs: int | None
    aspect: float | None = None
    stretch: float | None = None
    #: tiles per training frame under tiling (1 without: the frame is the model's input)
    tiles_per_image: int = 1
    #: under fit.recipe=auto on a folder of one's own, why an asked-for fit.epochs is not used (else None)
    epochs_note: str | None = None

    def tiling_note(self) -> str | None:
        """Under tiling, the grid of one frame and the count of training tiles; None without tiling."""
        tiling = self.params.tiling_spec()
        if tiling is None:
            return None
        grid = tiling.grid(hw(self.params.frame_size))
        return (f"tiling: each {describe(self.params.frame_size)} frame is cut into {grid.describe()}, overlap "
                f"{self.params.tiling.overlap:g}: {self.train_images} train frames = {self.train_images * grid.count} "
                "train tiles")

    def aspect_note(self) -> str | None:
        """A warning when the resize changes the training images' aspect ratio by more than
        :data:`STRETCH_NOTE` (a squash is never silent), with the size that keeps it."""
        if self.stretch is None or self.stretch <= STRETCH_NOTE:
            return None
        size = self.params.image_size
        if self.params.tiling.enabled:  # frames are resized to the frame size, not to the tile
            frame = hw(self.params.frame_size)
            if abs(frame[1] / frame[0] - self.aspect) / self.aspect < 0.01:  # the frame size is their median shape
                return (f"the training frames differ in shape (median width/height {self.aspect:.2f}): each is resized "
                        f"to {describe(self.params.frame_size)} (tiling.frame_size), the median frame, which stretches "
                        f"some by up to {self.stretch:.2f}x (one frame size per category: docs/frames.md#tiling)")
            return (f"the training frames (median width/height {self.aspect:.2f}) are resized to "
                    f"{describe(self.params.frame_size)} (tiling.frame_size), which stretches their aspect ratio by up "
                    f"to {self.stretch:.2f}x: set tiling.frame_size to their own [height, width], or null (docs/frames.md)")
        native = native_size([(self.aspect, 1.0)], max(hw(size)))
        if native == hw(size):  # the size suits the median image: the stretch is the images' own spread
            return (f"the training images differ in shape (median width/height {self.aspect:.2f}): each is resized to "
                    f"{describe(size)}, the size nearest their median aspect, which stretches some by up to "
                    f"{self.stretch:.2f}x (one size per category: docs/frames.md)")
        return (f"the training images (median width/height {self.aspect:.2f}) are resized to {describe(size)}, which "
                f"stretches their aspect ratio by up to {self.stretch:.2f}x: defects change shape. To keep the "
                f"aspect, set data.keep_aspect=true or image_size={as_param(native)} (height, width: "
                f"{describe(native)}; docs/frames.md)")

    def stop_reason(self, epochs_done: int, best_epochs: Mapping[str, int]) -> str | None:
        """Why training ends after `epochs_done` epochs, or None to train another.

        best_epochs: per branch, the epoch whose selection value is the lowest so far
        (0: none yet). Pure: a resumed fit asks again and gets the same answer."""
        if epochs_done >= self.max_epochs:
            return epochs_text(self.max_epochs) + ("" if self.recipe == "fixed" else " (the ceiling)")
        if self.patience_epochs is None or epochs_done < self.min_epochs:
            return None
        last_best = max(best_epochs.values(), default=0)
        if epochs_done - last_best >= self.patience_epochs:
            return (f"early stop after epoch {epochs_done}: no branch improved on its best validation selection "
                    f"value (last at epoch {last_best}) for {epochs_done - last_best} epochs "
                    f"(patience {self.patience_epochs} epochs = fit.real.patience_steps "
                    f"{self.params.fit.real.patience_steps} at {self.steps_per_epoch} steps per epoch)")
        return None

    def describe(self) -> str:
        """One line for the log: the recipe, why, and its budget."""
        size, batch = self.params.image_size, self.params.fit.batch_size
        budget = (epochs_text(self.max_epochs) if self.recipe == "fixed" else
                  f"{self.min_epochs} to {self.max_epochs} epochs ({self.min_epochs * self.steps_per_epoch} to "
                  f"{self.max_epochs * self.steps_per_epoch} steps per branch), early stop after "
                  f"{self.patience_epochs} epochs without improvement")
        images = (f"{self.train_images} train images" if self.tiles_per_image == 1 else
                  f"{self.train_images} train frames x {self.tiles_per_image} tiles")
        return (f"training budget: recipe {self.recipe} ({self.reason}): {budget}; {images} "
                f"at batch {batch} = {self.steps_per_epoch} steps per epoch, {describe(size)}")

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "reason": self.reason, "train_images": self.train_images,
                "steps_per_epoch": self.steps_per_epoch, "min_epochs": self.min_epochs, "max_epochs": self.max_epochs,
                "patience_epochs": self.patience_epochs, "image_size": to_json(self.params.image_size),
                "batch_size": self.params.fit.batch_size, "aspect": self.aspect, "stretch": self.stretch,
                "tiles_per_image": self.tiles_per_image}


def _resolved(params: Params, recipe: str, image_size: ImageSize, epochs: int,
              frame_size: tuple[int, int] | None = None) -> Params:
    """`params` with the recipe's concrete values (and, under tiling, the concrete frame size),
    validated again (a `fit.real.image_size` must suit the params' blur radii as `image_size`
    does: ConfigError naming them)."""
    raw = params.to_dict()
    raw["image_size"] = to_json(image_size)
    raw["fit"].update(recipe=recipe, epochs=epochs)
    if recipe == "real" and params.fit.real.memory and not params.tiling.enabled:
        raw["memory"]["enabled"] = True  # the recipe's memory bank: the ablation may offer the memory views
    if frame_size is not None:
        raw["tiling"]["frame_size"] = list(frame_size)
    return validate(raw, f"the params under fit.recipe={recipe} (image_size={to_json(image_size)}, "
                         f"fit.epochs={epochs})")


def frame_size_of(params: Params, shapes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Under tiling, the (height, width) frames are brought to: `tiling.frame_size`, or when it
    is null the median height and width of `shapes` ((width, height) each), rounded; None
    without tiling. Raises ValueError for a null frame size without `shapes`."""
    if not params.tiling.enabled:
        return None
    if params.tiling.frame_size is not None:
        return hw(params.tiling.frame_size)
    if not shapes:
        raise ValueError("tiling.frame_size null needs the training frames' shapes to plan the frame size")
    frame = (round(statistics.median(h for _, h in shapes)), round(statistics.median(w for w, _ in shapes)))
    tile = hw(params.image_size)
    if frame[0] < tile[0] or frame[1] < tile[1]:
        raise ConfigError(
            f"tiling.enabled=true, but the training frames (median {describe(frame)}) are smaller than one tile "
            f"(image_size={to_json(params.image_size)}): tiling is for frames larger than the model's input. Set "
            "tiling.enabled=false, or lower image_size (docs/frames.md#tiling)")
    return frame


def _tiles_per_frame(frame: tuple[int, int], tile: tuple[int, int], overlap: float) -> int:
    from dualstpm.model.tiling import TileGrid  # imports torch: only when tiling

    return TileGrid(frame, tile, overlap).count


def plan_fit(params: Params, data_root: Path | str | None, train_images: int,
             shapes: Sequence[tuple[int, int]] = ()) -> FitPlan:
    """The plan of a fit of `train_images` images of `data_root` under `params` (module
    docstring); `shapes`: their (width, height), for `data.keep_aspect` and the aspect note.
    Raises ConfigError when the recipe's values do not validate together, ValueError for
    `data.keep_aspect` without `shapes`."""
    if params.data.keep_aspect and not shapes:
        raise ValueError("data.keep_aspect needs the training images' shapes to plan the image size")
    fit = params.fit
    recipe, reason = fit.recipe, f"fit.recipe={fit.recipe}"
    epochs_note = None
    if recipe == "auto":
        demo = is_synthetic_demo(params, data_root)
        recipe = "fixed" if demo else "real"
        reason = "fit.recipe=auto " + ("on the synthetic demo data" if demo else "on data that is not the synthetic demo")
        if not demo and fit.epochs != FitParams.model_fields["epochs"].default:  # asked for epochs: say why not
            epochs_note = (f"fit.epochs={fit.epochs} is not used: fit.recipe=auto trains a folder of one's own with "
                           f"the real-data recipe (fit.real.*); add --set fit.recipe=fixed to train exactly "
                           f"{epochs_text(fit.epochs)}")
    size = params.image_size if recipe == "fixed" or fit.real.image_size is None else fit.real.image_size
    if params.data.keep_aspect:
        size = native_size(shapes, max(hw(size)))
    frame = frame_size_of(params, shapes)
    tiles = 1 if frame is None else _tiles_per_frame(frame, hw(size), params.tiling.overlap)
    per_epoch = steps_per_epoch(train_images * tiles, fit.batch_size)
    aspect = statistics.median(w / h for w, h in shapes) if shapes else None
    stretch = max(aspect_change(shape, frame or size) for shape in shapes) if shapes else None
    if recipe == "fixed":
        return FitPlan(recipe, reason, _resolved(params, "fixed", size, fit.epochs, frame), train_images,
                       per_epoch, fit.epochs, fit.epochs, None, aspect, stretch, tiles, epochs_note)
    real = fit.real
    floor = math.ceil(real.min_steps / per_epoch)
    ceiling = max(floor, real.max_steps // per_epoch)
    return FitPlan(recipe, reason, _resolved(params, "real", size, ceiling, frame), train_images, per_epoch, floor,
                   ceiling, math.ceil(real.patience_steps / per_epoch), aspect, stretch, tiles, epochs_note)


def plan_category(params: Params, data_root: Path, category: str) -> FitPlan:
    """:func:`plan_fit` for `category` in `data_root`, counting its training images as `fit`
    splits them (file names only, nothing decoded). Raises DataError for a bad layout."""
    from dualstpm.data import image_shapes, load_category, split_train_val

    dataset = load_category(Path(data_root), category, require_test=False)
    train_paths, _ = split_train_val(dataset, params.fit.val_fraction, params.seed)
    return plan_fit(params, data_root, len(train_paths), image_shapes(train_paths, "planning: reading train image sizes"))
