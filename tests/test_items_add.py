"""New items without retraining (issue 22 item 5, serving side): the delta file, its merge into a served
retrieval model, no restart and no failed request while it changes, and `tfrec items add`."""

import threading
import time

import keras
import numpy as np
import pytest

from export.client import PredictClient
from export.items_add import (MAX_FIELD_BYTES, EncoderFailed, add_items, add_items_file, add_rows, load_delta,
                              load_encoder, merge_top_k, read_items_file)
from tfrec.serving.retrieval import build_indexes
from export.saved_model import catalog_table, export_index, export_sequential
from export.server import ModelServer, ServerOptions
from export.server.config import ServedModelConfig as ServedModel
from polling import polled
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
    with polled(lambda: retrieve(served)[0]) as (answers, errors):
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
                                    (["b"], np.full((1, 4), np.nan), "NaN"), (["b\tc"], np.ones((1, 4)), "control character"),
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
    # the rows' rules are the endpoint's (export.items_add.check_item_row), named by line
    (tmp_path / "dup.tsv").write_text("item_id\ttitle\nx\ta\ny\tb\nx\tc\n")
    with pytest.raises(ValueError, match=r"line 4 field 'item_id': 'x' already appears in .*line 2"):
        read_items_file(str(tmp_path / "dup.tsv"))
    (tmp_path / "long.tsv").write_text("item_id\ttitle\nx\t" + "t" * (MAX_FIELD_BYTES + 1) + "\n")
    with pytest.raises(ValueError, match=f"line 2 field 'title': .* more than the limit of {MAX_FIELD_BYTES}"):
        read_items_file(str(tmp_path / "long.tsv"))
    (tmp_path / "empty_id.tsv").write_text("item_id\ttitle\nx\ta\n\tb\n")
    with pytest.raises(ValueError, match="line 3 field 'item_id': empty item_id"):
        read_items_file(str(tmp_path / "empty_id.tsv"))
    for spec in ("nocolon", "no_such_module_x:f", "export.items_add:nothing"):
        with pytest.raises(ValueError, match="encoder"):
            load_encoder(spec)


def test_merge_keeps_the_best_and_lets_the_delta_override():
    ids, scores = merge_top_k(np.array([[b"a", b"b", b""]], dtype=object), np.array([[3.0, 1.0, -9.0]], "float32"),
                              np.array(["b", "c"]), np.array([[5.0, 2.0]], "float32"), 4)
    assert ids.tolist() == [[b"b", b"a", b"c", b""]]
    assert scores[0, :3].tolist() == [5.0, 3.0, 2.0] and scores[0, 3] < -1e38


def test_add_rows_sorts_encoder_failures_and_writes_nothing(tmp_path, capsys):
    delta = str(tmp_path / "d.npz")
    rows = [{"item_id": "a", "like": "i4", "boost": "1"}]
    assert add_rows(rows, delta, like_encoder)["added"] == 1
    before = open(delta, "rb").read()

    def refuses(rows):
        raise ValueError("no such column")

    def crashes(rows):
        raise KeyError("like")

    for encoder, kind, needle in ((refuses, ValueError, "the encoder refused the items: no such column"),
                                  (crashes, EncoderFailed, "the encoder failed: KeyError"),
                                  (lambda rows: np.ones((1, 8)), EncoderFailed, "must return"),
                                  (lambda rows: (np.ones((2, 8)), None), EncoderFailed, "malformed output"),
                                  (lambda rows: (np.ones((1, 3)), None), ValueError, "delta file refused")):
        with pytest.raises(kind, match=needle):
            add_rows(rows, delta, encoder)
    assert open(delta, "rb").read() == before
    items = tmp_path / "new.tsv"
    items.write_text("item_id\tlike\tboost\nn1\tno-such-item\t1\n")  # like_encoder: KeyError
    assert main(["items", "add", "--items", str(items), "--delta", delta,
                 "--encoder", "test_items_add:like_encoder"]) == 2
    assert "the encoder failed: KeyError" in capsys.readouterr().err


def test_concurrent_add_items_calls_take_turns(tmp_path):
    """`add_items` holds an flock on `<delta>.lock` for its read-modify-write: concurrent adds (threads here;
    a `tfrec items add` beside a server's `POST /v1/items` the same) never lose each other's items."""
    path = str(tmp_path / "d.npz")
    errors = []

    def add(t):
        try:
            for i in range(5):
                add_items(path, [f"t{t}-{i}"], np.full((1, 4), t, "float32"))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=add, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got = load_delta(path)
    assert errors == [] and sorted(got.tokens.tolist()) == sorted(f"t{t}-{i}" for t in range(6) for i in range(5))
    assert got.generation == 30
