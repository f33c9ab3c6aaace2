"""New items in the R2LED ranker without retraining (issue 22 item 5, ranker side): `tfrec.ctr.new_items`,
`export.ranker_items`, `tfrec items add --ranker`.

One tiny R2LED run is made the way a user makes one (`tfrec ctr encode`'s store of 9 MovieLens-like titles
with the real MiniLM, `tfrec ctr train` for one epoch: SIDs of 2 levels x 3 codes, the wide part with genres
and a user profile), then every trainable weight is randomised (so ID rows and biases matter to the scores)
and exported as version 1 of the served ranker, as `tfrec ctr export` does.
"""

import json
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from export.ranker_items import NEW_ITEMS_PATH, add_ranker_items, prepare_ranker_items
from export.saved_model import METADATA_FILE, export_ctr
from polling import polled
from test_items_endpoint import reported_rest_url, rest
from tfrec.ctr import NewItemRows, RankerRun, load_ctr_config, load_ctr_data, train_ctr
from tfrec.ctr.semantics import encode_lifelong_store
from tfrec.data.lifelong import gap_bucket
from tfrec.data.vocab import NUM_RESERVED, OOV_ID
from tfrec.history import Event, open_store
from tfrec.history.routes import SIDRoutes
from tfrec.semantics.new_items import StoreTextEncoder
from tfrec_cli.main import main

MOVIES = {
    "i0": ("Toy Story (1995)", "Animation|Children's|Comedy"), "i1": ("Heat (1995)", "Action|Crime|Thriller"),
    "i2": ("Casino (1995)", "Drama|Thriller"), "i3": ("Jumanji (1995)", "Adventure|Children's|Fantasy"),
    "i4": ("GoldenEye (1995)", "Action|Adventure|Thriller"), "i5": ("Babe (1995)", "Children's|Comedy|Drama"),
    "i6": ("Sabrina (1995)", "Comedy|Romance"), "i7": ("Sudden Death (1995)", "Action"),
    "i8": ("Balto (1995)", "Animation|Children's"),
}
NEW = {"new-1": ("Pocahontas (1995)", "Animation|Children's|Musical|Romance"),
       "new-2": ("Bad Boys (1995)", "Action|Comedy|Crime"), "new-3": ("Copycat (1995)", "Crime|Drama|Thriller")}
NOW = 100_000  # request time (after every logged event)


def new_rows(*tokens):
    return [{"item_id": t, "title": NEW[t][0], "genres": NEW[t][1]} for t in tokens]


def tsv(path, rows):
    header = list(rows[0])
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r[c] for c in header) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker_items")
    (root / "log.csv").write_text("user_id,item_id,timestamp,label\n" + "".join(
        f"u{u},i{(3 * u + t) % 9},{1000 + 100 * t + u},{int((3 * u + t) % 9 % 2 == 0)}\n"
        for u in range(12) for t in range(12)))
    tsv(root / "items.tsv", [{"item_id": i, "title": t, "genres": g} for i, (t, g) in MOVIES.items()])
    (root / "users.csv").write_text("user_id,gender\n" + "".join(f"u{u},{'MF'[u % 2]}\n" for u in range(12)))
    config = load_ctr_config(None, [
        "name=r2led", f"output_dir={root / 'runs'}", f"data.interactions_path={root / 'log.csv'}",
        f"data.items_path={root / 'items.tsv'}", f"data.users_path={root / 'users.csv'}", "model.name=r2led",
        "model.embedding_dim=8", "model.mlp_units=[8]", "model.max_history=8", "model.top_k=2",
        f"sids.store_path={root / 'store'}", "sids.num_levels=2", "sids.codebook_size=[3,3]", "train.epochs=1",
        "train.batch_size=64", "train.seed=0"])
    data = load_ctr_data(config.data)
    encode_lifelong_store(data, root / "store", items_path=str(root / "items.tsv"), max_tokens=16, batch_size=8,
                          log=lambda *_: None)
    _, model, _ = train_ctr(config, verbose=0, save=True, data=data)
    rng = np.random.default_rng(0)
    for weight in model.trainable_weights:  # trained one epoch, rows are ~0.02: make every table matter
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype("float32"))
    model.save(config.run_dir / "model.keras")
    base = root / "servables" / "ranker"
    export_ctr(model, data.item_vocab, base, max_history=8, users=data.users, user_profiles=data.user_profiles)
    return {"root": root, "run_dir": config.run_dir, "base": base, "data": data, "ranker": RankerRun(config.run_dir)}


