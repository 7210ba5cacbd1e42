"""Folders as users have them: hidden files and folders, one unreadable file among many,
line-scan images beyond PIL's decompression-bomb limit."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import PROJECT_ROOT, TINY_OVERRIDES, strict_json
from dualstpm.config import load_params
from dualstpm.data import image_size_of, list_images, load_category, read_image, read_mask
from dualstpm.data.images import read_image_bytes
from dualstpm.detector import Detector
from dualstpm.errors import DataError
from dualstpm.evaluation import test_run
from dualstpm.mlops.mlflow_model import DualStpmPyfunc
from dualstpm.predict import collect_images, predict
from dualstpm.training import fit


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --- hidden files and folders -------------------------------------------------------------

def test_hidden_files_and_folders_are_skipped_in_a_folder_walk(tmp_path: Path) -> None:
    gray = np.full((8, 8), 90, np.uint8)
    visible = [_png(tmp_path / "a.png", gray), _png(tmp_path / "sub" / "b.png", gray)]
    _png(tmp_path / ".hidden.png", gray)
    _png(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", gray)
    _png(tmp_path / "sub" / ".cache" / "deep" / "c.png", gray)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden, not an image
    (tmp_path / "sub" / "._b.png").write_bytes(b"\0\5\26\7")  # macOS AppleDouble: an image suffix, no image
    (tmp_path / "notes.txt").write_text("not data")
    assert collect_images([tmp_path]) == visible
    assert list_images(tmp_path, recursive=True) == visible
    assert list_images(tmp_path) == visible[:1]
    # a hidden file or folder named explicitly is what the user asked for
    assert collect_images([tmp_path / ".hidden.png"]) == [tmp_path / ".hidden.png"]
    assert collect_images([tmp_path / ".ipynb_checkpoints"]) == [tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png"]
    _png(tmp_path / "only_hidden" / ".x" / "a.png", gray)
    with pytest.raises(DataError, match="hidden files and folders are skipped"):
        collect_images([tmp_path / "only_hidden"])


def test_hidden_files_and_folders_are_skipped_in_the_dataset_layout(tmp_path: Path) -> None:
    folder = tmp_path / "part"
    gray = np.full((6, 8), 90, np.uint8)
    for name in ("000.png", "001.png"):
        _png(folder / "train" / "good" / name, gray)
    _png(folder / "test" / "good" / "000.png", gray)
    _png(folder / "test" / "crack" / "000.png", gray)
    _png(folder / "ground_truth" / "crack" / "000_mask.png", np.full((6, 8), 255, np.uint8))
    for junk in (folder / "train" / "good" / "._000.png", folder / "test" / "crack" / "._000.png",
                 folder / "ground_truth" / "crack" / "._000_mask.png"):
        junk.write_bytes(b"\0\5\26\7")
    _png(folder / "test" / ".ipynb_checkpoints" / "000-checkpoint.png", gray)
    category = load_category(tmp_path, "part")
    assert [p.name for p in category.train] == ["000.png", "001.png"]
    assert [(s.defect_type, s.path.name) for s in category.test] == [("crack", "000.png"), ("good", "000.png")]
    assert category.test[0].mask_path == folder / "ground_truth" / "crack" / "000_mask.png"


# --- one bad file never loses the batch ---------------------------------------------------

def _batch(synthetic_root: Path, folder: Path) -> list[Path]:
    """Two real test images, a non-image and a truncated PNG, plus a hidden copy."""
    source = sorted((synthetic_root / "synth_texture" / "test" / "good").glob("*.png"))[:2]
    good = [Path(shutil.copy(path, folder / f"{name}.png")) for name, path in zip(("a", "d"), source, strict=True)]
    (folder / "b.png").write_text("not a picture")
    whole = source[0].read_bytes()
    (folder / "c.png").write_bytes(whole[: len(whole) // 2])
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "b.png").write_text("not a picture either")
    return good


def test_unreadable_files_get_a_row_and_every_other_image_is_scored(trained_run: Path, synthetic_root: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = _batch(synthetic_root, folder)
    detector = Detector.load(trained_run)
    table = predict(detector, [folder], tmp_path / "out")
    alone = predict(detector, good, tmp_path / "alone")  # the readable ones without the bad ones
    assert [Path(p).name for p in table["path"]] == ["a.png", "b.png", "c.png", "d.png"]
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(csv["path"]) == list(table["path"])
    bad = csv[csv["error"] != ""]
    assert [Path(p).name for p in bad["path"]] == ["b.png", "c.png"]
    assert all(str(folder / name) in error for name, error in zip(("b.png", "c.png"), bad["error"], strict=True))
    assert (bad[["score", "label", "overlay"]] == "").all().all()
    scored = table[table["error"] == ""]
    np.testing.assert_array_equal(scored["score"].to_numpy(), alone["score"].to_numpy())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_overlay.png", "d_overlay.png", "monitor", "predictions.csv",
                                                                   "regions.jsonl"]  # the defect regions of a and d


def test_predict_command_exits_2_after_scoring_the_rest(trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _batch(synthetic_root, folder)
    done = subprocess.run([sys.executable, "-m", "dualstpm", "predict", "--run", str(trained_run), str(folder),
                           "--out", str(tmp_path / "out")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "2 of 4 images could not be read" in done.stderr
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 4


# --- very large images ----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["png", "tif"])  # TIFF checks PIL's guard again while decoding
def test_line_scan_frame_is_read_and_pil_guard_is_restored(tmp_path: Path, suffix: str) -> None:
    """16384 x 12288 = 201,326,592 px: over twice PIL's default limit (2 x 89,478,485), so
    PIL alone refuses it as a decompression bomb; the default data.max_image_pixels admits it."""
    path = tmp_path / f"line_scan_mask.{suffix}"
    frame = Image.new("1", (16384, 12288))
    frame.paste(1, (100, 200, 110, 205))  # a 10 x 5 defect
    frame.save(path, **({"compression": "tiff_deflate"} if suffix == "tif" else {}))
    del frame
    guard = Image.MAX_IMAGE_PIXELS
    assert image_size_of(path) == (16384, 12288)
    mask = read_mask(path)
    assert mask.shape == (12288, 16384) and int(mask.sum()) == 50
    assert Image.MAX_IMAGE_PIXELS == guard  # PIL's guard is back, for everyone else
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_image_just_over_the_limit_names_the_param_and_is_not_called_corrupt(tmp_path: Path) -> None:
    path = _png(tmp_path / "wide.png", np.full((60, 100), 90, np.uint8))  # 6000 px
    assert read_image(path, max_pixels=6000).shape == (60, 100, 3)
    for read in (read_image, read_mask):
        with pytest.raises(DataError) as caught:
            read(path, max_pixels=5999)
        message = str(caught.value)
        assert str(path.absolute()) in message and "100 x 60 = 6000 pixels" in message
        assert "data.max_image_pixels = 5999" in message and "--set data.max_image_pixels=8192" in message
        assert "not corrupt" in message and "truncated" not in message
    with pytest.raises(DataError, match="input row 3 is 100 x 60"):
        read_image_bytes(path.read_bytes(), "input row 3", max_pixels=5999)


def test_default_limit_refuses_one_row_more_than_16384_squared(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (16384, 16385)).save(path)
    with pytest.raises(DataError, match=r"16384 x 16385 = 268451840 pixels, above the limit data.max_image_pixels "
                                        r"= 268435456.*--set data.max_image_pixels=536870912"):
        read_mask(path)


def test_every_reader_honours_the_configured_limit(trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """Synthetic images are 64 x 64 = 4096 px: a limit of 4095 refuses each of them."""
    small = load_params(None, [*TINY_OVERRIDES, "data.max_image_pixels=4095"])
    with pytest.raises(DataError, match="data.max_image_pixels = 4095"):
        fit(small, synthetic_root, "synth_texture", tmp_path / "fit")
    assert not (tmp_path / "fit" / "model").exists()
    run = shutil.copytree(trained_run, tmp_path / "run")
    with pytest.raises(DataError, match="data.max_image_pixels = 4095"):
        test_run(run, synthetic_root, "synth_texture", max_pixels=4095)
    image = sorted((synthetic_root / "synth_texture" / "test" / "good").glob("*.png"))[0]
    table = predict(Detector.load(run), [image], tmp_path / "pred", max_pixels=4095)
    assert "data.max_image_pixels = 4095" in table["error"].iloc[0]
    served = DualStpmPyfunc()
    served.detector = Detector.load(run)
    served.detector.params.data.max_image_pixels = 4095  # as if trained with that limit
    with pytest.raises(MlflowException, match="column 'image', row 0 is 64 x 64"):  # HTTP 400 when served
        served.predict(None, pd.DataFrame({"image": [image.read_bytes()]}))
    buffer = io.BytesIO()
    Image.open(image).save(buffer, format="PNG")
    served.detector.params.data.max_image_pixels = 4096
    assert len(served.predict(None, pd.DataFrame({"image": [buffer.getvalue()]}))) == 1


# --- the served model's answers --------------------------------------------------------------

def test_served_answer_is_strict_json_with_null_for_the_missing_disc_score(trained_run: Path, synthetic_root: Path) -> None:
    """What `mlflow models serve` writes for an answer (MLflow's own serialiser) parses strictly:
    this model has no discriminative stage, so `disc_score` is null in every row."""
    from mlflow.pyfunc.scoring_server import predictions_to_json

    served = DualStpmPyfunc()
    served.detector = Detector.load(trained_run)
    images = sorted((synthetic_root / "synth_texture" / "test" / "good").glob("*.png"))[:2]
    answer = served.predict(None, pd.DataFrame({"image": [p.read_bytes() for p in images]}), {"return_map": True})
    assert answer["disc_score"].isna().all() and answer["score"].notna().all()
    body = io.StringIO()
    predictions_to_json(answer, body)
    rows = strict_json(body.getvalue())["predictions"]
    assert [row["disc_score"] for row in rows] == [None, None]
    assert all(isinstance(row["score"], float) and len(row["anomaly_map"]) == 64 for row in rows)


def test_served_non_image_names_the_column_row_and_index_and_what_to_send(trained_run: Path, synthetic_root: Path) -> None:
    served = DualStpmPyfunc()
    served.detector = Detector.load(trained_run)
    png = sorted((synthetic_root / "synth_texture" / "test" / "good").glob("*.png"))[0].read_bytes()
    for second, names, says in (
        (b"just some text", "column 'image', row 1 (index 'b')", "starting b'just some text'"),
        (base64.b64encode(png), "column 'image', row 1 (index 'b')", "base64 text of an image"),  # encoded twice
    ):
        with pytest.raises(MlflowException) as caught:
            served.predict(None, pd.DataFrame({"image": [png, second]}, index=["a", "b"]))
        message = caught.value.message
        assert caught.value.get_http_status_code() == 400
        assert names in message and says in message
        assert "base64 text of those bytes" in message and "PNG, JPEG" in message  # what to send
        assert "BytesIO" not in message and "object at 0x" not in message and "Replace or remove" not in message
    with pytest.raises(MlflowException, match=r"column 'image', row 0: expected an encoded image file's bytes, got str"):
        served.predict(None, pd.DataFrame({"image": ["000.png"]}))  # a file name is not the file
