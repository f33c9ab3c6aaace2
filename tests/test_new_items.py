"""`tfrec items add --model RUN` (tfrec.semantics.new_items.NewItemEncoder) end to end, on a tiny real store
(MiniLM via `tfrec encode`) and a DMESR model trained by `tfrec train`'s path."""

import json

import numpy as np
import pytest

from export.items_add import load_delta
from tfrec.config import load_config
from tfrec.data.preprocess import save_prepared
from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.semantics.encode import encode_items
from tfrec.semantics.new_items import NewItemEncoder
from tfrec.serving.servables import catalog_table
from tfrec.training import load_trained_model, prepare_split, train_sequential
from tfrec_cli.main import main

TITLES = {
    "i01": "OPI Nail Lacquer, Big Apple Red", "i02": "Essie Nail Polish, Ballet Slippers",
    "i03": "Conair 1875 Watt Ionic Hair Dryer", "i04": "Burt's Bees Hand Cr&egrave;me, 2 Ounces",
    "i05": "Maybelline Great Lash Mascara", "i06": "Neutrogena Oil-Free Acne Wash",
    "i07": "Revlon Hot Air Brush", "i08": "CeraVe Moisturizing Cream, 16 oz",
    "i09": "L'Oreal Paris Voluminous Mascara", "i10": "Sally Hansen Hard as Nails",
    "i11": "Remington Flat Iron 1 inch", "i12": "",  # an empty title: its view is masked
}
GENERATED = {item: f"beauty item {title.split(' ')[0].lower()} product" for item, title in TITLES.items()}
GENERATED["i12"] = "olay cream"
ATTRIBUTES = {item: [str(3 + k % 4), str(10 + k % 3)] for k, item in enumerate(TITLES)}
ATTRIBUTES["i05"] = []


def tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_items")
    rng = np.random.default_rng(0)
    items = sorted(TITLES)
    rows = [(f"u{u}", items[(u + 3 * t) % len(items)], t) for u in range(30) for t in range(int(rng.integers(4, 8)))]
    tsv(root / "interactions.tsv", ["user_id", "item_id", "timestamp"], [(u, i, str(t)) for u, i, t in rows])
    tsv(root / "items.tsv", ["item_id", "asin", "title"], [(i, f"A{k}", TITLES[i]) for k, i in enumerate(items)])
    tsv(root / "generated.tsv", ["item_id", "asin", "generated_text"],
        [(i, f"A{k}", GENERATED[i]) for k, i in enumerate(items)])
    (root / "attributes.json").write_text(json.dumps(ATTRIBUTES))
    overrides = [
        f"data.interactions_path={root / 'interactions.tsv'}", f"output_dir={root / 'runs'}", "name=dmesr",
        "model.max_length=6", "model.embedding_dim=8", "model.num_layers=1", "model.num_heads=1",
        "train.epochs=1", "train.batch_size=8", "eval.protocols=[full]", "model.item_encoder=dmesr",
        "dmesr.token_pca_dim=6", "dmesr.max_tokens=8", "dmesr.token_clusters=2", "model.temperature=0.5",
        f"dmesr.store_path={root / 'store'}",
    ]
    config = load_config(None, overrides)
    data, _ = prepare_split(config)
    save_prepared(data, root / "prepared")
    encode_items(root / "prepared", root / "items.tsv", root / "store", max_tokens=16, batch_size=8,
                 attributes_path=root / "attributes.json", generated_path=root / "generated.tsv",
                 log=lambda *_: None)
    train_sequential(config, verbose=0, save=True)
    return {"root": root, "config": config, "run_dir": config.run_dir, "vocab": data.item_vocab}


def catalogue_rows_with_zero_id_rows(run, tokens):
    """The exported retrieval table's rows of `tokens` when their trained ID rows are zero (a new item has
    no trained ID row): what the trained model computes for them in the catalogue."""
    model, _ = load_trained_model(run["config"])
    ids = run["vocab"].lookup(tokens)
    embeddings = model.item_encoder.id_encoder.embedding.embeddings
    table = np.array(embeddings.numpy())
    table[ids] = 0.0
    embeddings.assign(table)
    rows, _ = catalog_table(model, run["vocab"])
    return rows[ids - NUM_RESERVED]


def test_items_add_with_the_model_gives_the_catalogue_vectors(run, tmp_path, capsys):
    chosen = ["i01", "i04", "i05", "i12"]  # i04: HTML entity; i05: no attributes; i12: empty title
    new = tsv(tmp_path / "new.tsv", ["item_id", "title", "generated_text", "attributes"],
              [(f"new-{i}", TITLES[i], GENERATED[i], "|".join(ATTRIBUTES[i])) for i in chosen])
    delta = tmp_path / "items.npz"
    assert main(["items", "add", "--items", str(new), "--delta", str(delta), "--model", str(run["run_dir"]),
                 "--norm", "zero_id"]) == 0
    assert "4 added, 0 replaced; the delta holds 4 items (generation 1)" in capsys.readouterr().out
    got = load_delta(str(delta))
    assert got.tokens.tolist() == [f"new-{i}" for i in chosen] and got.sids.shape == (4, 0)
    expected = catalogue_rows_with_zero_id_rows(run, chosen)
    assert np.abs(expected).max() > 1e-2  # the semantic part is not trivially zero
    np.testing.assert_allclose(got.vectors, expected, atol=1e-5, rtol=0)
    # the default: the same directions at the median norm of the trained catalogue's rows
    scaled = tmp_path / "scaled.npz"
    assert main(["items", "add", "--items", str(new), "--delta", str(scaled), "--model", str(run["run_dir"])]) == 0
    np.testing.assert_allclose(load_delta(str(scaled)).vectors, at_catalogue_norm(run, expected), atol=1e-5, rtol=0)


