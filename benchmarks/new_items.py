"""Benchmark (not a test): new items recommendable without retraining (issue 22 item 5), DMESR vs ID-only.

Protocol (Amazon Beauty):

1. Held-out items: the newest ``--holdout`` (5%) of the items by first
   interaction time (ties: first row in the file). Every interaction with them
   is dropped from the training data; the models never see them (their item
   vocabulary does not hold them), nor does their semantic store.
2. Evaluation set: the leave-one-out cases of the FULL data (validation target
   ``s[-2]`` with history ``s[:-2]``, test target ``s[-1]`` with history
   ``s[:-1]``, users with >= 3 items) whose target is a held-out item. Held-out
   items inside a history are dropped (unknown to the models, as the server
   drops unknown tokens); cases left with an empty history are skipped (counted).
3. Models: DMESR-SASRec (configs/dmesr_sasrec_beauty.yaml) and ID-only SASRec
   (configs/sasrec_beauty.yaml), trained on the filtered data with their
   configs' recipes (``--max-epochs`` caps the epochs; ``--quick``: a subset of
   users, one epoch each, a smoke test whose figures mean nothing).
4. At serve time the held-out items are added through ``tfrec items add``'s
   code path (`export.items_add.add_items_file` writing a delta file):
   DMESR with the built-in encoder (`tfrec.semantics.new_items.NewItemEncoder`:
   the items' title / generated text through the store's frozen MiniLM, their
   attributes, the model's frozen parts; ID part zero); ID-only SASRec cannot
   place an unseen item: its vector for one is what a fresh, untrained row
   gives, a draw of the ID initialiser (TruncatedNormal(0.02), seed 0),
   added by the same path.
5. Metrics: each case's query (``user_embedding`` of its history, as the
   served recommender's signature) ranks the whole catalogue: the trained items
   (the exported retrieval table) plus the delta's items; recall@10 (= HR@10,
   one target) and NDCG@10 of the held-out target, pessimistic ranks on ties,
   history items not excluded (as the configs).
6. Seconds from ``add`` to recommendable: a model server (in process) serves
   the DMESR retrieval table (brute force) and an
   `export.delta_retrieval.DeltaRetrievalServable` over the delta file
   (``reload_seconds`` 1, the default); a client polls ``retrieve`` with a probe
   query whose top-10 holds a held-out item once added; timed from the call of
   `add_items_file` (embedding included) to the first answer holding it, for
   ``--repeats`` adds (the delta file removed in between, the answer checked
   free of new items first). The machine's load (``os.getloadavg``) is recorded.

Writes ``<out>/new_items.json`` and ``<out>/new_items.md`` (``--quick``:
``new_items_quick.*`` unless ``--out-name`` says otherwise). Work files (data,
store, runs, delta files) go to ``artifacts/new_items/<mode>``.

Usage:
    nice -n 10 .venv/bin/python benchmarks/new_items.py [--max-epochs N] [--repeats 5]
    nice -n 10 .venv/bin/python benchmarks/new_items.py --quick
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from export.items_add import add_items_file, load_delta  # noqa: E402
from tfrec.config import load_config  # noqa: E402
from tfrec.data.pipelines import pad_right  # noqa: E402
from tfrec.data.preprocess import save_prepared  # noqa: E402
from tfrec.data.readers import load_dataset, read_item_attributes  # noqa: E402
from tfrec.data.vocab import NUM_RESERVED  # noqa: E402
from tfrec.metrics import ranking_metrics_from_ranks, target_ranks  # noqa: E402
from tfrec.semantics.encode import GENERATED_FILE, encode_items  # noqa: E402
from tfrec.semantics.new_items import NewItemEncoder  # noqa: E402
from tfrec.semantics.text_encoder import TextEncoder  # noqa: E402
from tfrec.serving.servables import catalog_table  # noqa: E402
from tfrec.training import load_trained_model, prepare_split, train_sequential  # noqa: E402

DATASET = "amazon-beauty"
CONFIGS = {"dmesr-sasrec": "configs/dmesr_sasrec_beauty.yaml", "sasrec": "configs/sasrec_beauty.yaml"}
K = 10
MIN_LENGTH = 3


def load():
    return [round(v, 2) for v in os.getloadavg()]


def held_out_items(interactions, fraction):
    """The newest `fraction` of the items by first interaction (ties: earlier row first), as a set of tokens."""
    first = interactions.reset_index(drop=True).reset_index().groupby("item_id").agg(
        first_time=("timestamp", "min"), first_row=("index", "min"))
    order = first.sort_values(["first_time", "first_row"], kind="stable").index.tolist()
    count = max(1, math.ceil(fraction * len(order)))
    return set(order[-count:]), first


def evaluation_cases(interactions, held_out):
    """Leave-one-out cases of the full data whose target is held out: (split, user, history tokens, target)."""
    frame = interactions.reset_index(drop=True).reset_index()
    frame = frame.sort_values(["user_id", "timestamp", "index"], kind="stable")  # chronological, file order on ties
    cases = []
    for user, items in frame.groupby("user_id", sort=False)["item_id"]:
        s = items.tolist()
        if len(s) < MIN_LENGTH:
            continue
        for split, position in (("valid", len(s) - 2), ("test", len(s) - 1)):
            if s[position] in held_out:
                cases.append((split, user, s[:position], s[position]))
    return cases


def write_work_data(work, interactions, held_out, dataset_folder):
    """Training interactions, the generated text view of the training items and new.tsv of the held-out items."""
    work.mkdir(parents=True, exist_ok=True)
    train = interactions[~interactions["item_id"].isin(held_out)]
    train[["user_id", "item_id", "timestamp"]].to_csv(work / "interactions.tsv", sep="\t", index=False)
    generated = pd.read_csv(dataset_folder / GENERATED_FILE, sep="\t", dtype=str, keep_default_na=False,
                            quoting=3)
    kept = set(train["item_id"])
    generated[generated["item_id"].isin(kept)].to_csv(work / GENERATED_FILE, sep="\t", index=False, quoting=3)
    items = pd.read_csv(dataset_folder / "items.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    attributes = read_item_attributes(dataset_folder / "item_attributes.json")
    new = pd.DataFrame({"item_id": sorted(held_out)})
    new = new.merge(items[["item_id", "title"]], on="item_id", how="left")
    new = new.merge(generated[["item_id", "generated_text"]], on="item_id", how="left").fillna("")
    new["attributes"] = ["|".join(attributes.get(i, [])) for i in new["item_id"]]
    for column in ("title", "generated_text"):
        new[column] = new[column].str.replace("\t", " ").str.replace("\n", " ")
    new.to_csv(work / "new_items.tsv", sep="\t", index=False, quoting=3)
    return work / "interactions.tsv", work / GENERATED_FILE, work / "new_items.tsv", len(train)


def train_model(name, work, interactions_path, store_path, args):
    overrides = [f"name={name}", f"output_dir={work / 'runs'}", f"data.interactions_path={interactions_path}",
                 "eval.protocols=[full]"]
    if name == "dmesr-sasrec":
        overrides.append(f"dmesr.store_path={store_path}")
    if args.quick:
        overrides += ["train.epochs=1", "train.max_train_seconds=120"]
    elif args.max_epochs:
        overrides.append(f"train.epochs={args.max_epochs}")
    if args.max_train_seconds:
        overrides.append(f"train.max_train_seconds={args.max_train_seconds}")
    config = load_config(ROOT / CONFIGS[name], overrides)
    print(f"training {name} ({CONFIGS[name]} {' '.join(overrides[1:])})", flush=True)
    started = time.time()
    results, _, _ = train_sequential(config, verbose=0, save=True)
    return config, {"config_file": CONFIGS[name], "overrides": overrides, "epochs": results["epochs"],
                    "best_epoch": results["best_epoch"], "stopped_by": results["stopped_by"],
                    "train_seconds": round(results["train_seconds"], 1), "wall_seconds": round(time.time() - started, 1),
                    "filtered_split_test": results["splits"]["test"]["full"]}


def fresh_row_encoder(model, seed=0):
    """ID-only: the vector a fresh, untrained ID row gives a new item (the ID initialiser's draw), in the
    retrieval table's space (divided by the temperature); the `tfrec items add` encoder interface."""
    initializer = model.item_encoder.embeddings_initializer
    config = {**initializer.get_config(), "seed": seed}

    def encode(rows):
        rows_init = type(initializer).from_config(config)
        vectors = np.asarray(rows_init((len(rows), model.item_encoder.embedding_dim)), np.float32)
        return vectors / np.float32(model.temperature), None

    return encode


def queries_of(model, vocab, cases, max_length, batch=1024):
    """`user_embedding` of each case's history (known tokens kept, in order); None rows for empty histories."""
    histories = [np.asarray([i for i in vocab.lookup(h).tolist() if i >= NUM_RESERVED], np.int64)
                 for _, _, h, _ in cases]
    keep = np.array([len(h) > 0 for h in histories], bool)
    kept = [h for h, k in zip(histories, keep) if k]
    out = [np.asarray(model.user_embedding(pad_right(kept[s:s + batch], max_length)), np.float32)
           for s in range(0, len(kept), batch)]
    return (np.concatenate(out) if out else np.zeros((0, 1), np.float32)), keep


def evaluate(queries, base_table, delta, targets, splits):
    """recall@10 / NDCG@10 (and MRR@10) of the held-out targets over base + delta items, per split and in all."""
    index = {t: n for n, t in enumerate(delta.tokens.tolist())}
    columns = np.array([len(base_table) + index[t] for t in targets], np.int64)
    table = np.concatenate([base_table, delta.vectors]).T
    ranks = np.concatenate([target_ranks(queries[s:s + 512] @ table, columns[s:s + 512])
                            for s in range(0, len(queries), 512)])
    out = {}
    for name, mask in (("all", np.ones(len(ranks), bool)), ("valid", splits == "valid"), ("test", splits == "test")):
        if mask.any():
            metrics = ranking_metrics_from_ranks(ranks[mask], ks=(K,))
            out[name] = {"cases": int(mask.sum()), "recall@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"],
                         "mrr@10": metrics["mrr@10"], "median_rank": float(np.median(ranks[mask]) + 1)}
    return out, ranks


