"""`tfrec ask`: a real user's history in, the served top-k out (over real gRPC)."""

import keras
import numpy as np
import pandas as pd
import pytest

from export.client import PredictClient
from export.demo import ask, format_answer, item_titles, user_history
from tfrec.serving.retrieval import build_indexes
from export.saved_model import catalog_table, export_index, export_sequential
from export.server import ModelServer, ServerOptions
from export.server.config import ServedModelConfig as ServedModel
import tfrec_cli as cli
from tfrec.config import ModelConfig
from tfrec.data.preprocess import prepare, save_prepared
from tfrec.training import build_model

NUM_ITEMS, K = 40, 5


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(NUM_ITEMS)}", t) for u in range(6) for t in range(8 + u)]
    rows += [(f"u{u}", f"i{i}", 100) for u in range(6) for i in range(NUM_ITEMS) if u == 0]  # every item seen
    rows.append(("lonely", "i1", 5))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    out = tmp_path_factory.mktemp("prepared")
    save_prepared(prepare(frame), out)
    return out


@pytest.fixture(scope="module")
def served(prepared_dir, tmp_path_factory):
    from tfrec.data.preprocess import load_prepared

    vocab = load_prepared(prepared_dir).item_vocab
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(embedding_dim=8, max_length=6, num_layers=1, num_heads=1, dropout=0.0),
                        vocab.size, seed=0)
    base = tmp_path_factory.mktemp("servables")
    export_sequential(model, vocab, base / "recommender", k=K)
    table, tokens = catalog_table(model, vocab)
    index = build_indexes(table, tokens, k=K, kinds=("bruteforce",))["bruteforce"]
    export_index(index, base / "retrieval", version=1)
    server = ModelServer([ServedModel("recommender", str(base / "recommender")),
                          ServedModel("retrieval", str(base / "retrieval"))],
                         ServerOptions(port=0, rest_api_port=-1)).start()
    yield model, vocab, server
    server.stop()


def test_user_history_holds_out_the_last_item(prepared_dir):
    from tfrec.data.preprocess import load_prepared

    data = load_prepared(prepared_dir)
    user, history, held_out = user_history(prepared_dir, user="u3")
    row = list(data.user_vocab.tokens).index("u3")
    tokens = [data.item_vocab.tokens[i - 2] for i in data.sequences[row]]
    assert user == "u3" and history == tokens[:-1] and held_out == tokens[-1]
    assert user_history(prepared_dir, user_index=0)[0] == data.user_vocab.tokens[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"user": "nobody"}, "'nobody' is not in"),
    ({"user_index": 99}, "--user-index must be in"),
    ({"user": "lonely"}, "need 2"),
])
def test_user_history_errors_name_the_problem(prepared_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        user_history(prepared_dir, **kwargs)


def test_served_answer_equals_the_model_top_k(served, prepared_dir):
    model, vocab, server = served
    _, history, held_out = user_history(prepared_dir, user="u5")
    with PredictClient(server.grpc_address) as client:
        answer = ask(client, history, k=K, recommender="recommender", retrieval="retrieval")
        excluded = ask(client, history, k=K, exclude_history=True, recommender="recommender", retrieval="retrieval")
    ids = vocab.lookup(history)[None, :]
    scores = np.asarray(model.score_items(ids))[0, 2:]
    want = [vocab.tokens[j] for j in np.argsort(-scores, kind="stable")[:K]]
    assert [t for t, _ in answer["exact"]] == want
    assert [t for t, _ in answer["retrieved"]] == want and answer["recall"] == 1.0
    np.testing.assert_allclose([s for _, s in answer["retrieved"]], np.sort(scores)[::-1][:K], rtol=1e-5)
    assert not {t for t, _ in excluded["exact"] + excluded["retrieved"]} & set(history)
    text = format_answer("u5", history, held_out, answer, {want[0]: "The Best Item"})
    assert "The Best Item" in text and "recall of the index" in text and f"held-out item {held_out}" in text


def test_item_titles_of_a_bundled_dataset():
    titles = item_titles("movielens-100k")
    assert len(titles) > 1000 and all(isinstance(v, str) for v in list(titles.values())[:10])
    assert item_titles(None) == {}


def test_cli_ask_prints_titles_and_one_line_errors(served, prepared_dir, capsys):
    _, _, server = served
    argv = ["ask", "--address", server.grpc_address, "--prepared", str(prepared_dir), "--user", "u2",
            "--k", "3", "--retrieval", "retrieval"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "user u2" in out and "top-3 from the retrieval servable 'retrieval'" in out
    assert cli.main(argv[:-2] + ["--retrieval", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfrec ask: error:") and "no-such-model" in err and len(err.splitlines()) == 1