def request(histories, candidates, user="nobody"):
    """A `score` request: each history's items at times 1000, 1100, ... with alternating clicks."""
    width = max(map(len, histories))
    pad = lambda rows, fill: [list(r) + [fill] * (width - len(r)) for r in rows]  # noqa: E731
    stamps = [[1000 + 100 * k for k in range(len(h))] for h in histories]
    labels = [[float(k % 2) for k in range(len(h))] for h in histories]
    ratings = [[float(1 + k % 5) if k % 3 else 0.0 for k in range(len(h))] for h in histories]
    return {"history": tf.constant(pad(histories, "")), "candidates": tf.constant(candidates),
            "history_ratings": tf.constant(pad(ratings, 0.0), tf.float32),
            "history_labels": tf.constant(pad(labels, 0.0), tf.float32),
            "history_timestamps": tf.constant(pad(stamps, 0), tf.int64),
            "timestamp": tf.constant([NOW] * len(histories), tf.int64), "user": tf.constant([user] * len(histories))}


LOADED = {}


def served(version_dir, histories, candidates):
    """The `score` answer of the exported ranker version `version_dir` (loaded once per folder)."""
    if str(version_dir) not in LOADED:
        LOADED[str(version_dir)] = tf.saved_model.load(str(version_dir))
    return LOADED[str(version_dir)].signatures["score"](**request(histories, candidates))["probabilities"].numpy()


def in_memory(model, vocab, profile_width, history, candidates):
    """`model.score` of one known-token history (as `request` sends it) for an unknown user."""
    ids = vocab.lookup(history)[None].astype("int32")
    k = np.arange(len(history))
    return np.asarray(model.score(
        ids, vocab.lookup(candidates)[None].astype("int32"), history_labels=(k % 2).astype("float32")[None],
        history_ratings=np.where(k % 3 > 0, 1.0 + k % 5, 0.0).astype("float32")[None],
        history_gaps=np.asarray(gap_bucket(NOW - (1000 + 100 * k)))[None].astype("int32"),
        user_id=np.array([OOV_ID], "int32"), user_profile=np.full((1, profile_width), OOV_ID, "int32")))[0]


def test_new_item_codes_are_the_frozen_quantizers_encoding_of_its_text(run):
    ranker = run["ranker"]
    rows = new_rows("new-1", "new-2") + [{"item_id": "copy-of-i4", "title": MOVIES["i4"][0], "genres": MOVIES["i4"][1]}]
    got = ranker.new_item_rows(rows)
    pooled, valid = StoreTextEncoder(ranker.store).pooled(rows, "title")
    assert valid.all() and got.sids.shape == (3, 2)
    np.testing.assert_array_equal(got.sids, keras.ops.convert_to_numpy(ranker.quantizer.compute_codes(pooled)))
    # a trained item's text sent again gets the store's vector (the same text path), hence its trained codes
    i4 = int(ranker.item_vocab.lookup("i4"))
    np.testing.assert_allclose(pooled[2], np.asarray(ranker.store.view("title").pooled)[i4], atol=1e-5)
    np.testing.assert_array_equal(got.sids[2], ranker.sids.codes[i4])
    # sid_neighbours: the mean over the trained items sharing the longest prefix (copy-of-i4: its full code)
    table = keras.ops.convert_to_numpy(ranker.model.item_encoder.all_items())[NUM_RESERVED:]
    same = (ranker.sids.codes[NUM_RESERVED:] == ranker.sids.codes[i4]).all(axis=1)
    assert got.init_level[2] == 2
    np.testing.assert_allclose(got.embedding[2], table[same].mean(axis=0), atol=1e-6)
    bias = keras.ops.convert_to_numpy(ranker.model.wide.item_bias)[NUM_RESERVED:]
    assert got.bias[2] == pytest.approx(float(bias[same].mean()), abs=1e-6)
    genres = ranker.data.genre_vocab
    assert sorted(got.genres[0][got.genres[0] > 0].tolist()) == sorted(
        genres.lookup(["Animation", "Children's", "Romance"]).tolist())  # "Musical": no trained item has it