def seconds_to_recommendable(work, base_table, tokens, new_items_path, encoder, probe, repeats):
    """Serve the base table + a DeltaRetrievalServable; time `add_items_file` -> the probe's answer holds a new item."""
    from export.client import PredictClient
    from export.saved_model import export_index
    from export.server import ModelServer, ServerOptions
    from export.server.config import ServedModelConfig
    from tfrec.serving.retrieval import build_indexes

    serve = work / "serve"
    shutil.rmtree(serve, ignore_errors=True)
    index = build_indexes(base_table, tokens, k=K, kinds=("bruteforce",))["bruteforce"]
    export_index(index, serve / "retrieval", version=1)
    delta = serve / "delta" / "items.npz"
    delta.parent.mkdir(parents=True)
    configs = [ServedModelConfig("retrieval", str(serve / "retrieval")),
               ServedModelConfig("live", f"export.delta_retrieval:factory?retrieval=retrieval&delta={delta}",
                                 platform="python")]
    server = ModelServer(configs, ServerOptions(port=0, rest_api_port=-1,
                                                allowed_python_modules=("export.delta_retrieval",))).start()
    client = PredictClient(server.grpc_address)
    new_tokens = set(pd.read_csv(new_items_path, sep="\t", dtype=str, quoting=3)["item_id"])

    def answer():
        out = client.predict("live", {"queries": probe[None, :]}, signature="retrieve")
        return {t.decode() for t in out["item_ids"][0]}

    runs, failures = [], 0
    try:
        for _ in range(repeats):
            if delta.exists():
                delta.unlink()
            deadline = time.monotonic() + 30
            while answer() & new_tokens:  # wait until the server dropped the previous delta
                if time.monotonic() > deadline:
                    raise RuntimeError("the server kept the removed delta for 30 s")
                time.sleep(0.05)
            started = time.monotonic()
            result = add_items_file(str(new_items_path), str(delta), encoder)
            added = time.monotonic()
            while True:
                try:
                    if answer() & new_tokens:
                        break
                except Exception:  # noqa: BLE001 - counted: the claim is zero failed requests
                    failures += 1
                if time.monotonic() - started > 60:
                    raise RuntimeError("the added items never became recommendable")
                time.sleep(0.02)
            seen = time.monotonic()
            runs.append({"add_seconds": round(added - started, 3), "to_recommendable_seconds": round(seen - started, 3),
                         "after_write_seconds": round(seen - added, 3), "items": result["items"]})
    finally:
        client.close()
        server.stop()
    return {"reload_seconds": 1.0, "runs": runs, "failed_requests": failures,
            "median_to_recommendable_seconds": statistics.median(r["to_recommendable_seconds"] for r in runs),
            "median_add_seconds": statistics.median(r["add_seconds"] for r in runs)}


