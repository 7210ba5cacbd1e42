"""Tiling for large frames: the grid, the stitching, the params that refuse what cannot work,
and a tiled model fitted, tested, predicted and exported (docs/frames.md, "Tiling").

Expected values are worked out by hand in the comments, from the rules in
`dualstpm.model.tiling`'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dualstpm.config import load_params
from dualstpm.errors import ConfigError
from dualstpm.model.tiling import TileGrid, Tiling, axis_origins, axis_owners, stitched
from tests.conftest import fit_tiny


# --- the grid -----------------------------------------------------------------------------


def test_origins_are_flush_with_both_ends_and_evenly_spread():
    # 300 px, tiles of 64, overlap 0.25: stride 48, (300 - 64) / 48 = 4.92 -> 5 steps, 6 tiles;
    # origins round(i * 236 / 5) = 0, 47.2, 94.4, 141.6, 188.8, 236
    assert axis_origins(300, 64, 0.25) == (0, 47, 94, 142, 189, 236)
    # 128 px, tiles of 64: no overlap -> 0, 64; half overlap: stride 32, 64 / 32 = 2 steps -> 0, 32, 64
    assert axis_origins(128, 64, 0.0) == (0, 64)
    assert axis_origins(128, 64, 0.5) == (0, 32, 64)
    # a frame no longer than a tile: one tile
    assert axis_origins(64, 64, 0.25) == (0,) and axis_origins(20, 64, 0.25) == (0,)


def test_neighbours_split_their_overlap_at_its_middle():
    # tiles [0, 64), [32, 96), [64, 128): the first overlap [32, 64) is cut at (32 + 0 + 64) // 2 = 48,
    # the second [64, 96) at (64 + 32 + 64) // 2 = 80
    assert axis_owners(128, 64, (0, 32, 64)) == ((0, 48), (48, 80), (80, 128))


def test_each_pixel_is_read_from_the_tile_whose_centre_is_nearest():
    # along one axis, tiles [0, 64), [32, 96), [64, 128) have centres 32, 64, 96; pixel 47 (centre 47.5)
    # is 15.5 from 32 and 16.5 from 64: tile 0; pixel 48 (48.5): 16.5 and 15.5: tile 1
    grid = TileGrid((64, 128), (64, 64), 0.5)
    frame = torch.zeros(1, 1, 64, 128)
    tile_index = iter(range(grid.count))
    out = stitched(frame, Tiling((64, 64), 0.5, batch_size=2),
                   lambda tiles: torch.stack([torch.full(tiles.shape[1:], float(next(tile_index))) for _ in tiles]))
    row = out[0, 0, 10]
    assert row[47] == 0 and row[48] == 1 and row[79] == 1 and row[80] == 2


@pytest.mark.parametrize(("frame", "tile", "overlap"), [((64, 96), (32, 32), 0.25), ((75, 130), (32, 64), 0.4),
                                                         ((300, 200), (64, 64), 0.0), ((20, 50), (32, 64), 0.25)])
def test_stitching_the_tiles_themselves_gives_back_the_frame(frame, tile, overlap):
    # with maps = the tiles' own pixels, every pixel must come back from where it was cut: no seam, no
    # shift, no gap, nothing written twice (the last case is smaller than one tile: padded, cropped back)
    tiling = Tiling(tile, overlap, batch_size=3)
    frames = torch.rand(2, 3, *frame, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stitched(frames, tiling, lambda tiles: tiles), frames)


def test_a_constant_frame_stitches_to_a_constant_map():
    frames = torch.full((1, 3, 96, 160), 0.4)
    out = stitched(frames, Tiling((32, 32), 0.25, 4), lambda tiles: tiles.mean(dim=1))
    assert out.shape == (1, 96, 160) and torch.all(out == out[0, 0, 0])


def test_a_frame_smaller_than_a_tile_is_one_padded_tile():
    grid = TileGrid((20, 50), (32, 64), 0.25)
    assert grid.count == 1 and grid.padded
    tile = grid.cut(torch.arange(20 * 50, dtype=torch.float32).reshape(1, 20, 50))[0, 0]
    assert tile.shape == (32, 64)
    assert tile[19, 49] == 999 and tile[31, 63] == 999  # edge pixels repeated into the padding


def test_cut_all_is_every_tile_of_every_frame_in_order():
    frames = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    tiles = Tiling((4, 4), 0.0, 8).cut_all(frames)
    # 6 wide, tiles of 4, no overlap: (6 - 4) / 4 = 0.5 -> 1 step, origins 0 and 2; two frames -> 4 tiles
    assert tiles.shape == (4, 1, 4, 4)
    assert torch.equal(tiles[1], frames[0, :, :, 2:6]) and torch.equal(tiles[2], frames[1, :, :, 0:4])


# --- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["tiling.overlap=1"], "an overlap of 1 (100 %) or more would never advance"),
    (["tiling.overlap=-0.1"], "in [0, 1) (e.g. 0.25; 0 = tiles side by side), got -0.1"),
    (["tiling.frame_size=0"], "between 1 and 16384 px, got 0: e.g. [1250, 500], or null"),
    (["tiling.frame_size=[100, 20000]"], "between 1 and 16384 px"),
    (["tiling.frame_size=[100, 2.5]"], "two whole numbers"),
    (["tiling.enabled=true", "image_size=128", "tiling.frame_size=[100, 500]"],
     "smaller than one tile (image_size=128, height x width 128 x 128): lower image_size to at most [96, 128]"),
    (["tiling.enabled=true", "fusion.sigma=2"], "Set fusion.sigma=0"),
    (["tiling.enabled=true", "fit.discriminator=true"], "Set fit.discriminator=false"),
])
def test_bad_tiling_params_are_refused_naming_the_key_value_and_fix(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_params(None, overrides)
    assert "tiling" in str(error.value) and fragment in str(error.value)


def test_the_fit_plans_in_tiles_and_sets_a_null_frame_size_from_the_frames():
    from dualstpm.budget import plan_fit

    params = load_params(None, ["image_size=64", "fit.recipe=fixed", "fit.batch_size=8", "tiling.enabled=true"])
    # frames (width, height): median height of 300, 310, 320 = 310, median width of 200, 210, 190 = 200
    plan = plan_fit(params, "/mine", 3, [(200, 300), (210, 310), (190, 320)])
    assert plan.params.tiling.frame_size == (310, 200) and plan.params.frame_size == (310, 200)
    # 310 high: (310 - 64) / 48 = 5.1 -> 6 steps, 7 rows; 200 wide: (200 - 64) / 48 = 2.8 -> 3 steps, 4 columns
    assert plan.tiles_per_image == 28
    assert plan.steps_per_epoch == 11  # ceil(3 frames x 28 tiles / batch 8) = ceil(10.5)
    assert plan_fit(plan.params, "/mine", 3, [(200, 300)]).params == plan.params  # planning again keeps it


def test_frames_smaller_than_a_tile_are_refused_at_fit_with_the_fix():
    from dualstpm.budget import plan_fit

    params = load_params(None, ["image_size=64", "fit.recipe=fixed", "tiling.enabled=true"])
    with pytest.raises(ConfigError, match=r"median 30 high x 40 wide\) are smaller than one tile \(image_size=64\)"):
        plan_fit(params, "/mine", 2, [(40, 30), (40, 30)])


# --- a tiled model end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """synth_texture's 64 px frames, tiles of 32 px at overlap 0.25: 3 x 3 tiles per frame."""
    return fit_tiny(tmp_path_factory, synthetic_root, "synth_texture", "tiled",
                    "image_size=32", "tiling.enabled=true", "fit.epochs=1")


