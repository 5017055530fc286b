"""The long-sequence benchmark runs (a smoke run at small lengths; the README has the full one)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_longseq_cpu_smoke(tmp_path):
    out = tmp_path / "longseq.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "longseq.py"), "--cpu", "--lengths",
                           "256,512",
                           "--arms", "full+loss+mlp,hf", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["arm"] for r in result["rows"]} == {"full+loss+mlp", "hf"} and len(result["rows"]) == 4
    for arm, summary in result["summary"].items():
        assert summary["bytes_per_token"] > 0 and summary["longest"] > 0, (arm, summary)
    table = proc.stdout.splitlines()
    assert any(line.startswith("full+loss+mlp") for line in table) and "bytes/token vs hf" in proc.stdout
