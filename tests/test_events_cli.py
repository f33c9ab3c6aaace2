"""`tfrec events ingest` / `delete`: validated whole before writing, chunked, resumable after a kill."""

import os
import signal
import subprocess
import sys

import pytest

from history_servers import redis_server
from tfrec_cli import main
from tfrec.history import open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_events(path, count, users=7, header=True):
    with open(path, "w", encoding="utf-8") as handle:
        if header:
            handle.write("user\titem\ttimestamp\tfeedback\tevent_id\n")
        for i in range(count):
            handle.write(f"user-{i % users}\titem-{i % 13}\t{1000 + i // 3}\t1.0\tev-{i}\n")
    return path


def count_all(url, users=7):
    store = open_store(url)
    try:
        return sum(store.count(f"user-{u}") for u in range(users))
    finally:
        store.close()


def test_ingest_then_rerun_appends_nothing(tmp_path, capsys):
    path = write_events(tmp_path / "events.tsv", 100)
    url = f"sqlite://{tmp_path / 'h.db'}"
    assert main(["events", "ingest", "--file", str(path), "--store", url, "--chunk_size", "30"]) == 0
    assert "100 events read, 100 appended (0 already stored)" in capsys.readouterr().out
    assert main(["events", "ingest", "--file", str(path), "--store", url]) == 0
    assert "100 events read, 0 appended (100 already stored)" in capsys.readouterr().out
    store = open_store(url)
    # user-0: events 0, 7, 14, ...; timestamps 1000 + i // 3 (ties broken by file order)
    assert store.recent_items("user-0", 3) == [f"item-{i % 13}" for i in (84, 91, 98)]
    store.close()
    assert main(["events", "delete", "--user", "user-0", "--store", url]) == 0
    assert "15 events of user 'user-0' deleted" in capsys.readouterr().out
    assert count_all(url) == 85


def test_malformed_lines_are_listed_and_nothing_is_written(tmp_path, capsys):
    path = write_events(tmp_path / "events.tsv", 10)
    with open(path, "ab") as handle:
        handle.write(b"u\ti\tnot-a-time\t1.0\te\n")  # line 12
        handle.write(b"u\ti\t5\t1.0\n")  # line 13: 4 fields
        handle.write(b"u\t\t5\t1.0\te\n")  # line 14: empty item
        handle.write(b"u\ti\t5\tnan\te\n")  # line 15
        handle.write(b"\xff\xfe\n")  # line 16
        handle.write(b"u\t" + b"x" * 5000 + b"\t5\t1\te\n")  # line 17: too long
        handle.write(b"u\tok\t5\t1\tlast\n")  # line 18: fine
    url = f"sqlite://{tmp_path / 'h.db'}"
    assert main(["events", "ingest", "--file", str(path), "--store", url]) == 2
    err = capsys.readouterr().err
    for needle in ("line 12: timestamp: not an integer", "line 13: line: 4 tab-separated fields",
                   "line 14: item: must not be empty", "line 15: feedback: must be finite", "line 16: line: not UTF-8",
                   "line 17: line: longer than", "nothing written"):
        assert needle in err
    assert "line 18" not in err
    store = open_store(url)
    assert count_all(url) == 0 and store.count("u") == 0
    store.close()
    assert main(["events", "ingest", "--file", str(tmp_path / "missing.tsv"), "--store", url]) == 2
    assert main(["events", "ingest", "--file", str(path), "--store", "ftp://x"]) == 2
    assert main(["events", "ingest", "--file", str(path), "--store", url, "--chunk_size", "0"]) == 2


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_ingest_resumes_after_sigkill(backend, tmp_path):
    total, chunk = 6000, 20
    path = write_events(tmp_path / "events.tsv", total)

    def run(url):
        command = [sys.executable, "-m", "tfrec_cli", "events", "ingest", "--file", str(path), "--store", url,
                   "--chunk_size", str(chunk), "--progress"]
        env = {**os.environ, "PYTHONPATH": ROOT}
        ingest = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3):  # a few chunks committed, then kill -9 mid-ingestion
            assert "committed through line" in ingest.stdout.readline()
        os.kill(ingest.pid, signal.SIGKILL)
        ingest.wait()
        stored = count_all(url)
        assert 3 * chunk <= stored < total and stored % chunk == 0, f"{stored} stored: a chunk was half-written"
        done = subprocess.run(command[:-1], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"{total} events read, {total - stored} appended ({stored} already stored)" in done.stdout
        assert count_all(url) == total

    if backend == "sqlite":
        run(f"sqlite://{tmp_path / 'h.db'}")
    else:
        with redis_server(tmp_path) as (url, _):
            run(url)


def test_events_ask_posts_a_prepared_user_then_answers_by_user_id(tmp_path, capsys, tmp_path_factory):
    """The main job's step 7 (scripts/main.sh): events over REST, then recommend by id == by history."""
    import keras

    from export.saved_model import export_sequential
    from export.server import ModelServer, ServerOptions
    from export.server.config import ServedModelConfig as ServedModel
    from test_demo import prepared_dir as make_prepared
    from tfrec.config import ModelConfig
    from tfrec.data.preprocess import load_prepared
    from tfrec.training import build_model

    prepared = make_prepared.__wrapped__(tmp_path_factory)
    vocab = load_prepared(prepared).item_vocab
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(embedding_dim=8, max_length=6, num_layers=1, num_heads=1, dropout=0.0),
                        vocab.size, seed=0)
    export_sequential(model, vocab, tmp_path / "recommender", k=5)
    server = ModelServer([ServedModel("recommender", str(tmp_path / "recommender"))],
                         ServerOptions(port=0, rest_api_port=0,
                                       history_store=f"sqlite://{tmp_path / 'events.db'}")).start()
    try:
        args = ["events", "ask", "--address", server.grpc_address, "--rest_url", server.rest_url,
                "--prepared", str(prepared), "--user", "u3", "--k", "5"]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "user u3: 10 events posted to /v1/events (10 new); top-5 by user_id:" in out
        assert "by user_id == by history" in out and out.count("\n   ") + out.count("\n  ") >= 5
        assert main(args) == 0  # idempotent: the same event ids
        assert "(0 new)" in capsys.readouterr().out
    finally:
        server.stop()
