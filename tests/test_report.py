import json
import shutil
import subprocess

import numpy as np
import pytest

from edgedistill.bench.stats import Latency
from edgedistill.recipe import Recipe
from edgedistill.report import build_report, check_targets, write_report


def fake_models():
    def m(name, role, backend, precision, f1, p50, size):
        samples = np.random.default_rng(0).lognormal(np.log(p50 / 1000), 0.2, 200)
        return {"name": name, "role": role, "backend": backend, "precision": precision,
                "path": f"/x/{name}", "metrics": {"accuracy": f1, "macro_f1": f1},
                "latency": {**Latency.from_seconds(list(samples)).to_dict(), "p50_ms": p50,
                            "p99_ms": p50 * 2}, "size_mb": size, "peak_rss_mb": 100.0}
    return [m("teacher", "teacher", "pytorch", "fp32", 0.50, 20.0, 90.0),
            m("teacher-onnx", "teacher", "onnxruntime", "fp32", 0.50, 10.0, 90.0),
            m("student-onnx", "student", "onnxruntime", "fp32", 0.49, 3.0, 40.0),
            m("student-int8", "student", "onnxruntime", "int8", 0.49, 1.5, 10.0)]


def test_targets():
    targets = {t["target"]: t for t in check_targets(fake_models())}
    assert len(targets) == 4
    f1 = next(t for name, t in targets.items() if name.startswith("student int8 macro-F1"))
    assert f1["measured"] == 0.98 and f1["met"]
    onnx = next(t for name, t in targets.items() if "ONNX fp32 (p50)" in name)
    assert onnx["measured"] == pytest.approx(10.0 / 1.5, abs=1e-3) and onnx["met"]
    size = next(t for name, t in targets.items() if "size" in name)
    assert size["measured"] == 0.25 and size["met"]


def written_report(tmp_path, name="default"):
    recipe = Recipe(name=name)
    models = fake_models()
    records = {"evaluate": {"models": {m["name"]: m["metrics"] for m in models}, "test_rows": 7},
               "bench": {"models": {m["name"]: {"latency": m["latency"], "size_mb": m["size_mb"]}
                                    for m in models}}}
    report = build_report(recipe, [{k: m[k] for k in ("name", "role", "backend", "precision",
                                                      "path")} for m in models], records)
    write_report(report, tmp_path)
    return report


def test_report_files_and_escaping(tmp_path):
    written_report(tmp_path, name="<script>alert(1)</script>")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["models"][0]["latency"]["p50_ms"] == 20.0 and data["test_rows"] == 7
    assert data["environment"]["libraries"]["onnxruntime"]
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    # quality vs latency, latency distribution, size and memory
    assert page.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_distribution.png", "quality_vs_latency.png", "size.png"]
    assert "| student-int8 |" in (tmp_path / "report.md").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_a_browser(tmp_path):
    """report.html as a person sees it: headless Chromium draws the page, and the plots' blue
    and orange (matplotlib's tab:blue, tab:orange, used nowhere else on the page) must be on
    the screenshot, so the embedded images decoded and displayed."""
    import matplotlib.image

    written_report(tmp_path)
    shot = tmp_path / "page.png"
    # flags as for a sandboxed CI machine: no network, a throwaway profile
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}",
                    (tmp_path / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30).sum())

    assert count((31, 119, 180)) > 2000 and count((255, 127, 14)) > 500
