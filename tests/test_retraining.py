"""Retraining that learns from reviewed feedback (issue 24 item 3): the promotion rule on a
champion re-tested on the challenger's data, the reviewed false alarms and their share
above a model's threshold. The whole loop through the Prefect flow is in test_flows.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dualstpm.errors import DataError
from dualstpm.model.inference import InferenceOutput
from dualstpm.mlops.names import RESCORED_TAG
from dualstpm.mlops.promote import Standing, decide
from dualstpm.mlops.retraining import false_alarm_share, reviewed_false_alarms

OLD, NEW = "1" * 32 + ".dir", "2" * 32 + ".dir"


def _version(number: int, data: str, auroc: float, **rescored: dict) -> SimpleNamespace:
    tags = {"dualstpm.data_hash": data, "metric.image_auroc": repr(auroc)}
    tags.update({f"{RESCORED_TAG}{h}": json.dumps(figures) for h, figures in rescored.items()})
    return SimpleNamespace(version=number, tags=tags)


def _decide(challenger, champion, metric: str, min_delta: float, floor: float) -> tuple[bool, str]:
    """The rule on two versions as `promote` reads them: the champion on the challenger's data."""
    ours = Standing.of(challenger, metric)
    return decide(ours, Standing.of(champion, metric, on_data=ours.data_hash), metric, min_delta, floor)


def test_a_champion_tested_on_other_data_is_compared_by_its_re_test_on_the_challengers_data() -> None:
    challenger = _version(2, NEW, 0.80)
    # the champion's own figure (0.90) is on the data before the feedback: not comparable
    promoted, reason = _decide(challenger, _version(1, OLD, 0.90), "image_auroc", 0.0, 0.0)
    assert not promoted and "not comparable" in reason and "re-tests the champion" in reason
    # re-tested on the challenger's data it scores 0.70 there: 0.80 beats it
    promoted, reason = _decide(challenger, _version(1, OLD, 0.90, **{NEW: {"image_auroc": 0.70}}),
                               "image_auroc", 0.0, 0.0)
    assert promoted and "0.8000 beats the champion's 0.7000" in reason and f"re-tested on data {NEW}" in reason
    promoted, reason = _decide(challenger, _version(1, OLD, 0.70, **{NEW: {"image_auroc": 0.85}}),
                               "image_auroc", 0.0, 0.0)
    assert not promoted and "does not beat the champion's 0.8500" in reason
    # on the same data the champion's own figure counts, whatever re-tests it carries
    promoted, reason = _decide(_version(2, OLD, 0.80), _version(1, OLD, 0.90, **{NEW: {"image_auroc": 0.10}}),
                               "image_auroc", 0.0, 0.0)
    assert not promoted and "0.9000" in reason and "re-tested" not in reason


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)
    return path


def test_reviewed_false_alarms_are_the_good_verdicts_on_flagged_parts(tmp_path: Path) -> None:
    category = tmp_path / "part"
    kept = _png(category / "validation" / "good" / "a-1.png", 10)
    _png(category / "train" / "good" / "b-2.png", 10)
    lines = [
        {"sha256": "1", "verdict": "good", "model_label": "defective", "path": "validation/good/a-1.png"},
        {"sha256": "2", "verdict": "good", "model_label": "good", "path": "train/good/b-2.png"},  # no alarm
        {"sha256": "3", "verdict": "defective", "model_label": "defective", "path": "validation/crack/c-3.png"},
        {"sha256": "4", "verdict": "good", "model_label": "defective", "path": "train/good/gone-4.png"},
    ]
    (category / "feedback.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert reviewed_false_alarms(category) == ([kept], ["train/good/gone-4.png"])
    assert reviewed_false_alarms(tmp_path / "no_feedback") == ([], [])


class _Brightness:
    """A scorer whose image score is the image's mean brightness, threshold 0.5."""

    image_size, batch_size, threshold, decision_view, regions = 4, 2, 0.5, "fused", None  # no defect regions
    frame_size, tiling = 4, None  # untiled

    def typical_level(self) -> float:
        return 0.0

    def infer(self, images: torch.Tensor) -> InferenceOutput:
        score = images.mean(dim=(1, 2, 3))
        zeros = torch.zeros_like(score)
        maps = torch.zeros(len(images), 4, 4)
        return InferenceOutput(score, zeros, zeros, maps, zeros, zeros, zeros, maps, maps)


def test_the_false_alarm_share_counts_scores_above_the_threshold(tmp_path: Path) -> None:
    images = [_png(tmp_path / f"{v}.png", v) for v in (51, 153, 230, 128)]  # brightness 0.2, 0.6, 0.9, 0.502
    assert false_alarm_share(_Brightness(), images, 10**6) == {"images": 4, "above_threshold": 3, "share": 0.75}
    assert false_alarm_share(_Brightness(), [], 10**6) == {"images": 0, "above_threshold": 0, "share": None}
    with pytest.raises(DataError, match="data.max_image_pixels = 10"):
        false_alarm_share(_Brightness(), images, 10)  # images above the pixel limit are refused
