"""The documentation's code runs as written: every ``python`` block of docs/your_model.md, in order,
in a fresh folder (it writes its own tiny model and texts), and its printed checks hold."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def test_your_model_page_runs(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    code = "\n\n".join(_blocks("docs/your_model.md"))
    script = tmp_path / "page.py"
    script.write_text("import torch\ntorch.manual_seed(0)\ntorch.set_num_threads(1)\n" + code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    base = float(re.search(r"baseline: cosine to FP ([0-9.]+)", out).group(1))
    qwt = float(re.search(r"\+ QwT: cosine to FP ([0-9.]+)", out).group(1))
    assert qwt > base, out  # QwT moves the quantized encoder towards the FP one
    assert "reloaded model gives the same outputs: True" in out
