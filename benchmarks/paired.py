"""Report (not a benchmark run): two groups of sequential benchmark records, possibly from
different report files, compared paired by seed.

For runs already on disk (`reports/backbones.json`, `reports/dmesr*.json`: the record
schema of `_records.py`), e.g. DMESR runs of `benchmarks/dmesr.py` against the ID-only
runs of `benchmarks/backbones.py` with the same config and seeds. A group is
`FILE:key=value,key=value` over record fields (`dataset`, `model`, `variant`,
`protocol`, ...). Pairs are matched on `seed`; a seed with no partner is left out and
named. Every config key on which the two groups' runs differ is listed (the encoder
should be the only real difference; budgets and names are shown too), so a comparison of
unlike runs cannot pass unnoticed.

Writes `<out>.json` (`{"a", "b", "metric", "protocol", "pairs": [{"seed", "a", "b"}],
"mean_a", "mean_b", "diff", "relative", "ci95", "config_differences", "unpaired"}`)
and `<out>.md`.

Usage:
    .venv/bin/python benchmarks/paired.py \
        --a "reports/dmesr-ema/dmesr.json:model=sasrec,variant=dmesr" \
        --b "reports/backbones.json:dataset=amazon-beauty,model=sasrec,variant=ema" \
        [--metric ndcg@10] [--protocol full] --out reports/dmesr-ema/vs_id
"""

import argparse
import json
from pathlib import Path

import numpy as np

IGNORED_KEYS = ("name", "output_dir")  # differ between any two runs by design


def parse_group(spec):
    """`"FILE:k=v,k=v"` -> `(Path, {k: v})`.

    >>> parse_group("reports/x.json:model=sasrec,variant=id")
    (PosixPath('reports/x.json'), {'model': 'sasrec', 'variant': 'id'})
    """
    path, _, filters = spec.partition(":")
    pairs = [item.split("=", 1) for item in filters.split(",") if item]
    bad = [item for item in pairs if len(item) != 2]
    if bad or not path:
        raise SystemExit(f"group {spec!r}: expected FILE:key=value,key=value")
    return Path(path), dict(pairs)


def select(path, filters, protocol):
    """The records of `path` matching `filters` and `protocol`, by seed (one per seed)."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such report")
    data = json.loads(path.read_text())
    records = data["records"] if isinstance(data, dict) else data
    chosen = [r for r in records if r.get("protocol", protocol) == protocol
              and all(str(r.get(k)) == v for k, v in filters.items())]
    by_seed = {}
    for r in chosen:
        if r.get("seed") is None:
            continue
        if r["seed"] in by_seed:
            raise SystemExit(f"{path} {filters}: two records for seed {r['seed']}; narrow the filter")
        by_seed[r["seed"]] = r
    if not by_seed:
        raise SystemExit(f"{path} {filters} (protocol {protocol}): no record with a seed")
    return by_seed


def flatten(config, prefix=""):
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`.

    >>> flatten({"train": {"seed": 1, "ema_momentum": 0.998}, "name": "x"})
    {'train.seed': 1, 'train.ema_momentum': 0.998, 'name': 'x'}
    """
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(a_records, b_records):
    """Config keys whose values differ between the groups (seed and names excluded):
    `{key: {"a": sorted values, "b": sorted values}}`."""
    def values(records):
        out = {}
        for r in records:
            for k, v in flatten(r.get("config")).items():
                out.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
        return out

    va, vb = values(a_records), values(b_records)
    diffs = {}
    for key in sorted(set(va) | set(vb)):
        if key in IGNORED_KEYS or key.endswith(".seed"):
            continue
        if va.get(key) != vb.get(key):
            diffs[key] = {"a": sorted(va.get(key, {"(absent)"})), "b": sorted(vb.get(key, {"(absent)"}))}
    return diffs


def compare(a, b, metric):
    """Paired comparison of `{seed: record}` groups on `metric` (test)."""
    from _records import paired_rows

    seeds = sorted(set(a) & set(b))
    pairs = [{"seed": s, "a": a[s]["metrics"][metric], "b": b[s]["metrics"][metric]} for s in seeds]
    rows = paired_rows({"a": [a[s] for s in seeds], "b": [b[s] for s in seeds]}, "a", metric)
    mean_a = float(np.mean([p["a"] for p in pairs]))
    mean_b = float(np.mean([p["b"] for p in pairs]))
    return {"pairs": pairs, "mean_a": mean_a, "mean_b": mean_b, "diff": rows[0]["_diff"],
            "relative": mean_a / mean_b - 1.0, "ci95": rows[0]["_ci95"],
            "unpaired": {"a": sorted(set(a) - set(b)), "b": sorted(set(b) - set(a))}}


def markdown(result):
    lines = [f"# {result['a']} vs {result['b']}", "",
             "Written by `benchmarks/paired.py` from the reports named; do not edit by hand. "
             f"Test {result['metric']} ({result['protocol']}), paired by seed; interval: 95% bootstrap over seeds.", "",
             "| seed | a | b | a - b |", "| --- | ---: | ---: | ---: |"]
    for p in result["pairs"]:
        lines.append(f"| {p['seed']} | {p['a']:.4f} | {p['b']:.4f} | {p['a'] - p['b']:+.4f} |")
    ci = result["ci95"]
    interval = "n/a (1 seed)" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
    lines += ["", f"Mean a {result['mean_a']:.4f}, b {result['mean_b']:.4f}: difference **{result['diff']:+.4f}** "
              f"({result['relative']:+.1%}), 95% interval {interval}.", ""]
    if result["unpaired"]["a"] or result["unpaired"]["b"]:
        lines += [f"Unpaired seeds (left out): a {result['unpaired']['a']}, b {result['unpaired']['b']}.", ""]
    lines += ["Config keys on which the two groups differ (`(absent)`: the key did not exist when those runs were made):", ""]
    if not result["config_differences"]:
        lines.append("- none")
    for key, v in result["config_differences"].items():
        lines.append(f"- `{key}`: a {', '.join(v['a'])}; b {', '.join(v['b'])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="FILE:key=value,... (the run of interest)")
    parser.add_argument("--b", required=True, help="FILE:key=value,... (the reference)")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)
    (pa, fa), (pb, fb) = parse_group(args.a), parse_group(args.b)
    a, b = select(pa, fa, args.protocol), select(pb, fb, args.protocol)
    if not set(a) & set(b):
        raise SystemExit(f"no seed in both groups: a {sorted(a)}, b {sorted(b)}")
    result = {"a": args.a, "b": args.b, "metric": args.metric, "protocol": args.protocol,
              **compare(a, b, args.metric),
              "config_differences": config_differences(list(a.values()), list(b.values()))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
