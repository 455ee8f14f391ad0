"""README.md's measured tables are what their result files say (tools/readme_numbers.py --check)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_numbers_match_their_result_files():
    tool = runpy.run_path(str(REPO / "tools" / "readme_numbers.py"))
    readme = (REPO / "README.md").read_text()
    assert readme.count("<!-- numbers: ") == len(tool["MAKERS"])
    assert tool["render"](readme) == readme, "run: python tools/readme_numbers.py"


def test_the_demo_result_file_meets_the_demos_target():
    """The committed demo run: peak memory above the model <= 0.6x torch AdamW's, held-out loss within 3 %."""
    runs = {r["name"]: r for r in json.loads((REPO / "docs" / "demo_results.json").read_text())["results"]}
    ours, adamw = runs["lowrank_compile"], runs["torch AdamW"]
    assert ours["peak_above_mib"] <= 0.6 * adamw["peak_above_mib"]
    assert abs(ours["final_eval"] / adamw["final_eval"] - 1) <= 0.03


def test_python_m_lowrank_compile_prints_the_version_and_where_to_start():
    import subprocess
    import sys

    import lowrank_compile

    out = subprocess.run([sys.executable, "-m", "lowrank_compile"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith(f"lowrank_compile {lowrank_compile.__version__}:")
    assert "python -m lowrank_compile.demo" in out.stdout and "python -m lowrank_compile.inspect" in out.stdout


def test_the_version_is_written_once_and_the_package_ships_its_type_marker():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and '\nversion = "' not in pyproject
    assert 'attr = "lowrank_compile.__version__"' in pyproject
    assert (REPO / "lowrank_compile" / "py.typed").exists() and '"py.typed"' in pyproject
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