def test_new_version_keeps_every_trained_row_and_scores_the_new_items(run, tmp_path):
    base = tmp_path / "ranker"
    export_ctr(run["ranker"].model, run["ranker"].item_vocab, base, max_history=8, users=run["data"].users,
               user_profiles=run["data"].user_profiles)
    result = add_ranker_items(new_rows("new-1", "new-2"), run["run_dir"], base, ranker=run["ranker"])
    assert (result["added"], result["items"], result["version"], result["routes"]) == (2, 2, 2, None)
    meta = json.loads((base / "2" / METADATA_FILE).read_text())
    assert meta["new_items"]["items"] == 2 and meta["vocab"]["num_items"] == run["ranker"].item_vocab.size
    rows = NewItemRows.load(base / "2" / NEW_ITEMS_PATH)
    model, vocab = run["ranker"].extended(rows)
    trained = run["ranker"].model
    for old, new in zip(trained.weights, model.weights):  # every trained row unchanged
        old, new = keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(new)
        np.testing.assert_array_equal(new[:len(old)] if new.shape != old.shape else new, old)
    histories = [["i1", "i4", "i7", "i2"], ["i0", "i8", "i3"]]
    old_items = [["i5", "i6", "i1"], ["i2", "i7", "i0"]]
    before, after = served(base / "1", histories, old_items), served(base / "2", histories, old_items)
    np.testing.assert_allclose(after, before, atol=1e-6)  # trained items score as before
    with_new = [["new-1", "new-2", "brand-unknown"], ["new-2", "new-1", "brand-unknown"]]
    old_answer, new_answer = served(base / "1", histories, with_new), served(base / "2", histories, with_new)
    np.testing.assert_allclose(old_answer[:, 0], old_answer[:, 2], atol=1e-7)  # before: new-1 was OOV
    assert np.abs(new_answer[:, :2] - new_answer[:, 2:]).min() > 1e-4  # now scored by its own rows
    np.testing.assert_allclose(new_answer[:, 2], old_answer[:, 2], atol=1e-6)  # OOV unchanged
    width = len(trained.wide.profile_sizes)
    for history, candidates, answer in zip(histories, with_new, new_answer):
        np.testing.assert_allclose(answer[:2], in_memory(model, vocab, width, history, candidates)[:2], atol=1e-5)
    # a history holding a new item: read with its rows (the old version dropped the unknown token)
    history = ["i1", "new-2", "i4"]
    np.testing.assert_allclose(served(base / "2", [history], [["i5", "new-1"]])[0],
                               in_memory(model, vocab, width, history, ["i5", "new-1"]), atol=1e-5)


def test_later_adds_carry_the_earlier_items_and_refuse_re_adding(run, tmp_path):
    base = tmp_path / "ranker"
    first = add_ranker_items(new_rows("new-1"), run["run_dir"], base, ranker=run["ranker"])
    assert first["version"] == 1
    second = add_ranker_items(new_rows("new-2"), run["run_dir"], base, ranker=run["ranker"])
    assert (second["added"], second["items"], second["version"]) == (1, 2, 2)
    one, two = NewItemRows.load(base / "1" / NEW_ITEMS_PATH), NewItemRows.load(base / "2" / NEW_ITEMS_PATH)
    assert two.tokens == ["new-1", "new-2"]
    np.testing.assert_array_equal(two.embedding[0], one.embedding[0])
    histories, candidates = [["i1", "i4"]], [["new-1", "i3"]]
    np.testing.assert_allclose(served(base / "2", histories, candidates), served(base / "1", histories, candidates),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"added to the served ranker already .* \['new-1'\]"):
        add_ranker_items(new_rows("new-1"), run["run_dir"], base, ranker=run["ranker"])
    with pytest.raises(ValueError, match=r"already in the ranker's vocabulary, e\.g\. \['i3'\]"):
        add_ranker_items([{"item_id": "i3", "title": "Jumanji (1995)", "genres": "Fantasy"}], run["run_dir"], base,
                         ranker=run["ranker"])
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # nothing written by the refused adds


