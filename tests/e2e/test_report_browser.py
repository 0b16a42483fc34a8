"""report.html in a real browser: headless Chromium (Debian package ``chromium``) renders the page of a real run.

Chromium is driven from its command line (no driver, nothing downloaded): ``--dump-dom`` after load returns
the page with a probe's findings (every image decoded, its box on the page, script errors), ``--screenshot``
at laptop width keeps what a reader sees, and ``--enable-logging=stderr`` shows every console message. The
test fails on any console message or error, on an image that did not decode or has no area, on a plot that
is blank in the screenshot, and on a page wider than the laptop screen. The screenshot is saved in the run
directory (``report-1366.png``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTH, HEIGHT = 1366, 768  # a common laptop screen
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium; see .ci/run)")

# In <head>: record script errors, failed resource loads and console errors/warnings before the page runs.
_HOOKS = ("<script>window.__errors=[];window.addEventListener('error',function(e){__errors.push(e.message||"
          "('failed to load '+((e.target&&(e.target.src||e.target.href))||'?').slice(0,80)))},true);"
          "['error','warn'].forEach(function(l){var o=console[l];console[l]=function(){__errors.push(l+': '+"
          "Array.prototype.join.call(arguments,' '));o.apply(console,arguments)}});</script>")
# After load: every image's decode state and box, the page size, and the errors, as JSON in <pre id=__probe>.
_PROBE = ("<script>window.addEventListener('load',function(){var imgs=Array.prototype.map.call(document.images,"
          "function(i){var r=i.getBoundingClientRect(),s=i.closest('section'),c=getComputedStyle(i);return {"
          "section:s?s.id:'',alt:i.alt,complete:i.complete,natural:[i.naturalWidth,i.naturalHeight],"
          "box:[r.left+scrollX,r.top+scrollY,r.width,r.height],shown:c.display!=='none'&&c.visibility!=='hidden'"
          "&&parseFloat(c.opacity)>0}});var p=document.createElement('pre');p.id='__probe';p.textContent="
          "JSON.stringify({errors:__errors,images:imgs,height:document.documentElement.scrollHeight,"
          "width:document.documentElement.scrollWidth,viewport:innerWidth});document.body.appendChild(p)});"
          "</script>")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? (.*)")


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with a fresh profile, no network services, console messages on stderr."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1", "--mute-audio",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
            *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def inspect_page(page: Path, screenshot: Path, workdir: Path) -> dict[str, Any]:
    """Render ``page`` in headless Chromium; return what went wrong and save a full-page laptop screenshot.

    Returns:
        ``console``: console messages; ``errors``: script/resource errors and console errors the probe
        caught; ``broken``: images that did not decode or have no area; ``blank``: images whose pixels in
        the screenshot are (nearly) uniform; ``too_wide``: the page is wider than the screen;
        ``images``: the probe's list; ``height``: the page height in CSS pixels.
    """
    from PIL import Image

    text = page.read_text(encoding="utf-8")
    probe_page = workdir / "probe.html"
    head = text.index("<head>") + len("<head>") if "<head>" in text else 0
    body_end = text.rindex("</body>") if "</body>" in text else len(text)
    probe_page.write_text(text[:head] + _HOOKS + text[head:body_end] + _PROBE + text[body_end:], encoding="utf-8")
    dom = _chromium(probe_page.as_uri(), workdir / "profile-probe", f"--window-size={WIDTH},{HEIGHT}", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the probe did not run: " + dom.stderr[-2000:]
    import html as _html

    probe = json.loads(_html.unescape(found.group(1)))
    height = max(HEIGHT, int(probe["height"]))
    shot = _chromium(page.as_uri(), workdir / "profile-shot", f"--window-size={WIDTH},{height}",
                     f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    console = [m.group(1) for line in (dom.stderr + shot.stderr).splitlines() if (m := _CONSOLE.search(line))]
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float32)
    broken, blank = [], []
    for img in probe["images"]:
        x, y, w, h = (int(round(v)) for v in img["box"])
        if not (img["complete"] and min(img["natural"]) > 0 and w > 0 and h > 0 and img["shown"]):
            broken.append(img)
            continue
        crop = pixels[max(0, y):y + h, max(0, x):x + w]
        # A plot has axes, text and data: many distinct colours and spread; a blank or failed one has neither.
        colours = len(np.unique(crop.reshape(-1, 3).astype(np.uint8), axis=0)) if crop.size else 0
        if crop.size == 0 or float(crop.std()) < 5.0 or colours < 8:
            blank.append({**img, "std": float(crop.std()) if crop.size else 0.0, "colours": colours})
    return {"console": console, "errors": probe["errors"], "broken": broken, "blank": blank,
            "too_wide": probe["width"] > probe["viewport"], "images": probe["images"], "height": height}


# ------------------------------------------------------------------------------------------------ the run


def _experiment_json(directory: Path) -> None:
    """An experiment.json in the documented shape (docs/report.md), as `lungmae experiment` leaves beside a run."""
    arms = []
    for name, base in (("federated MAE -> fine-tune", 0.55), ("federated scratch", 0.45), ("local only", 0.4)):
        results = [{"k": k, "seeds": 3,
                    "balanced_accuracy": {"mean": base + 0.04 * i, "ci95": [base + 0.04 * i - 0.08,
                                                                             base + 0.04 * i + 0.07]},
                    "roc_auc": {"mean": base + 0.1 + 0.03 * i, "ci95": [base + 0.03 * i, base + 0.2 + 0.03 * i]}}
                   for i, k in enumerate((4, 8, 16, 32))]
        arms.append({"name": name, "results": results})
    (directory / "experiment.json").write_text(json.dumps({
        "primary_endpoint": {"description": "balanced accuracy of federated MAE minus federated scratch at k = 8",
                             "difference": 0.1, "ci95": [0.02, 0.18]},
        "profile": "quick", "seeds": 3, "chance": 0.25, "arms": arms}), encoding="utf-8")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory written by the real federation runner (1 + 1 rounds, two small sites), plus the parts a
    run gets from elsewhere: an experiment.json. The cross-site matrix is the runner's own."""
    pytest.importorskip("flwr")
    from client.client_app import make_client_app
    from server.federation_config import federation_from_mapping
    from server.runner import FederationRunner
    from tests.federated_helpers import InProcessGrid, prepared_sites

    sites = prepared_sites(tmp_path_factory.mktemp("browser-sites"))
    run_dir = tmp_path_factory.mktemp("browser-run") / "run"
    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 1, "lr": 1e-3}, "finetune": {"rounds": 1, "lr": 1e-3}},
        "run-dir": str(run_dir), "round-timeout-s": 30}, source="test")
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    FederationRunner(cfg, InProcessGrid(make_client_app(sites), [{"partition-id": i} for i in range(2)])).run()
    summary = json.loads((run_dir / "metrics.json").read_text())
    # the runner's own cross-site step: the global model and both sites' local copies, scored at both sites
    matrix = summary["final"]["cross_site"]
    assert matrix["models"] == ["global", "site0", "site1"] and matrix["data_sites"] == ["site0", "site1"]
    _experiment_json(run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_of_a_real_run_renders_cleanly_in_chromium(real_run: Path, tmp_path: Path) -> None:
    from server.report import render_report

    page = render_report(real_run)
    screenshot = real_run / f"report-{WIDTH}.png"
    result = inspect_page(page, screenshot, tmp_path)
    assert result["console"] == [] and result["errors"] == [], (result["console"], result["errors"])
    assert result["broken"] == [], result["broken"]
    assert result["blank"] == [], result["blank"]
    assert not result["too_wide"], "the page is wider than a laptop screen"
    sections = {img["section"] for img in result["images"]}
    assert {"experiment", "loss", "reconstructions", "final-metrics", "cross-site", "participation",
            "bytes"} <= sections
    assert all(img["box"][2] <= WIDTH for img in result["images"])
    assert screenshot.stat().st_size > 50_000


def test_the_probe_catches_errors_broken_and_blank_images(tmp_path: Path) -> None:
    """The checks above can fail: a script error, an undecodable image and a blank one are all reported."""
    import base64
    import io

    from PIL import Image

    def png(array: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    noise = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body style='margin:0'>"
        f"<section id='good'><img src='{png(noise)}' alt='noise'></section>"
        f"<section id='blank'><img src='{png(np.full((120, 200, 3), 255, np.uint8))}' alt='white'></section>"
        "<section id='broken'><img src='data:image/png;base64,iVBORw0KGgo=' alt='truncated'></section>"
        "<div style='width:2000px'>wide</div><script>console.error('boom'); notDefined();</script></body></html>")
    result = inspect_page(page, tmp_path / "bad.png", tmp_path)
    assert any("boom" in m for m in result["console"]) and any("notDefined" in e for e in result["errors"])
    assert [i["section"] for i in result["broken"]] == ["broken"]
    assert [i["section"] for i in result["blank"]] == ["blank"]
    assert result["too_wide"]