def write_reports(report, out, name):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# New items without retraining ({report['mode']} mode)", "",
             f"Amazon Beauty: the newest {report['holdout_fraction']:.0%} of the items by first interaction "
             f"({report['held_out_items']} items) held out of training ({report['dropped_interactions']} "
             f"interactions dropped), added at serve time through `tfrec items add`'s code path. Evaluation: "
             f"leave-one-out cases of the full data whose target is a held-out item "
             f"({report['cases']['evaluated']} evaluated, {report['cases']['empty_history']} skipped: empty "
             "history once held-out items are dropped). Full ranking over the trained items + the added ones "
             f"({report['catalogue']['trained_items']} + {report['catalogue']['added_items']}), pessimistic ties.",
             "",
             "| model | how a new item gets its vector | cases | recall@10 | NDCG@10 | MRR@10 | median rank |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, record in report["models"].items():
        placements = [(record["new_item_vector"], record["held_out_targets"])]
        if record.get("zero_id"):
            placements.append(("the same, as the model gives it (norm=zero_id)", record["zero_id"]["held_out_targets"]))
        for how, targets in placements:
            m = targets["all"]
            lines.append(f"| {model} | {how} | {m['cases']} | {m['recall@10']:.4f} | "
                         f"{m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['median_rank']:.0f} |")
    timing = report["add_to_recommendable"]
    if timing is None or "error" in timing:
        lines += ["", f"Seconds from `add` to recommendable: not measured ({(timing or {}).get('error', 'no DMESR')})."]
    else:
        lines += ["", f"Seconds from `add` ({report['held_out_items']} items: embedding + delta file write) to "
              f"recommendable (a `DeltaRetrievalServable`, reload_seconds {timing['reload_seconds']}, answering a "
              f"probe query with a new item): median {timing['median_to_recommendable_seconds']} s over "
              f"{len(timing['runs'])} adds (of which the add itself: median {timing['median_add_seconds']} s; from the "
              f"file write to the first answer holding a new item: median "
              f"{statistics.median(r['after_write_seconds'] for r in timing['runs'])} s, at most reload_seconds "
              "plus a request); "
              f"failed requests while polling: {timing['failed_requests']}. Probe: {timing['probe']}. Loading the "
              f"encoder once (model + MiniLM, before the adds): {report['encoder_load_seconds']} s (a cold MiniLM "
              f"load alone: {report['minilm_cold_load_seconds']} s)."]
    lines += ["", f"Training: " + "; ".join(f"{m} {r['epochs']} epochs ({r['stopped_by']}), {r['train_seconds']} s"
                                       for m, r in report["models"].items()) + ".",
             f"Machine load (1/5/15 min): {report['load']['start']} at start, {report['load']['end']} at the end.",
             ""]
    if report["mode"] == "quick":
        lines.append("**Quick mode**: a user subset and one epoch per model, a smoke test of the protocol; "
                     "its figures mean nothing.")
    lines.append("ID-only SASRec cannot place an item it was not trained on: its vector for a new item is what a "
                 "fresh, untrained ID row gives (a draw of the TruncatedNormal(0.02) initialiser), so its "
                 "figures are those of a random placement. DMESR places a new item by its content (title, "
                 "generated text, attributes) through the trained model's frozen parts, with a zero ID part, "
                 "rescaled to the catalogue's median norm (norm=catalogue, ours; the zero_id row shows the vectors "
                 "as the model gives them).")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a user subset, one epoch per model")
    parser.add_argument("--users", type=int, default=None, help="only the first N users of the file "
                                                                "(default: all; --quick: 800)")
    parser.add_argument("--holdout", type=float, default=0.05, help="fraction of the newest items held out")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on the configs' epochs (full mode)")
    parser.add_argument("--max-train-seconds", type=float, default=None, help="cap on each training's wall time")
    parser.add_argument("--repeats", type=int, default=5, help="adds timed for add -> recommendable")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--out-name", default=None, help="report file stem (default new_items, new_items_quick)")
    args = parser.parse_args()
    if not 0.0 < args.holdout < 0.5:
        raise SystemExit(f"--holdout must be in (0, 0.5), got {args.holdout}")
    mode = "quick" if args.quick else "full"
    users = args.users or (800 if args.quick else None)
    report = {"mode": mode, "dataset": DATASET, "holdout_fraction": args.holdout, "load": {"start": load()}}
    work = ROOT / "artifacts" / "new_items" / mode
    started = time.time()

    dataset = load_dataset(DATASET)
    interactions = dataset.interactions
    if users:
        chosen = pd.unique(interactions["user_id"])[:users]
        interactions = interactions[interactions["user_id"].isin(set(chosen))]
    held_out, _ = held_out_items(interactions, args.holdout)
    cases = evaluation_cases(interactions, held_out)
    folder = Path(dataset.source_files[0]).parent
    interactions_path, generated_path, new_items_path, kept = write_work_data(work, interactions, held_out, folder)
    report.update(users=int(interactions["user_id"].nunique()), interactions=int(len(interactions)),
                  held_out_items=len(held_out), dropped_interactions=int(len(interactions) - kept))

    # The semantic store of the training items only (the held-out items are not in it).
    config = load_config(ROOT / CONFIGS["dmesr-sasrec"], [f"data.interactions_path={interactions_path}"])
    data, _ = prepare_split(config)
    save_prepared(data, work / "prepared")
    store = encode_items(work / "prepared", dataset=DATASET, out_dir=work / "semantics", generated_path=generated_path)
    report["store"] = {"path": str(store.path), "views": store.views, "encoder": store.encoder.get("name")}
    if set(data.item_vocab.tokens) & held_out:
        raise RuntimeError("a held-out item is in the training vocabulary")

    splits = np.array([c[0] for c in cases])
    targets = [c[3] for c in cases]
    report["models"] = {}
    timing = None
    for name in ("sasrec", "dmesr-sasrec"):
        config, record = train_model(name, work, interactions_path, store.path, args)
        model, _ = load_trained_model(config)
        vocab = data.item_vocab
        base_table, tokens = catalog_table(model, vocab)
        delta_path = work / f"delta_{name}.npz"
        if delta_path.exists():
            delta_path.unlink()
        if name == "dmesr-sasrec":
            loaded = time.monotonic()
            encoder = NewItemEncoder.from_run(config.run_dir)  # the default norm ("catalogue")
            encoder.text_encoder  # noqa: B018 - the frozen MiniLM, loaded once (maybe already, by the store's encoding)
            report["encoder_load_seconds"] = round(time.monotonic() - loaded, 2)
            unscaled = NewItemEncoder(encoder.model, encoder.store, encoder.text_encoder, norm="zero_id")
            loaded = time.monotonic()
            TextEncoder(max_tokens=int(store.encoder["max_tokens"]))  # a cold load of MiniLM, for the record
            report["minilm_cold_load_seconds"] = round(time.monotonic() - loaded, 2)
            record["new_item_vector"] = ("content: MiniLM text views + attributes through the frozen DMESR parts, "
                                         "rescaled to the catalogue's median norm (norm=catalogue, the default)")
            record["norm"] = "catalogue"
        else:
            encoder = fresh_row_encoder(model)
            record["new_item_vector"] = "a fresh untrained ID row (cannot place it)"
        record["add"] = add_items_file(str(new_items_path), str(delta_path), encoder)
        delta = load_delta(str(delta_path))
        queries, keep = queries_of(model, vocab, cases, config.model.max_length)
        kept_targets = [t for t, k in zip(targets, keep) if k]
        record["held_out_targets"], _ = evaluate(queries, base_table, delta, kept_targets, splits[keep])
        if name == "dmesr-sasrec":  # the same items as the model gives them (norm=zero_id), evaluated only
            raw = add_items_file(str(new_items_path), str(work / "delta_dmesr-sasrec-zero_id.npz"), unscaled)
            record["zero_id"] = {"add": raw, "held_out_targets": evaluate(
                queries, base_table, load_delta(str(work / "delta_dmesr-sasrec-zero_id.npz")), kept_targets,
                splits[keep])[0]}
        report["cases"] = {"evaluated": int(keep.sum()), "empty_history": int((~keep).sum()),
                           "valid": int((splits[keep] == "valid").sum()), "test": int((splits[keep] == "test").sum())}
        report["catalogue"] = {"trained_items": len(base_table), "added_items": len(delta.tokens)}
        report["models"][name] = record
        if name == "dmesr-sasrec":
            # the probe: an evaluation case (else a new item's own vector) whose top-10 holds a new item once added
            candidates = np.concatenate([queries, delta.vectors])
            base_kth = np.partition(candidates @ base_table.T, -K, axis=1)[:, -K]
            wins = np.flatnonzero((candidates @ delta.vectors.T).max(axis=1) > base_kth)
            if not len(wins):  # reported as it is: the model recommends none of the new items to anyone
                timing = {"error": "no probe query ranks a new item in its top 10: add -> recommendable not timed"}
            else:
                timing = seconds_to_recommendable(work, base_table, tokens, new_items_path, encoder,
                                                  candidates[wins[0]], args.repeats)
                timing["probe"] = ("an evaluation case's query" if wins[0] < len(queries) else
                                   "a new item's vector") + " whose top-10 holds a new item once added"
        print(f"{name}: {record['held_out_targets']['all']}", flush=True)
    report["add_to_recommendable"] = timing
    report["load"]["end"] = load()
    report["seconds"] = round(time.time() - started, 1)
    name = args.out_name or ("new_items" if mode == "full" else "new_items_quick")
    write_reports(report, Path(args.out), name)
    print(f"done in {report['seconds']} s -> {args.out}/{name}.json, .md", flush=True)


if __name__ == "__main__":
    main()