def test_init_zero_and_bad_inputs_are_clear_errors(run, tmp_path, capsys):
    ranker = run["ranker"]
    zero = ranker.new_item_rows(new_rows("new-3"), init="zero")
    rate = ranker.model.wide.global_rate
    assert zero.init_level.tolist() == [-1] and not zero.embedding.any()
    assert zero.bias[0] == pytest.approx(np.log(rate / (1 - rate)), abs=1e-6)
    with pytest.raises(ValueError, match="init must be one of"):
        ranker.new_item_rows(new_rows("new-3"), init="random")
    with pytest.raises(ValueError, match=r"no text for the store view 'title'.*\['blank'\]"):
        ranker.new_item_rows([{"item_id": "blank", "title": "", "genres": ""}])
    with pytest.raises(ValueError, match=r"lack \['genres'\]"):
        ranker.new_item_rows([{"item_id": "x", "title": "Heat 2"}])
    with pytest.raises(FileNotFoundError, match="no trained CTR model"):
        RankerRun(tmp_path / "no-run")
    base = tmp_path / "ranker"
    good = tsv(tmp_path / "new.tsv", new_rows("new-3"))
    assert main(["items", "add", "--items", str(good), "--ranker", str(tmp_path / "no-run"),
                 "--ranker_out", str(base)]) == 2
    assert "no trained CTR model" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("item_id\ttitle\tgenres\nnew-9\tToo\tmany\tfields\n")
    assert main(["items", "add", "--items", str(bad), "--ranker", str(run["run_dir"]), "--ranker_out", str(base)]) == 2
    assert "bad.tsv line 2" in capsys.readouterr().err
    assert main(["items", "add", "--items", str(good), "--ranker", str(run["run_dir"])]) == 2
    assert "--ranker needs --ranker_out" in capsys.readouterr().err
    assert main(["items", "add", "--items", str(good), "--ranker_out", str(base)]) == 2
    assert "--ranker_out go(es) with --ranker" in capsys.readouterr().err
    assert not base.exists()  # nothing written


def test_cli_adds_to_the_ranker_and_the_store_routes(run, tmp_path, capsys):
    """`tfrec items add --ranker --history_store`: the new item's codes reach the store's SID map in place, its
    events stored before the add land in its buckets (as a full rebuild would file them)."""
    from export.routes import savedmodel_routes

    url = f"sqlite://{tmp_path / 'events.db'}"
    store = open_store(url)
    store.set_routes(savedmodel_routes(str(run["base"] / "1"), "ranker", bucket_size=4, recent=2))
    events = [Event("u1", item, 1000 + t, 1.0, f"e{t}") for t, item in enumerate(["new-1", "i0", "new-1", "i8"])]
    store.append(events)
    store.close()
    base = tmp_path / "ranker"
    new = tsv(tmp_path / "new.tsv", new_rows("new-1"))
    assert main(["items", "add", "--items", str(new), "--ranker", str(run["run_dir"]), "--ranker_out", str(base),
                 "--history_store", url, "--version", "7"]) == 0
    out = capsys.readouterr().out
    assert "1 added to the ranker; version 7" in out and "1 added to the store's SID routes" in out
    codes = NewItemRows.load(base / "7" / NEW_ITEMS_PATH).sids[0]
    store = open_store(url)
    try:
        assert store.routes.sids["new-1"] == tuple(int(c) for c in codes)
        gathered = [e.event_id for e in store.route_events("u1", ["new-1"], 1)]
        assert {"e0", "e2"} <= set(gathered)  # the new item's earlier events, from its buckets
        rebuilt = open_store(f"sqlite://{tmp_path / 'rebuilt.db'}")
        rebuilt.append(events)
        rebuilt.set_routes(SIDRoutes(store.routes.sids, **store.routes.meta()))
        for item in ("new-1", "i0", "i8"):
            assert [e.event_id for e in rebuilt.route_events("u1", [item], 1)] == \
                [e.event_id for e in store.route_events("u1", [item], 1)]
        rebuilt.close()
        with pytest.raises(ValueError, match="already in the store's SID map with codes"):
            store.extend_routes({"i0": (9, 9)})
        assert store.extend_routes({"new-1": tuple(codes)}) == 0  # the same codes again: nothing to do
    finally:
        store.close()


