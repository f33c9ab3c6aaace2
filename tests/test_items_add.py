"""New items without retraining (issue 22 item 5, serving side): the delta file, its merge into a served
retrieval model, no restart and no failed request while it changes, and `tfrec items add`."""

import threading
import time

import keras
import numpy as np
import pytest

from export.client import PredictClient
from export.items_add import add_items, add_items_file, load_delta, load_encoder, merge_top_k, read_items_file
from tfrec.serving.retrieval import build_indexes
from export.saved_model import catalog_table, export_index, export_sequential
from export.server import ModelServer, ServerOptions
from export.server.config import ServedModelConfig as ServedModel
from export.server.errors import ServingError
from tfrec_cli.main import main
from tfrec.config import ModelConfig
from tfrec.data.vocab import Vocabulary
from tfrec.training import build_model

TOKENS = [f"i{n}" for n in range(30)]
K = 5
TABLE = {}  # token -> catalogue vector of the served model (for the encoder below)


def like_encoder(rows):
    """An encoder for the CLI test: a new item's vector is the served catalogue vector of the item its
    `like` column names, times its `boost` (the interface DMESR's encoder implements)."""
    vectors = np.stack([TABLE[row["like"]] * float(row["boost"]) for row in rows]).astype("float32")
    return vectors, None


def export_models(root):
    """A tiny SASRec recommender and its brute-force retrieval export under `root` (TABLE filled); returns
    `configs(delta, reload_seconds)`: the served models, with `live` = the retrieval merged with `delta`."""
    vocab = Vocabulary(TOKENS)
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(embedding_dim=8, max_length=6, num_layers=1, num_heads=1, dropout=0.0),
                        vocab.size, seed=0)
    model.score_items(np.array([[2, 3, 0]]))  # build
    export_sequential(model, vocab, root / "recommender", k=K)
    table, tokens = catalog_table(model, vocab)
    TABLE.update({t.decode() if isinstance(t, bytes) else str(t): np.asarray(v) for t, v in zip(tokens, table)})
    export_index(build_indexes(table, tokens, k=K, kinds=("bruteforce",))["bruteforce"], root / "retrieval", 1)

    def configs(delta, reload_seconds="0.1"):
        return [ServedModel("recommender", str(root / "recommender")),
                ServedModel("retrieval", str(root / "retrieval")),
                ServedModel("live", f"export.delta_retrieval:factory?retrieval=retrieval&delta={delta}"
                                    f"&reload_seconds={reload_seconds}", platform="python")]

    return configs


def user_query(client):
    """The query vector of the user who saw i1, i2, i3 (the recommender's `user_embedding`)."""
    query = client.predict("recommender", {"history": [["i1", "i2", "i3"]]}, signature="user_embedding")
    return np.asarray(query["embedding"], np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    configs = export_models(root)
    delta = root / "delta" / "items.npz"
    delta.parent.mkdir()
    server = ModelServer(configs(delta), ServerOptions(port=0, rest_api_port=-1,
                                                       allowed_python_modules=("export.delta_retrieval",))).start()
    client = PredictClient(server.grpc_address)
    yield {"client": client, "delta": str(delta), "query": user_query(client), "root": root}
    client.close()
    server.stop()


def retrieve(served, model="live"):
    out = served["client"].predict(model, {"queries": served["query"]}, signature="retrieve")
    return [t.decode() for t in out["item_ids"][0]], out["scores"][0]


def test_a_new_item_becomes_recommendable_without_restart_and_no_request_fails(served):
    (ids, scores), (base_ids, base_scores) = retrieve(served), retrieve(served, "retrieval")
    assert ids == base_ids and np.allclose(scores, base_scores)  # no delta file yet: the base answer
    errors, answers, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                answers.append(retrieve(served)[0])
            except ServingError as err:
                errors.append(err)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.3)
        added_at = time.monotonic()
        assert add_items(served["delta"], ["brand-new"], served["query"] * 100.0)["generation"] == 1
        while retrieve(served)[0][0] != "brand-new":
            assert time.monotonic() - added_at < 10, "the new item never became recommendable"
            time.sleep(0.02)
        seconds = time.monotonic() - added_at
        add_items(served["delta"], ["brand-new"], served["query"] * -100.0)  # replaced: now the worst item
        while "brand-new" in retrieve(served)[0]:
            assert time.monotonic() - added_at < 20
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and len(answers) > 5
    assert seconds < 5
    ids, scores = retrieve(served)
    base_ids, base_scores = retrieve(served, "retrieval")
    assert ids == base_ids and np.allclose(scores, base_scores)  # the replaced item fell out of the top-k


