"""The training report end to end: the real batch job on small generated data writes report.html
beside run_summary.json, and headless Chromium (Debian's package, installed by scripts/setup.sh)
opens it and finds every section and every image loaded.

Two runs share one SparkSession: one without cross-validation (the page must say so) and one with
2 folds over a two-point ALS grid, so the CV section has candidates with a spread. The check
script is added to a copy of the page only: the report itself carries no script.

RECO_UPDATE_REPORT_SCREENSHOT=1 also refreshes the README's screenshot (docs/img/) from the CV run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from batch_training.generate import write
from batch_training.job import run
from models.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# A small ALS, one blend weight and the final model folded in (no second fit): seconds per stage.
SMALL = {"batch.als.rank": 8, "batch.als.max_iter": 4, "batch.grid": {}, "batch.scorers.blend_weights": [0.5],
         "batch.final_fit": "fold_in", "batch.write_table": False, "batch.write_topic": False}
SECTIONS = ("overview", "baselines", "cross-validation", "purchases", "lists")
SCREENSHOT = REPO_ROOT / "docs" / "img" / "training-report.png"
# Runs on the page's load event, after every <img> has been fetched and decoded (or failed).
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const body = document.body.dataset;
  body.images = String(images.length);
  body.broken = JSON.stringify(broken);
  body.sections = JSON.stringify(Object.fromEntries(Array.from(document.querySelectorAll("section"))
      .map(s => [s.id, s.querySelectorAll("img").length])));
  body.imagesLoaded = String(images.length > 0 && broken.length === 0);
});
</script>"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report-data")
    write(folder, factor=0.02, seed=11, fmt="csv")      # ~13k rows, 140 customers
    return folder / "transactions.csv"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: scripts/setup.sh installs Debian's package", pytrace=False)
    return path


def _run_job(spark, cfg, folder: Path, sample: Path, caplog, **overrides) -> Path:
    """One run of the job (its own model store, so the gate never weighs one run against the
    other); the report's path, checked to be logged and beside run_summary.json."""
    caplog.clear()
    job_cfg = cfg.with_overrides({"data.path": str(sample), "batch.output_dir": str(folder / "out"),
                                  "model_store.uri": str(folder / "models"), **SMALL, **overrides})
    result = run(job_cfg, spark=spark)
    run_dir = folder / "out" / "versions" / result.version
    report = run_dir / "report.html"
    assert report.is_file() and (run_dir / "run_summary.json").is_file()
    assert f"training report: {report}" in caplog.text
    return report


class _Page(HTMLParser):
    """What the dumped DOM holds: body data attributes, section ids, img sources, each section's text."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.sources: list[str] = []
        self.links: list[str] = []
        self.text: dict[str, str] = {}
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = {k[5:]: v for k, v in attrs.items() if k.startswith("data-")}
        elif tag == "section":
            self._section = attrs.get("id")
            self.text[self._section] = ""
        elif tag == "img":
            self.sources.append(attrs.get("src") or "")
        for name in ("href", "src"):
            if tag in ("link", "script", "a", "iframe") and attrs.get(name):
                self.links.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section:
            self.text[self._section] += data


def _open(chromium: str, report: Path, work: Path) -> _Page:
    """The report (a copy with the check script) loaded in headless Chromium; its DOM after load."""
    work.mkdir(parents=True, exist_ok=True)
    page = work / report.name
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = subprocess.run(_chromium_command(chromium, work, "--dump-dom", page.as_uri()),
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Page()
    parsed.feed(dom.stdout)
    return parsed


def _chromium_command(chromium: str, work: Path, *args: str) -> list[str]:
    return [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
            "--disable-extensions", f"--user-data-dir={work / 'profile'}", *args]


def _check_page(page: _Page, cv_images: int, tradeoff: bool = False) -> None:
    assert page.body.get("images-loaded") == "true", f"images not loaded: {page.body}"
    per_section = json.loads(page.body["sections"])
    assert list(per_section) == list(SECTIONS)
    assert per_section == {"overview": 0, "baselines": 1 + tradeoff, "cross-validation": cv_images, "purchases": 1,
                           "lists": 1}
    assert int(page.body["images"]) == len(page.sources) == 3 + cv_images + tradeoff
    assert ("accuracy against coverage" in page.text["baselines"]) == tradeoff
    # Self-contained: every image is an embedded PNG, nothing is fetched from anywhere.
    assert all(src.startswith("data:image/png;base64,") for src in page.sources)
    assert page.links == []
    baselines = page.text["baselines"]
    for row in ("model", "popularity", "item-kNN", "precision@10", "map@10", "ndcg@10", "coverage", "novelty"):
        assert row in baselines, f"the baseline section lacks {row!r}"
    assert "als" in baselines or "plain ALS" in baselines
    assert "decile 10" in page.text["lists"] and "median" in page.text["purchases"]


def _check_coverage(page: _Page, report: Path) -> None:
    """The catalogue coverage shown is the written lists' own: distinct products / catalogue."""
    import pandas as pd

    lists = pd.read_parquet(report.parent / "recommendations.parquet")
    products = json.loads((report.parent / "run_summary.json").read_text())["stats"]["products"]
    shown = re.search(r"catalogue coverage\s*([\d.]+)% of ([\d,]+) products", page.text["lists"])
    assert shown, page.text["lists"]
    assert int(shown.group(2).replace(",", "")) == products
    distinct = lists["recommendations"].explode().nunique()
    assert float(shown.group(1)) == pytest.approx(100 * distinct / products, abs=0.05)


