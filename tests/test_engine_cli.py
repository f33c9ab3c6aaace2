"""`tfrec train` as a new user meets the engine (real subprocesses, small data).

- resume: a `tfrec train` process is killed (SIGKILL) after its second epoch's
  checkpoint, mid-run; `tfrec train --resume` then ends with the same losses,
  best epoch and validation/test metrics as an uninterrupted run with the same
  seed (tolerance: exact equality; float32 CPU kernels are deterministic here);
- a user file ordered by a `position` column (amazon-toys layout) trains, and the
  tables show the popularity baseline beside the model;
- `tfrec train --help` lists the config keys.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tfrec.data.readers import DEFAULT_DATA_ROOT

ROOT = Path(__file__).resolve().parents[1]
ML100K = DEFAULT_DATA_ROOT / "movielens-100k"
TOYS = DEFAULT_DATA_ROOT / "amazon-toys" / "interactions.tsv"

SMALL = ["model.backbone=sasrec", "model.embedding_dim=16", "model.num_layers=1", "model.max_length=20",
         "model.dropout=0.3", "train.batch_size=64", "train.learning_rate=0.005", "train.seed=11",
         "train.patience=10", "eval.protocols=[full]"]


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
    env.pop("TF_CONFIG", None)
    return env


def _tfrec(*args):
    return [sys.executable, "-m", "tfrec_cli", *args]


@pytest.mark.skipif(not ML100K.is_dir(), reason="bundled movielens-100k not available")
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["train", *SMALL, "data.dataset=movielens-100k", "train.epochs=4", "name=run"]
    full = subprocess.run(_tfrec(*args, f"output_dir={tmp_path / 'full'}"), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    state = out / "run" / "backup" / "state.json"
    proc = subprocess.Popen(_tfrec(*args, f"output_dir={out}"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["epochs_done"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run" / "results.json").exists()  # it really died before finishing

    resumed = subprocess.run(_tfrec(*args, f"output_dir={out}", "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    a = json.loads((tmp_path / "full" / "run" / "results.json").read_text())
    b = json.loads((out / "run" / "results.json").read_text())
    assert b["resumed_from_epoch"] >= 2
    assert b["loss_curve"] == a["loss_curve"]
    assert b["best_epoch"] == a["best_epoch"] and b["epochs"] == a["epochs"] == 4
    assert [h["ndcg@10"] for h in b["validation_curve"]] == [h["ndcg@10"] for h in a["validation_curve"]]
    assert b["splits"] == a["splits"]


@pytest.mark.skipif(not TOYS.is_file(), reason="bundled amazon-toys not available")
def test_position_ordered_user_file_trains_and_prints_the_popularity_baseline(tmp_path):
    lines = TOYS.read_text().splitlines()
    assert lines[0].split("\t") == ["user_id", "item_id", "position"]
    user_file = tmp_path / "my_interactions.tsv"
    user_file.write_text("\n".join(lines[:6001]) + "\n")  # the first users of the file, as a user would bring
    result = subprocess.run(
        _tfrec("train", *SMALL, f"data.interactions_path={user_file}", "train.epochs=1",
               f"output_dir={tmp_path}", "name=mine"),
        env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()]
    models = {(row[0], row[1]) for row in rows if len(row) > 2 and row[0] in ("valid", "test")}
    assert models == {("valid", "sasrec"), ("test", "sasrec"), ("valid", "popularity"), ("test", "popularity")}
    assert f"tensorboard --logdir {tmp_path / 'mine' / 'logs'}" in result.stdout
    saved = json.loads((tmp_path / "mine" / "results.json").read_text())
    assert saved["reference"]["popularity"]["test"]["full"]["ndcg@10"] >= 0
    assert list((tmp_path / "mine" / "logs").rglob("events.out.tfevents.*"))


def test_train_help_lists_the_config_keys():
    result = subprocess.run(_tfrec("train", "--help"), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for key in ("--resume", "train.max_train_seconds = null", "train.distribution = \"none\"",
                "data.interactions_path = null", "model.backbone = \"sasrec\""):
        assert key in result.stdout, key
    ctr = subprocess.run(_tfrec("ctr", "train", "--help"), env=_env(), capture_output=True, text=True, timeout=300)
    assert "--resume" in ctr.stdout and "train.max_train_seconds = null" in ctr.stdout
