"""The `tfrec` command: train -> evaluate round trip, prepare, and clean errors."""

import json

import pytest

from tfrec_cli import main
from tfrec.data.preprocess import load_prepared
from tfrec.data.readers import DEFAULT_DATA_ROOT

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DATA_ROOT / "movielens-100k").is_dir(), reason="bundled movielens-100k not available"
)

SMALL = [
    "data.dataset=movielens-100k", "model.embedding_dim=16", "model.num_layers=1",
    "model.max_length=10", "train.epochs=1", "train.batch_size=256", "eval.protocols=[full, sampled100]",
]


def test_train_then_evaluate(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"name: cli\noutput_dir: {tmp_path}\nmodel: {{backbone: sasrec}}\n")
    assert main(["train", "--config", str(config), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "protocol: full" in out and "protocol: sampled100" in out
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["epochs"] == 1

    assert main(["evaluate", "--config", str(config), *SMALL]) == 0
    evaluated = json.loads((tmp_path / "cli" / "evaluation.json").read_text())
    # The saved model re-evaluates to the same numbers it reported after training.
    for split in ("valid", "test"):
        for protocol in ("full", "sampled100"):
            assert evaluated["splits"][split][protocol] == pytest.approx(results["splits"][split][protocol])


def test_prepare_writes_vocab_and_sequences(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--dataset", "movielens-100k", "--out", str(out), "--user-core", "5"]) == 0
    data = load_prepared(out)
    assert data.metadata["num_interactions"] == 100_000
    assert "prepared 100000 interactions" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "model.no_such_key=1"], "unknown config key(s) model.no_such_key"),
        (["train", "train.epochs=abc"], "train.epochs expects int"),
        (["train", "--config", "/nonexistent.yaml"], "config file not found"),
        (["evaluate", "output_dir=/nonexistent-dir", "data.dataset=movielens-100k"], "no trained model"),
        (["train", "data.dataset=no-such-data"], "unknown dataset"),
        (["prepare", "--input", "/nonexistent.tsv", "--out", "/tmp/x"], "file not found"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
