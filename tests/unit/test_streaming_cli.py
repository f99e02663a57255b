"""python -m streaming refuses a bad setting with exit 2, before it starts Spark or any client."""
from __future__ import annotations

import os
import subprocess
import sys

from models.config import REPO_ROOT


def run_streaming(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECO")}
    return subprocess.run([sys.executable, "-m", "streaming"], cwd=REPO_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_an_unsupported_client_option_exits_2_naming_the_option_not_its_value():
    result = run_streaming(RECO__KAFKA__CLIENT_OPTIONS__SASL__LOGIN__CLASS="s3cret-value")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sasl.login.class" in result.stderr and "s3cret-value" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_streaming_setting_exits_2():
    result = run_streaming(RECO__STREAMING__SINK_OUTAGE_TOLERANCE="soon")
    assert result.returncode == 2 and "streaming.sink_outage_tolerance" in result.stderr, result.stderr[-2000:]


def test_a_bad_attributes_file_exits_2_naming_the_file_and_the_row(tmp_path):
    path = tmp_path / "attributes.csv"
    path.write_text("product_id,margin,in_stock,category\nP1,0.2,true,food\nP2,0.1,sometimes,food\n")
    result = run_streaming(RECO__BUSINESS_RULES__ATTRIBUTES=str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{path}: column in_stock, row 2: 'sometimes' is not a boolean" in result.stderr
    assert "Traceback" not in result.stderr