def test_a_running_server_answers_for_the_new_item_with_no_failed_request(run, tmp_path):
    from export.client import PredictClient
    from export.server import ModelServer, ServedModelConfig, ServerOptions

    base = tmp_path / "ranker"
    export_ctr(run["ranker"].model, run["ranker"].item_vocab, base, max_history=8, users=run["data"].users,
               user_profiles=run["data"].user_profiles)
    histories, candidates = [["i1", "i4", "i7"]], [["new-1", "i5"]]
    inputs = {k: v.numpy() for k, v in request(histories, candidates).items()}
    server = ModelServer([ServedModelConfig("ranker", str(base))],
                         ServerOptions(port=0, rest_api_port=-1, file_system_poll_wait_seconds=0.2)).start()
    client = PredictClient(server.grpc_address)

    def score():
        answer = client.predict("ranker", inputs, signature="score")
        return answer.version, np.asarray(answer["probabilities"])[0]

    try:
        with polled(score) as (answers, errors):
            time.sleep(0.5)
            result = add_ranker_items(new_rows("new-1"), run["run_dir"], base, ranker=run["ranker"])
            deadline = time.monotonic() + 60
            while not answers or answers[-1][0] != result["version"]:
                assert time.monotonic() < deadline, "the new version was never served"
                time.sleep(0.05)
            time.sleep(0.3)
    finally:
        client.close()
        server.stop()
    assert errors == [] and {version for version, _ in answers} == {1, 2}
    want = served(base / "2", histories, candidates)[0]
    np.testing.assert_allclose(answers[-1][1], want, atol=1e-6)
    assert abs(answers[0][1][0] - want[0]) > 1e-4  # before the add: new-1 was scored as OOV
    np.testing.assert_allclose(answers[0][1][1], want[1], atol=1e-6)  # a trained item: as before


def test_prepare_writes_nothing_and_checks_the_routes_store(run, tmp_path):
    url = f"sqlite://{tmp_path / 'plain.db'}"
    open_store(url).close()
    with pytest.raises(ValueError, match="no SID routes to extend"):
        prepare_ranker_items(new_rows("new-1"), run["run_dir"], tmp_path / "ranker", history_store=url,
                             ranker=run["ranker"])
    other = open_store(url)
    other.set_routes(SIDRoutes({"i0": (9, 9)}))
    other.close()
    with pytest.raises(ValueError, match="not this ranker's"):
        prepare_ranker_items(new_rows("new-1"), run["run_dir"], tmp_path / "ranker", history_store=url,
                             ranker=run["ranker"])
    assert not (tmp_path / "ranker").exists()


