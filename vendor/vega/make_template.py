"""Rebuild `dvc_plots.html`: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined.

`dvc plots show` normally loads these three libraries from a CDN, so its page is blank
offline. `.dvc/config` points `plots.html_template` at the page this script writes, which
carries the libraries' minified builds inside it (DVC fills `{plot_divs}` and
`{refresh_tag}`; without a `{scripts}` placeholder it adds no CDN tags).

    python vendor/vega/make_template.py          # needs `npm` and the npm registry

The versions are pinned here and listed in README.md; the licences are beside this file.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "dvc_plots.html"
LIBRARIES = (("vega", "5.33.1"), ("vega-lite", "5.23.0"), ("vega-embed", "6.29.0"))  # UMD builds, load order

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite, Vega-Embed inlined (BSD-3-Clause, University of Washington Interactive
         Data Lab; see vendor/vega/): this page needs no network. -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def minified(name: str, version: str, into: Path) -> str:
    """`build/<name>.min.js` of the npm package `name@version`, fetched with `npm pack`."""
    subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=into, check=True, capture_output=True)
    with tarfile.open(into / f"{name}-{version}.tgz") as archive:
        member = archive.extractfile(f"package/build/{name}.min.js")
        if member is None:
            sys.exit(f"{name}@{version} has no build/{name}.min.js")
        code = member.read().decode("utf-8")
    if "</script" in code:
        sys.exit(f"{name}@{version} contains '</script' and cannot be inlined")
    return code


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        scripts = "\n".join(
            f'    <script>/* {name}@{version} */\n{minified(name, version, Path(folder))}\n    </script>'
            for name, version in LIBRARIES
        )
    TEMPLATE.write_text(PAGE.replace("SCRIPTS", scripts), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
