"""studies/seeds.py: one fit, test and ablation per seed, written seed by seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT


@pytest.mark.slow
def test_seeds_reports_each_seed_and_the_ablation_decision(synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "seeds.json"
    command = [sys.executable, "-m", "studies.seeds", "--data-root", str(synthetic_root),
               "--category", "synth_texture", "--seeds", "0,1", "--set", "image_size=64", "--set", "fit.epochs=1",
               "--set", "fit.device=cpu", "--set", "ablation.panel_images=0", "--work-dir", str(tmp_path / "runs"),
               "--out", str(out)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert list(saved) == ["0", "1"]
    for seed, row in saved.items():
        metrics = json.loads((tmp_path / "runs" / f"synth_texture_{seed}" / "metrics.json").read_text())
        for view in ("fused", "stpm", "recon"):  # the figures are `dualstpm test`'s
            assert row["views"][view]["image_auroc"] == metrics[view]["image_auroc"]
        decision = row["ablation"]["decision"]
        assert decision.startswith("adopted" if row["ablation"]["adopted"] else "kept the default")
    assert saved["0"]["views"] != saved["1"]["views"]  # another seed, another fit
    # a rerun skips the seeds already written
    again = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.read_text()) == saved and "synth_texture 0" not in again.stdout
