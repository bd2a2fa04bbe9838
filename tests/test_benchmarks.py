"""Benchmarks cannot rot: every script in benchmarks/ runs its ``--quick`` CPU mode and writes valid JSON.

The list is read from the folder, so a new benchmark is covered (and must offer ``--quick`` and ``--out``)
without editing this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _json_outputs(out: Path) -> list[Path]:
    """The JSON files a benchmark wrote at ``out`` (a file path or a directory)."""
    if out.is_file():
        return [out]
    return sorted(out.rglob("*.json")) if out.is_dir() else []


def test_benchmarks_folder_is_not_empty() -> None:
    assert len(BENCHMARKS) >= 5, [p.name for p in BENCHMARKS]


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_quick_mode_writes_json(script: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{script.stem}_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{script.name} --quick failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.strip(), f"{script.name} printed no table"
    files = _json_outputs(out)
    assert files, f"{script.name} --quick wrote no JSON under {out}"
    for f in files:
        data = json.loads(f.read_text())  # valid JSON (no NaN literals: json.loads accepts them, so check below)
        assert data, f"{f} is empty"
        assert "NaN" not in f.read_text(), f"{f} holds NaN, which is not valid JSON"
