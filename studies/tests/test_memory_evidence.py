"""The memory lever's validation evidence (`studies.memory_evidence`) on a tiny fitted run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_evidence_of_the_three_views_and_the_fused_test_figures_match_dualstpm_test(trained_run: Path,
                                                                                     synthetic_root: Path):
    from dualstpm.compute import Compute
    from dualstpm.evaluation import test_run
    from studies.memory_evidence import VIEWS, evidence, markdown

    result = evidence(trained_run, synthetic_root, "synth_texture", ratio=0.05, per_image=2)
    library = test_run(trained_run, synthetic_root, "synth_texture", Compute.resolve("cpu", "float32"))
    # the fused view's test figures are `dualstpm test`'s (float16 rounding of its stored maps aside)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert result["test"]["fused"][key] == pytest.approx(library["fused"][key], abs=1e-3), key
    # 4 validation images, calibration.split 0.5: 2 select; 2 pasted copies of each
    assert result["selection_images"] == 2 and result["synthetic_copies"] == 4
    assert result["validation"]["real"] is None  # the synthetic category has no validation/<defect> folder
    for view in VIEWS:
        figures = result["validation"]["synthetic"][view]
        assert 0.0 <= figures["image_auroc"] <= 1.0 and 0.0 <= figures["pixel_auroc"] <= 1.0, view
    table = markdown(result)
    assert table.count("\n| ") == 2 + len(VIEWS) - 1 and "no real validation defects" in table