@pytest.mark.parametrize("name", ["din", "sim-hard", "sim-soft", "eta", "twin", "full", "popularity"])
def test_every_ctr_model_is_extended_without_changing_a_trained_row(name):
    """`extend_ctr_model` on every CTR model kind (tiny, untrained, randomised): each per-item table (ID rows,
    the wide part's bias and genres, SIM-hard's genres, SIM-soft's text vectors) gets the new rows; the trained
    ids score exactly as before, served (materialised) or not."""
    from tfrec.ctr.new_items import extend_ctr_model
    from tfrec.models.ctr_baselines import build_ctr_baseline
    from tfrec.models.ctr_wide import WideCTR

    rng = np.random.default_rng(0)
    genres = np.array([[0, 0], [0, 0], [2, 3], [3, 0], [4, 2], [2, 0]], "int32")
    wide = {"item_prior": np.full(6, 0.3), "item_genres": genres, "num_genres": 5, "global_rate": 0.3}
    keras.utils.set_random_seed(0)
    if name == "popularity":
        model = WideCTR(wide=wide)
    else:
        extra = {"item_genres": genres} if name == "sim-hard" else {}
        if name == "sim-soft":
            extra["item_semantic"] = rng.normal(size=(6, 3)).astype("float32")
        model = build_ctr_baseline(name, 6, embedding_dim=4, mlp_units=(4,), top_k=2, wide=wide, **extra)
    x = {"history_ids": np.array([[2, 3, 4], [5, 4, 0]]), "target_id": np.array([5, 3]),
         "history_labels": np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    model(x)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype("float32"))
    before = np.asarray(model(x))
    d = 0 if name == "popularity" else 4
    rows = NewItemRows(["n1", "n2"], rng.normal(size=(2, d)).astype("float32"), np.array([0.5, -0.5], "float32"),
                       np.zeros((2, 0), "int32"), np.array([[3, 0], [4, 2]], "int32"),
                       rng.normal(size=(2, 3 if name == "sim-soft" else 0)).astype("float32"), np.zeros(2, "int32"))
    bigger = extend_ctr_model(model, rows)
    assert bigger.vocab_size == 8
    np.testing.assert_allclose(np.asarray(bigger(x)), before, atol=1e-6)
    if hasattr(bigger, "materialize"):
        np.testing.assert_allclose(np.asarray(bigger.materialize()(x)), before, atol=1e-5)
    tables = {w.path.split("/", 1)[1]: keras.ops.convert_to_numpy(w) for w in bigger.weights}
    np.testing.assert_array_equal(tables["wide/item_bias"][6:], rows.bias)
    np.testing.assert_array_equal(tables["wide/item_genres"][6:], rows.genres)
    if d:
        np.testing.assert_array_equal(tables["item_encoder/item_embedding/embeddings"][6:], rows.embedding)
    if name == "sim-hard":
        np.testing.assert_array_equal(tables["item_genres"][6:], rows.genres)
    if name == "sim-soft":
        np.testing.assert_array_equal(tables["item_semantic"][6:], rows.semantic)
    with pytest.raises(ValueError, match="genres rows are"):
        extend_ctr_model(model, NewItemRows(["n1"], rows.embedding[:1], rows.bias[:1], rows.sids[:1],
                                            np.zeros((1, 5), "int32"), rows.semantic[:1], rows.init_level[:1]))


# --- POST /v1/items with --items_ranker: the server's endpoint does what `tfrec items add --ranker` does ------
ENCODER = "items_encoders:vector_encoder"  # the delta side: a row's vector is its `vector` column


def posted(*tokens):
    """Rows for both sides: the ranker reads title and genres, the delta encoder `vector`."""
    return [{**row, "vector": f"{index + 1.0},0.5"} for index, row in enumerate(new_rows(*tokens))]


def versions(base):
    return sorted(p.name for p in base.iterdir())


def assert_same_rows(a, b):
    """`b`'s items have the same rows in `a` (which may hold earlier items too), array for array."""
    assert a.base == b.base and a.init == b.init
    rows = [a.tokens.index(token) for token in b.tokens]
    for field in NewItemRows.ARRAYS:
        np.testing.assert_array_equal(getattr(a, field)[rows], getattr(b, field), err_msg=field)


@pytest.fixture(scope="module")
def ranker_server(run, tmp_path_factory):
    """A server serving the ranker (version 1) with `--items_delta --items_encoder --items_ranker
    --items_ranker_out` on its base path and a history store holding the ranker's SID routes."""
    from export.routes import savedmodel_routes
    from export.server import ModelServer, ServedModelConfig, ServerOptions

    root = tmp_path_factory.mktemp("ranker_server")
    base = root / "ranker"
    export_ctr(run["ranker"].model, run["ranker"].item_vocab, base, max_history=8, users=run["data"].users,
               user_profiles=run["data"].user_profiles)
    url = f"sqlite://{root / 'events.db'}"
    store = open_store(url)
    store.set_routes(savedmodel_routes(str(base / "1"), "ranker", bucket_size=4, recent=2))
    store.close()
    (root / "delta").mkdir()
    server = ModelServer([ServedModelConfig("ranker", str(base))], ServerOptions(
        port=0, rest_api_port=0, file_system_poll_wait_seconds=0.2, history_store=url,
        items_delta=str(root / "delta" / "items.npz"), items_encoder=ENCODER, items_ranker=str(run["run_dir"]),
        items_ranker_out=str(base))).start()
    yield {"server": server, "base": base, "delta": root / "delta" / "items.npz", "store": url, "root": root}
    server.stop()