def _test_frames(root: Path) -> torch.Tensor:
    from dualstpm.data import decode_images

    return decode_images(sorted((root / "synth_texture" / "test").rglob("*.png")), (64, 64))


def test_a_tiled_model_keeps_the_frame_size_and_is_tested_at_it(tiled_run: Path, synthetic_root: Path):
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run
    from dualstpm.maps import MapSet

    detector = Detector.load(tiled_run)
    assert detector.image_size == 32 and detector.frame_size == (64, 64)  # null frame size: the frames' median
    assert detector.calibration.frame_size == (64, 64)
    result = test_run(tiled_run, synthetic_root, "synth_texture", out_dir=tiled_run)
    assert result["ground_truth"]["size"] == [64, 64]  # masks and metrics at the frame size
    assert MapSet.load(tiled_run / "maps" / "test.npz").maps.shape[-2:] == (64, 64)
    assert result["fused"]["pixel_auroc"] is not None


def test_predict_stitches_views_as_the_test_stitches_six_maps(tiled_run: Path, synthetic_root: Path):
    # the test fuses stitched six maps; predict stitches the tiles' fused maps: the same numbers,
    # because each pixel comes from one tile and the fusion is pixel-wise
    from dualstpm.detector import Detector
    from dualstpm.model.inference import score_frames

    detector = Detector.load(tiled_run)
    frames = _test_frames(synthetic_root)
    scored = detector.score_maps(detector.six_maps(frames), ("fused", "stpm", "recon"))
    out = score_frames(detector, frames)
    torch.testing.assert_close(out.anomaly_map, scored.maps["fused"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.score, scored.scores["fused"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stpm_score, scored.scores["stpm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon_score, scored.scores["recon"], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.label, out.score > detector.threshold)


def test_predict_writes_a_row_and_a_frame_sized_map_per_image(tiled_run: Path, synthetic_root: Path, tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import predict

    table = predict(Detector.load(tiled_run), [synthetic_root / "synth_texture" / "test"], tmp_path / "pred")
    assert len(table) == 15 and (table["error"] == "").all()
    assert table["stpm_score"].notna().all() and table["recon_score"].notna().all()


@pytest.mark.parametrize(("fmt", "backend"), [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_an_export_tiles_as_pytorch_does(tiled_run: Path, synthetic_root: Path, tmp_path: Path, fmt: str, backend: str):
    from dualstpm.backends import ExportedModel
    from dualstpm.detector import Detector
    from dualstpm.export import export_run
    from dualstpm.model.inference import score_frames

    exported = export_run(tiled_run, fmt, "fp32", tmp_path / fmt)
    model = ExportedModel(exported, backend)
    assert model.tiling is not None and model.frame_size == (64, 64) and model.image_size == 32
    frames = _test_frames(synthetic_root)
    ours, theirs = score_frames(Detector.load(tiled_run), frames), score_frames(model, frames)
    np.testing.assert_allclose(theirs.score.numpy(), ours.score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(theirs.anomaly_map.numpy(), ours.anomaly_map.numpy(), rtol=1e-4, atol=1e-5)
    assert torch.equal(theirs.label, ours.label)


# --- memory: scoring a large 8-bit frame holds it as bytes and never assembles the branch maps


@pytest.mark.parametrize(("reduce", "expected"), [("max", 15.0), ("topk_mean", 13.5)])
def test_a_score_streamed_window_by_window_is_the_whole_maps_score(reduce: str, expected: float):
    from dualstpm.model.fusion import ScoreSpec, StreamedScore

    # a 4 x 4 map of 0..15 in four 2 x 2 windows; topk 0.25 of 16 pixels: k = 4, the mean of 12..15
    values = torch.arange(16.0).reshape(4, 4)
    streamed = StreamedScore(ScoreSpec(reduce, topk=0.25), (4, 4))
    for rows in (slice(0, 2), slice(2, 4)):
        for cols in (slice(0, 2), slice(2, 4)):
            streamed.add(rows, cols, values[rows, cols])
    assert float(streamed.result()) == expected


def test_a_streamed_top_k_stays_exact_when_its_candidates_are_cut_back():
    from dualstpm.model.fusion import ScoreSpec, StreamedScore

    # an 8 x 8 map of 0..63 one pixel at a time: k = round(0.05 * 64) = 3, so the candidates
    # are cut back to 3 after every 13th pixel; the top 3 are 61, 62, 63, their mean 62
    values = torch.arange(64.0).reshape(8, 8)
    streamed = StreamedScore(ScoreSpec("topk_mean", topk=0.05), (8, 8))
    for r in range(8):
        for c in range(8):
            streamed.add(slice(r, r + 1), slice(c, c + 1), values[r : r + 1, c : c + 1])
    assert streamed.k == 3 and float(streamed.result()) == 62.0


def test_a_streamed_smoothed_max_is_the_blurred_whole_map_and_a_gap_is_refused():
    from dualstpm.model.fusion import ScoreSpec, StreamedScore, image_score

    values = torch.zeros(6, 6)
    values[2, 3] = 1.0  # a hot pixel next to the windows' border: the blur must cross it
    spec = ScoreSpec("smoothed_max", sigma=1.0)
    streamed = StreamedScore(spec, (6, 6))
    streamed.add(slice(0, 6), slice(0, 3), values[:, :3])
    streamed.add(slice(0, 6), slice(3, 6), values[:, 3:])
    assert float(streamed.result()) == float(image_score(values[None], spec)[0])
    partial = StreamedScore(ScoreSpec("max"), (6, 6))
    partial.add(slice(0, 6), slice(0, 3), values[:, :3])
    with pytest.raises(ValueError, match="covered 18 pixels of a 6 x 6 map"):
        partial.result()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_an_8_bit_frame_is_read_as_bytes_and_scored_as_its_float_image(tmp_path: Path, mode: str):
    from PIL import Image

    from dualstpm.data import read_image, resize_image
    from dualstpm.data.images import as_float_rgb, read_frame
    from dualstpm.data.input_stats import image_statistics
    from dualstpm.model.inference import scale_images

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 30) if mode == "L" else (40, 30, 3), dtype=np.uint8)
    path = tmp_path / "frame.png"
    Image.fromarray(pixels, mode=mode).save(path)
    frame, image = read_frame(path), read_image(path)
    assert frame.dtype == np.uint8 and np.array_equal(frame, pixels)  # 1 or 3 bytes per pixel, as stored
    assert np.array_equal(as_float_rgb(frame), image)
    assert image_statistics(frame) == image_statistics(image)
    at_size = resize_image(frame, (40, 30))
    assert at_size.dtype == torch.uint8 and at_size.shape == (3, 40, 30)  # a view: no float copy of the frame
    assert torch.equal(scale_images(at_size), resize_image(image, (40, 30)))  # / 255 gives the float image
    assert torch.equal(resize_image(frame, 32), resize_image(image, 32))  # any other size: resized in float


def test_a_16_bit_frame_is_read_as_its_float_image(tmp_path: Path):
    from PIL import Image

    from dualstpm.data import read_image
    from dualstpm.data.images import read_frame

    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(path)
    frame = read_frame(path)
    assert frame.dtype == np.float32 and frame.shape == (20, 30, 3)
    assert np.array_equal(frame, read_image(path))
    assert frame[0, 1, 0] == np.float32(100 / 65535)  # pixel value 100, the 16-bit full scale 65535


def test_predict_on_an_8_bit_frame_gives_the_float_frames_numbers(tiled_run: Path, synthetic_root: Path):
    from dualstpm.data import read_image
    from dualstpm.data.images import read_frame
    from dualstpm.detector import Detector
    from dualstpm.predict import score_images

    detector = Detector.load(tiled_run)
    paths = sorted((synthetic_root / "synth_texture" / "test").rglob("*.png"))[:3]
    as_bytes = score_images(detector, [read_frame(p) for p in paths])
    as_floats = score_images(detector, [read_image(p) for p in paths])
    assert read_frame(paths[0]).dtype == np.uint8
    for a, b in zip(as_bytes, as_floats, strict=True):
        assert (a.score, a.stpm_score, a.recon_score, a.label) == (b.score, b.stpm_score, b.recon_score, b.label)
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
