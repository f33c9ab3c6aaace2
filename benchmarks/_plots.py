"""Plots that cannot go stale: every report PNG carries the sha256 of its JSON.

Each benchmark writes its results as `reports/<name>.json` and draws its plots
from that JSON alone (its `write_reports(payload, out)`; `benchmarks/redraw.py`
calls it for existing JSON). `save_plot` writes the figure with two PNG tEXt
chunks: `tfrec-source` (the JSON's file name, beside the PNG) and
`tfrec-source-sha256` (the sha256 of the JSON's bytes when the plot was
drawn). `tests/test_reports.py` fails when a plot in `reports/` lacks them or
its JSON has changed since.

Example:
>>> import json, tempfile
>>> from pathlib import Path
>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> out = Path(tempfile.mkdtemp())
>>> _ = (out / "demo.json").write_text(json.dumps([1, 2, 3]))
>>> fig, ax = plt.subplots()
>>> _ = ax.plot([1, 2, 3])
>>> save_plot(fig, out / "demo.png", out / "demo.json")
>>> plot_source(out / "demo.png") == ("demo.json", sha256_file(out / "demo.json"))
True
>>> stale_plots(out)
[]
"""

import hashlib
from pathlib import Path

SOURCE_KEY = "tfrec-source"
SHA256_KEY = "tfrec-source-sha256"


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_plot(fig, png_path, json_path, dpi=100):
    """Save `fig` as `png_path`, stamped with the name and sha256 of `json_path`
    (which must be written first and sit in the same folder), then close it."""
    import matplotlib.pyplot as plt

    png_path, json_path = Path(png_path), Path(json_path)
    if json_path.resolve().parent != png_path.resolve().parent:
        raise ValueError(f"plot {png_path} and its JSON {json_path} must be in the same folder")
    metadata = {SOURCE_KEY: json_path.name, SHA256_KEY: sha256_file(json_path)}
    fig.savefig(png_path, dpi=dpi, metadata=metadata)
    plt.close(fig)


def plot_source(png_path):
    """`(json file name, sha256)` stamped in a PNG, or None if it has no stamp."""
    from PIL import Image

    with Image.open(png_path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if SOURCE_KEY not in text or SHA256_KEY not in text:
        return None
    return text[SOURCE_KEY], text[SHA256_KEY]


def stale_plots(folder):
    """`["<png>: <problem>", ...]` for every PNG under `folder` (recursive) that
    has no stamp, names a missing JSON, or whose JSON changed since it was drawn."""
    problems = []
    for png in sorted(Path(folder).rglob("*.png")):
        source = plot_source(png)
        if source is None:
            problems.append(f"{png}: no {SOURCE_KEY}/{SHA256_KEY} stamp (redraw it with benchmarks/redraw.py)")
            continue
        json_path = png.parent / source[0]
        if not json_path.is_file():
            problems.append(f"{png}: its JSON {json_path} does not exist")
        elif sha256_file(json_path) != source[1]:
            problems.append(f"{png}: {json_path.name} changed since the plot was drawn (redraw it)")
    return problems
