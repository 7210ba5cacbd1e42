"""The documentation site builds with warnings as errors, and a broken link does fail it.

Both tests run the real `mkdocs build` (Material theme, mkdocstrings reading the package's
docstrings) in a subprocess, as `make docs` does, into the test's own folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

CONFIG = PROJECT_ROOT / "mkdocs.yml"


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `config` into `site_dir`, run from the project root."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mkdocs is not installed in this environment: install the docs extra, "
                    "`pip install -e '.[docs]'` (`make install` does)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_docs_build_strict(tmp_path: Path) -> None:
    done = mkdocs_build(CONFIG, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    # the front page, a guide page, a results page and a generated API page are all there
    for page in ("index.html", "parameters/index.html", "results/index.html", "reference/config/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    # rendered from the module's docstrings, not an empty page: the Params class has its anchor
    assert 'id="dualstpm.config.Params"' in api


@pytest.mark.slow
def test_docs_build_fails_on_broken_link_and_reference(tmp_path: Path) -> None:
    """The same configuration over a copy of docs/ with one dead link, one dead anchor and one
    unresolved API reference added: the strict build must fail and name all three."""
    docs = tmp_path / "docs"
    shutil.copytree(PROJECT_ROOT / "docs", docs)
    with (docs / "cli.md").open("a", encoding="utf-8") as page:
        page.write("\n[gone](no-such-page.md), [no anchor](parameters.md#no-such-anchor), "
                   "[no object][dualstpm.config.NoSuchThing]\n")
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["docs_dir"] = str(docs)
    for plugin in config["plugins"]:  # the API pages still read the project's package
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(PROJECT_ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no-such-page.md" in output
    assert "no-such-anchor" in output
    assert "dualstpm.config.NoSuchThing" in output