def test_items_add_fills_the_delta_sids_from_the_frozen_quantizer(run, tmp_path):
    """With a semantic-ID artifact of the run's store (`--sids`, or the run's own `sids/`), the delta's sids are
    the frozen quantizer's codes of each new item's text: a trained item's text gets its fitted codes."""
    from tfrec.semantics.sids import SidsConfig, sids_from_store

    artifact = sids_from_store(run["root"] / "store", tmp_path / "sids", view="title",
                               config=SidsConfig(num_levels=2, codebook_size=3, deduplicate=False))
    chosen = ["i01", "i03", "i07", "i12"]  # i12: an empty title, no code
    new = tsv(tmp_path / "new.tsv", ["item_id", "title", "generated_text", "attributes"],
              [(f"new-{i}", TITLES[i], GENERATED[i], "|".join(ATTRIBUTES[i])) for i in chosen])
    delta = tmp_path / "items.npz"
    assert main(["items", "add", "--items", str(new), "--delta", str(delta), "--model", str(run["run_dir"]),
                 "--sids", str(tmp_path / "sids")]) == 0
    got = load_delta(str(delta))
    np.testing.assert_array_equal(got.sids, artifact.codes[run["vocab"].lookup(chosen)])
    assert got.sids[-1].tolist() == [-1, -1] and (got.sids[:-1] >= 0).all()


def at_catalogue_norm(run, vectors):
    """`vectors` rescaled to the median norm of the trained model's catalogue rows (`norm="catalogue"`)."""
    model, _ = load_trained_model(run["config"])
    rows, _ = catalog_table(model, run["vocab"])
    median = np.median(np.linalg.norm(rows, axis=1))
    return vectors * (median / np.linalg.norm(vectors, axis=1, keepdims=True))


def test_new_item_encoder_rejects_bad_input(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="norm must be one of"):
        NewItemEncoder.from_run(run["run_dir"] / "model.keras", norm="unit")
    encoder = NewItemEncoder.from_run(run["run_dir"] / "model.keras")
    rows = [{"item_id": "a", "title": TITLES["i01"], "generated_text": GENERATED["i01"], "attributes": "3 10"},
            {"item_id": "b", "title": "", "generated_text": "", "attributes": "unknown-attribute"}]
    vectors, sids = encoder(rows)
    assert vectors.shape == (2, 8) and sids is None
    np.testing.assert_allclose(vectors[1], 0.0, atol=1e-7)  # no content at all: nothing to place it by
    with pytest.raises(ValueError, match="generated_text"):
        encoder([{"item_id": "c", "title": "x"}])
    assert main(["items", "add", "--items", "x.tsv", "--delta", str(tmp_path / "d.npz")]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    id_only = load_config(None, [f"data.interactions_path={run['root'] / 'interactions.tsv'}",
                                 f"output_dir={tmp_path}", "name=id", "model.max_length=6", "model.embedding_dim=8",
                                 "model.num_layers=1", "model.num_heads=1", "train.epochs=1", "train.batch_size=8",
                                 "eval.protocols=[full]"])
    train_sequential(id_only, verbose=0, save=True)
    with pytest.raises(ValueError, match="not DMESR"):
        NewItemEncoder.from_run(id_only.run_dir, store=run["root"] / "store")
    other = Vocabulary(["x", "y"])
    other.save(tmp_path / "item_vocab.txt")
    (tmp_path / "model.keras").write_bytes((run["run_dir"] / "model.keras").read_bytes())
    with pytest.raises(ValueError, match="vocabular"):
        NewItemEncoder.from_run(tmp_path)


def test_post_items_with_the_built_in_model_encoder(run, tmp_path):
    """`tfrec serve --items_delta --items_model RUN`: POST /v1/items gives the same vectors as `tfrec items add
    --model` (the catalogue rows with a zero ID row, at the catalogue's median norm), and a row lacking a column the model reads is a 400."""
    import urllib.error
    import urllib.request

    from export.server import ModelServer, ServerOptions, single_model_config

    def post(body):
        request = urllib.request.Request(server.rest_url + "/v1/items", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    delta = tmp_path / "items.npz"
    chosen = ["i01", "i04", "i12"]
    server = ModelServer(single_model_config("none", str(tmp_path / "none")), ServerOptions(
        port=0, rest_api_port=0, items_delta=str(delta), items_model=str(run["run_dir"]))).start()
    try:
        rows = [{"item_id": f"new-{i}", "title": TITLES[i], "generated_text": GENERATED[i],
                 "attributes": "|".join(ATTRIBUTES[i])} for i in chosen]
        status, body = post({"items": rows})
        assert status == 200 and (body["added"], body["items"], body["generation"]) == (3, 3, 1), body
        status, body = post({"items": [{"item_id": "no-generated-text", "title": "x"}]})
        assert status == 400 and "generated_text" in body["error"], body
    finally:
        server.stop()
    got = load_delta(str(delta))
    assert got.tokens.tolist() == [f"new-{i}" for i in chosen]
    np.testing.assert_allclose(got.vectors, at_catalogue_norm(run, catalogue_rows_with_zero_id_rows(run, chosen)),
                               atol=1e-5, rtol=0)