def test_post_items_publishes_a_ranker_version_the_server_serves_without_restart(run, ranker_server):
    from export.client import PredictClient
    from export.items_add import load_delta

    server, base = ranker_server["server"], ranker_server["base"]
    histories, candidates = [["i1", "i4", "i7"]], [["new-1", "i5"]]
    inputs = {k: v.numpy() for k, v in request(histories, candidates).items()}
    client = PredictClient(server.grpc_address)

    def score():
        answer = client.predict("ranker", inputs, signature="score")
        return answer.version, np.asarray(answer["probabilities"])[0]

    try:
        assert server.registry.wait_until_available("ranker")
        with polled(score) as (answers, errors):
            time.sleep(0.3)
            status, body = rest(server.rest_url, "/v1/items", {"items": posted("new-1")}, timeout=120)
            assert status == 200, body
            deadline = time.monotonic() + 60
            while not answers or answers[-1][0] != body["ranker"]["version"]:
                assert time.monotonic() < deadline, "the new ranker version was never served"
                time.sleep(0.05)
            time.sleep(0.3)
    finally:
        client.close()
    assert (body["added"], body["replaced"], body["generation"]) == (1, 0, 1)  # today's fields, the delta's
    ranker = body["ranker"]
    assert (ranker["added"], ranker["items"], ranker["version"], ranker["routes"]) == (1, 1, 2, 1)
    assert sum(ranker["init_levels"].values()) == 1 and "path" not in ranker  # no server path in an answer
    assert load_delta(str(ranker_server["delta"])).tokens.tolist() == ["new-1"]
    assert errors == [] and {version for version, _ in answers} == {1, 2}
    want = served(base / "2", histories, candidates)[0]
    np.testing.assert_allclose(answers[-1][1], want, atol=1e-6)  # the ranker's `score` of the new item, served
    assert abs(answers[0][1][0] - want[0]) > 1e-4  # before the POST: new-1 was scored as the OOV id
    codes = NewItemRows.load(base / "2" / NEW_ITEMS_PATH).sids[0]
    store = open_store(ranker_server["store"])
    try:  # the server's history store routes the new item (as `tfrec items add --history_store`)
        assert store.routes.sids["new-1"] == tuple(int(c) for c in codes)
    finally:
        store.close()


def test_the_endpoint_and_the_cli_give_the_same_ranker_rows(run, ranker_server, tmp_path):
    base = ranker_server["base"]
    status, body = rest(ranker_server["server"].rest_url, "/v1/items", {"items": posted("new-2", "new-3")}, timeout=120)
    assert status == 200, body
    new = tsv(tmp_path / "new.tsv", posted("new-2", "new-3"))
    assert main(["items", "add", "--items", str(new), "--ranker", str(run["run_dir"]), "--ranker_out",
                 str(tmp_path / "cli")]) == 0
    by_endpoint = NewItemRows.load(base / str(body["ranker"]["version"]) / NEW_ITEMS_PATH)
    by_cli = NewItemRows.load(tmp_path / "cli" / "1" / NEW_ITEMS_PATH)
    assert by_endpoint.tokens[-2:] == by_cli.tokens == ["new-2", "new-3"]
    assert_same_rows(by_endpoint, by_cli)


def test_rows_the_ranker_refuses_are_400_and_nothing_is_written(run, ranker_server):
    from export.items_add import load_delta

    base, delta = ranker_server["base"], str(ranker_server["delta"])
    before = (versions(base), load_delta(delta).generation)
    url = ranker_server["server"].rest_url
    trained = [{"item_id": "i3", "title": "Jumanji (1995)", "genres": "Fantasy", "vector": "1,1"}]
    status, body = rest(url, "/v1/items", {"items": trained}, timeout=120)
    assert status == 400 and "the ranker refused the items" in body["error"] and "'i3'" in body["error"], body
    status, body = rest(url, "/v1/items", {"items": [{"item_id": "no-genres", "title": "X", "vector": "1,1"}]}, timeout=120)
    assert status == 400 and "lack ['genres']" in body["error"], body
    assert (versions(base), load_delta(delta).generation) == before