def test_a_corrupt_delta_keeps_the_last_good_one(served):
    add_items(served["delta"], ["kept"], served["query"] * 50.0)
    deadline = time.monotonic() + 10
    while retrieve(served)[0][0] != "kept":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with open(served["delta"], "wb") as handle:
        handle.write(b"not an npz")
    time.sleep(0.3)
    assert retrieve(served)[0][0] == "kept"  # still served, from the last good delta
    with pytest.raises(ValueError, match="not readable"):
        load_delta(served["delta"])


def test_tfrec_items_add_with_an_encoder(served, tmp_path, capsys):
    delta = str(tmp_path / "items.npz")
    items = tmp_path / "new.tsv"
    items.write_text("item_id\ttitle\tlike\tboost\nn1\tNew one\ti4\t2\nn2\tNew two\ti5\t1\n")
    assert main(["items", "add", "--items", str(items), "--delta", delta,
                 "--encoder", "test_items_add:like_encoder"]) == 0
    assert "2 added, 0 replaced; the delta holds 2 items (generation 1)" in capsys.readouterr().out
    got = load_delta(delta)
    assert got.tokens.tolist() == ["n1", "n2"]
    np.testing.assert_allclose(got.vectors[0], TABLE["i4"] * 2, rtol=1e-6)
    assert add_items_file(str(items), delta, like_encoder)["replaced"] == 2


def test_bad_items_and_deltas_are_clear_errors(tmp_path):
    path = str(tmp_path / "d.npz")
    add_items(path, ["a"], np.ones((1, 4)))
    for tokens, vectors, needle in ((["b"], np.ones((1, 3)), "dims"), (["b", "b"], np.ones((2, 4)), "twice"),
                                    (["b"], np.full((1, 4), np.nan), "NaN"), (["b\tc"], np.ones((1, 4)), "tabs"),
                                    ([], np.ones((0, 4)), "no items"), (["b"], np.ones((2, 4)), "vectors must be")):
        with pytest.raises(ValueError, match=needle):
            add_items(path, tokens, vectors)
    assert load_delta(path).tokens.tolist() == ["a"]  # nothing written by a refused add
    (tmp_path / "bad.tsv").write_text("title\nx\n")
    with pytest.raises(ValueError, match="item_id"):
        read_items_file(str(tmp_path / "bad.tsv"))
    (tmp_path / "short.tsv").write_text("item_id\ttitle\nx\n")
    with pytest.raises(ValueError, match="line 2"):
        read_items_file(str(tmp_path / "short.tsv"))
    for spec in ("nocolon", "no_such_module_x:f", "export.items_add:nothing"):
        with pytest.raises(ValueError, match="encoder"):
            load_encoder(spec)


def test_merge_keeps_the_best_and_lets_the_delta_override():
    ids, scores = merge_top_k(np.array([[b"a", b"b", b""]], dtype=object), np.array([[3.0, 1.0, -9.0]], "float32"),
                              np.array(["b", "c"]), np.array([[5.0, 2.0]], "float32"), 4)
    assert ids.tolist() == [[b"b", b"a", b"c", b""]]
    assert scores[0, :3].tolist() == [5.0, 3.0, 2.0] and scores[0, 3] < -1e38
