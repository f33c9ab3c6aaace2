"""Every plot in reports/ (recursive) was drawn from its JSON as it is now.

Benchmarks stamp each PNG with the sha256 of the JSON it was drawn from
(`benchmarks/_plots.py`); a JSON edited or re-written without redrawing its
plots (`benchmarks/redraw.py`) fails here.
"""

import importlib.util
import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_plots_module():
    # Loaded by path: putting benchmarks/ on sys.path would let its scripts shadow packages.
    spec = importlib.util.spec_from_file_location("benchmarks_plots", ROOT / "benchmarks" / "_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plots = load_plots_module()


def test_every_report_plot_matches_its_json():
    pngs = sorted((ROOT / "reports").rglob("*.png"))
    assert len(pngs) >= 8  # the reports of six benchmarks, one of them twice
    assert plots.stale_plots(ROOT / "reports") == []


def test_a_changed_or_missing_json_or_an_unstamped_plot_is_reported(tmp_path):
    (tmp_path / "sub").mkdir()
    source = tmp_path / "sub" / "r.json"
    source.write_text(json.dumps({"x": [1, 2]}))
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    plots.save_plot(fig, tmp_path / "sub" / "r.png", source)
    assert plots.stale_plots(tmp_path) == []

    source.write_text(json.dumps({"x": [1, 3]}))
    assert plots.stale_plots(tmp_path) == [f"{tmp_path / 'sub' / 'r.png'}: r.json changed since the plot was drawn (redraw it)"]
    source.unlink()
    assert "does not exist" in plots.stale_plots(tmp_path)[0]

    fig, ax = plt.subplots()
    fig.savefig(tmp_path / "plain.png")  # no stamp
    plt.close(fig)
    assert any("plain.png: no tfrec-source" in p for p in plots.stale_plots(tmp_path))

    with pytest.raises(ValueError, match="same folder"):
        fig, ax = plt.subplots()
        plots.save_plot(fig, tmp_path / "a.png", tmp_path / "sub" / "r.json")