def test_a_failing_ranker_export_answers_500_and_leaves_no_half_state(run, tmp_path):
    """`tfrec serve --items_ranker` in its own process whose files may not grow past 192 KiB (`RLIMIT_FSIZE`, a
    full disk's stand-in): the ranker's `saved_model.pb` (~270 KiB) cannot be written, the delta file (~1 KiB)
    could. The ranker is published first, so the failed export leaves the delta untouched and no version
    (nor a half-written folder) in the base path; the server keeps serving version 1."""
    import os
    import resource
    import signal
    import subprocess
    import sys
    import urllib.request

    base = tmp_path / "ranker"
    export_ctr(run["ranker"].model, run["ranker"].item_vocab, base, max_history=8, users=run["data"].users,
               user_profiles=run["data"].user_profiles)
    delta = tmp_path / "items.npz"
    tests = os.path.dirname(os.path.abspath(__file__))

    def small_files():  # in the child only; Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (192 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "tfrec_cli", "serve", "--model_name", "ranker", "--model_base_path", str(base),
               "--port", "0", "--rest_api_port", "0", "--items_delta", str(delta), "--items_encoder", ENCODER,
               "--items_ranker", str(run["run_dir"]), "--items_ranker_out", str(base)]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             preexec_fn=small_files,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])})
    try:
        url = reported_rest_url(serve)
        assert url, "the server did not start"
        status, body = rest(url, "/v1/items", {"items": posted("new-1")}, timeout=120)
        assert status == 500 and "the ranker's new version could not be published" in body["error"], body
        assert "nothing was added" in body["error"]
        assert not delta.exists() and versions(base) == ["1"]  # no delta write, no version, no staging folder
        with urllib.request.urlopen(f"{url}/v1/models/ranker", timeout=30) as response:
            states = json.loads(response.read())["model_version_status"]
        assert [(s["version"], s["state"]) for s in states] == [("1", "AVAILABLE")]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0


def test_a_delta_write_failing_after_the_ranker_version_withdraws_it(run, tmp_path):
    """The other order's failure: the ranker version is out, then the delta file cannot be written (here a
    folder squats its temporary name): the version is withdrawn, the delta file is as it was, and the same
    add succeeds once the obstacle is gone."""
    import os
    import threading

    import items_encoders
    from export.items_add import DeltaFailed, add_rows
    from export.ranker_items import RankerTarget

    base = tmp_path / "ranker"
    export_ctr(run["ranker"].model, run["ranker"].item_vocab, base, max_history=8, users=run["data"].users,
               user_profiles=run["data"].user_profiles)
    delta = tmp_path / "items.npz"
    assert add_rows(posted("new-1"), str(delta), items_encoders.vector_encoder)["generation"] == 1
    before = delta.read_bytes()
    squatter = tmp_path / f"items.npz.tmp{os.getpid()}-{threading.get_ident()}.npz"
    squatter.mkdir()
    target = RankerTarget(str(run["run_dir"]), str(base), ranker=run["ranker"])
    with pytest.raises(DeltaFailed, match="the ranker's version 2 was withdrawn"):
        add_rows(posted("new-2"), str(delta), items_encoders.vector_encoder, ranker=target)
    assert versions(base) == ["1"] and delta.read_bytes() == before
    squatter.rmdir()
    result = add_rows(posted("new-2"), str(delta), items_encoders.vector_encoder, ranker=target)
    assert (result["generation"], result["ranker"]["version"], result["ranker"]["items"]) == (2, 2, 1)


def test_ranker_routes_of_another_model_fail_start_up_naming_the_flags(run, tmp_path):
    from export.server import ModelServer, ServedModelConfig, ServerOptions

    url = f"sqlite://{tmp_path / 'events.db'}"
    store = open_store(url)
    store.set_routes(SIDRoutes({"i0": (9, 9)}))
    store.close()
    with pytest.raises(ValueError, match=r"--items_ranker with --history_store: .*not this ranker's"):
        ModelServer([ServedModelConfig("ranker", str(tmp_path / "ranker"))], ServerOptions(
            port=0, rest_api_port=-1, history_store=url, items_delta=str(tmp_path / "items.npz"),
            items_encoder=ENCODER, items_ranker=str(run["run_dir"]), items_ranker_out=str(tmp_path / "ranker")))