def test_each_run_writes_a_report_that_chromium_renders_whole(spark, cfg, tmp_path, sample, chromium, caplog):
    caplog.set_level(logging.INFO)

    plain = _run_job(spark, cfg, tmp_path / "plain", sample, caplog, **{"batch.cv_folds": 0})
    page = _open(chromium, plain, tmp_path / "plain-view")
    _check_page(page, cv_images=0)
    _check_coverage(page, plain)
    assert "Cross-validation was off for this run" in page.text["cross-validation"]

    tuned = _run_job(spark, cfg, tmp_path / "tuned", sample, caplog,
                     **{"batch.cv_folds": 2, "batch.grid": {"rank": [4, 8]}, "batch.catalogue_grids": [],
                        "batch.scorers.popularity_penalties": [0, 0.5]})
    page = _open(chromium, tuned, tmp_path / "tuned-view")
    _check_page(page, cv_images=1, tradeoff=True)
    assert "als(penalty=0.5)" in page.text["baselines"], "each penalised scorer has its holdout row"
    cv_text = page.text["cross-validation"]
    summary = json.loads((tuned.parent / "run_summary.json").read_text())
    candidates = summary["metrics"]["cross_validation"]
    assert len(candidates) >= 4, "two ALS ranks x the ALS-based scorers, plus popularity and item-kNN"
    assert any("penalty=0.5" in row["model"] for row in candidates), "the CV weighs the penalised scorers too"
    assert "2-fold cross-validation" in cv_text and "rank=4" in cv_text and "rank=8" in cv_text
    assert len(re.findall(r"\d\.\d{4} ± \d\.\d{4}", cv_text)) == len(candidates)

    # The check is not vacuous: the same page with one image's bytes damaged is reported broken.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "report.html").write_text(tuned.read_text().replace("base64,iVBOR", "base64,AAAAA", 1))
    broken = _open(chromium, damaged / "report.html", tmp_path / "damaged-view")
    assert broken.body.get("images-loaded") == "false" and len(json.loads(broken.body["broken"])) == 1

    if os.environ.get("RECO_UPDATE_REPORT_SCREENSHOT") == "1":
        shot = tmp_path / "tuned-view" / "screenshot.png"
        done = subprocess.run(_chromium_command(chromium, tmp_path / "tuned-view", f"--screenshot={shot}",
                                                "--window-size=1000,1900", tuned.as_uri()),
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
        _save_small(shot, SCREENSHOT)


def _save_small(shot: Path, target: Path) -> None:
    """The screenshot as a palette PNG (a few hundred colours are plenty for charts), well under 300 KB."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(shot).convert("RGB").quantize(colors=128).save(target, optimize=True)
    assert target.stat().st_size < 300_000
