"""SavedModel export: sequential recommenders, CTR rankers and retrieval indexes, raw tokens in and out.

`export_sequential(model, item_vocab, base_dir)` writes a trained
`NextItemRecommender` as a `tf.Module` SavedModel whose graph is
`vocabulary lookup -> backbone -> dot product with the item table -> top-K -> tokens`,
stock TF ops only. Signatures (the contract of `tfrec.serving`, shared with the
TFX Trainer's SavedModel):

- `recommend` (also `serving_default`):
  `history: string (batch, None)`, right- or left-padded with `""`;
  `exclude_history: bool (batch,)`, per row, True = never return the row's
  history items (per row rather than a scalar so requests can be batched along
  dimension 0) -> `item_ids: string (batch, k)`, `scores: float32 (batch, k)`,
  best first. Scores equal `model.score_items` (dot product / temperature).
- `user_embedding`: `history` -> `embedding: float32 (batch, dim)`, the query of
  the retrieval servables (`export_index`), whose table is already divided by
  the model's temperature, so `retrieve(user_embedding(h))` = `recommend(h)`.
- `recommend_examples`: `serialized: string (batch,)` `tf.Example`s with a bytes
  feature `history` (item tokens, oldest first) and an optional int feature
  `exclude_history` (default 0) -> the outputs of `recommend` (for the TFX
  Evaluator).

Input handling (the same in every signature): `""` is padding and unknown
tokens are dropped (the model never trained an out-of-vocabulary vector);
the remaining items keep their order and only the last `max_length` are read.
A row left with no known item fails the request with INVALID_ARGUMENT
("history has no known item token"): callers fall back (e.g. to popular items).
`k` is fixed at export (the output shape). When a user's unseen items are fewer
than `k`, the empty slots hold `""` with score `EXCLUDED_SCORE`.

`export_ctr(model, item_vocab, base_dir)` writes a trained lifelong CTR model
(`tfrec.models.ctr_baselines.CTRModel`: R2LED or a baseline) as a ranker, graph
`vocabulary lookup -> most recent max_history known items -> model.score`, stock
TF ops only. Signatures:

- `score` (also `serving_default`): `history: string (batch, None)` (the
  user's item tokens, oldest first, padded with `""`), `candidates: string
  (batch, None)` (items to score, padded with `""`), the feedback of every
  history item `history_ratings: float32`, `history_labels: float32`,
  `history_timestamps: int64` (each `(batch, None)`, the shape of `history`),
  the request time `timestamp: int64 (batch,)` and the user token `user: string
  (batch,)` (see `tfrec.serving`; every input required: a caller that knows no
  feedback sends zeros, which is not what the model trained on) ->
  `probabilities: float32 (batch, num_candidates)` (click probabilities, equal to
  `model.predict` on the mapped ids) and `valid: bool (batch, num_candidates)`.
  A `""` candidate slot is padding: `valid` False, probability
  `PADDING_PROBABILITY` (0). A candidate token missing from the vocabulary is
  scored as the OOV id 1, `valid` True — exactly how `tfrec ctr evaluate`
  scores a target first seen after training.
- `score_examples`: `serialized: string (batch,)` `tf.Example`s with the same
  features (`tfrec.serving.parse_ctr_examples`) and a bytes `target` -> `probabilities: float32 (batch,)` (for the
  TFX Evaluator). A missing or `""` target fails with INVALID_ARGUMENT.

History handling of the ranker: `""` and unknown tokens are dropped with their
feedback (as for the sequential servable), the remaining items keep their order
and only the most recent `max_history` are read; each behaviour's gap bucket is
computed in-graph from `timestamp - history_timestamps` with the training
`gap_bucket`. The user token maps to the training user id and profile (an
unknown user is a new user: id 1, unknown profile) (the export argument; None = all). A history with
no known item is not an error here: it is scored as an empty history (the
model's answer from the candidate alone; training never shows one, as
`data.min_history >= 1`).

Directory layout (TF Serving): `<base_dir>/<version>/saved_model.pb` with the
version the next integer (or given); the version directory is written under a
temporary name and renamed when complete, so a server watching `base_dir` never
sees a half-written version. Beside `saved_model.pb`, `export_metadata.json`
records the kind, signatures, model config, vocabulary and data fingerprints,
versions and export time. The vocabulary file ships as `assets/item_vocab.txt`.

Example (untrained models, so which items and probabilities come out depends on
their weights; the layout and shapes do not):
>>> import tempfile
>>> import numpy as np
>>> import tensorflow as tf
>>> from tfrec.config import ModelConfig
>>> from tfrec.data.vocab import Vocabulary
>>> from tfrec.models.ctr_baselines import build_ctr_baseline
>>> from tfrec.training import build_model
>>> item_vocab, root = Vocabulary(["a", "b", "c", "d"]), tempfile.mkdtemp()
>>> model = build_model(ModelConfig(embedding_dim=8, max_length=4, num_layers=1, num_heads=1, dropout=0.0),
...                     item_vocab.size, seed=0)
>>> _ = model.user_embedding(np.zeros((1, 4), "int32"))  # build the weights
>>> path = export_sequential(model, item_vocab, f"{root}/recommender", k=2)
>>> path.name
'1'
>>> served = tf.saved_model.load(str(path))
>>> out = served.signatures["recommend"](history=tf.constant([["a", "b"]]), exclude_history=tf.constant([True]))
>>> sorted(out["item_ids"].numpy()[0].tolist())
[b'c', b'd']
>>> ctr_model = build_ctr_baseline("din", item_vocab.size, embedding_dim=8, mlp_units=(8,), top_k=2)
>>> _ = ctr_model.predict({"history_ids": np.array([[2, 3]]), "target_id": np.array([4])}, verbose=0)  # build
>>> ranker = tf.saved_model.load(str(export_ctr(ctr_model, item_vocab, f"{root}/ranker")))
>>> out = ranker.signatures["score"](history=tf.constant([["a", "b"]]), candidates=tf.constant([["c", "d", ""]]),
...     history_ratings=tf.constant([[5.0, 0.0]]), history_labels=tf.constant([[1.0, 0.0]]),
...     history_timestamps=tf.constant([[100, 200]], tf.int64), timestamp=tf.constant([300], tf.int64),
...     user=tf.constant(["u1"]))
>>> out["valid"].numpy().tolist(), out["probabilities"].shape
([[True, True, False]], TensorShape([1, 3]))
"""

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf

import tfrec
from tfrec.ctr.new_items import NEW_ITEMS_FILE
from export.server.servable import WARMUP_FILE
from tfrec.serving import EXCLUDED_SCORE, PADDING_PROBABILITY, SERVING_DEFAULT
from tfrec.serving.contract import RECOMMEND, USER_EMBEDDING
from tfrec.serving.retrieval import RETRIEVE_SIGNATURE
from tfrec.serving.servables import (  # noqa: F401  (the servables, importable from here too)
    CTRServable,
    ItemLookup,
    SequentialServable,
    UserLookup,
    catalog_table,
    check_model_vocab,
)

__all__ = [
    "EXCLUDED_SCORE",
    "METADATA_FILE",
    "PADDING_PROBABILITY",
    "CTRServable",
    "UserLookup",
    "ItemLookup",
    "SequentialServable",
    "catalog_table",
    "export_ctr",
    "export_index",
    "export_sequential",
    "next_version",
    "version_dir",
    "write_saved_model",
]

METADATA_FILE = "export_metadata.json"
VOCAB_ASSET = "item_vocab.txt"
NEW_ITEMS_PATH = f"assets.extra/{NEW_ITEMS_FILE}"  # the rows `export_ctr(new_items=)` records (TF Serving ignores it)


# --- versioned SavedModel writing ------------------------------------------
def next_version(base_dir):
    """1 + the largest integer-named sub-directory of `base_dir` (1 if none)."""
    base = Path(base_dir)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def version_dir(base_dir, version=None):
    """`<base_dir>/<version>` for a new export: `version` (a free positive int) or the next one."""
    base = Path(base_dir)
    if base.exists() and not base.is_dir():
        raise ValueError(f"export base directory {base} exists and is not a directory")
    if version is None:
        version = next_version(base)
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive int (TF Serving version directory), got {version!r}")
    final = base / str(int(version))
    if final.exists():
        raise ValueError(f"version {version} already exists at {final}; pass another version or none (next free)")
    return final


def _signature_specs(signatures):
    """`{name: {"inputs": {arg: {dtype, shape}}, "outputs": {...}}}` of traced signatures."""
    def spec(t):
        return {"dtype": t.dtype.name, "shape": [None if d is None else int(d) for d in t.shape.as_list()]}

    out = {}
    for name, fn in signatures.items():
        concrete = fn.get_concrete_function()
        _, kwargs = concrete.structured_input_signature
        args = concrete.structured_input_signature[0]
        inputs = {s.name: spec(s) for s in (*args, *kwargs.values())}
        out[name] = {"inputs": inputs, "outputs": {k: spec(v) for k, v in concrete.structured_outputs.items()}}
    return out


def write_saved_model(module, base_dir, signatures, version=None, metadata=None, namespace_whitelist=(),
                      extra_files=None):
    """Save `module` as `<base_dir>/<version>/` with `export_metadata.json`, atomically.

    Args:
        module: a `tf.Module` tracking every variable and resource its
            signature functions use.
        base_dir: the model's base directory (TF Serving `base_path`).
        signatures: `{name: tf.function with an input_signature}`; must include
            `"serving_default"`.
        version: int or None (next integer).
        metadata: dict merged into `export_metadata.json`.
        namespace_whitelist: custom-op namespaces to allow (e.g. `("Scann",)`).
        extra_files: optional `{relative path: write(path)}`, files written into the version
            directory before it is published (e.g. under `assets.extra/`, which TF Serving ignores).

    Returns:
        `Path` of the version directory.
    """
    if SERVING_DEFAULT not in signatures:
        raise ValueError(f"signatures must include {SERVING_DEFAULT!r}, got {sorted(signatures)}")
    final = version_dir(base_dir, version)
    base, version = final.parent, int(final.name)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".tmp-{int(version)}-{uuid.uuid4().hex[:8]}"  # not a number: servers ignore it
    try:
        options = tf.saved_model.SaveOptions(namespace_whitelist=list(namespace_whitelist) or None)
        tf.saved_model.save(module, str(staging), signatures=signatures, options=options)
        for relative, write in (extra_files or {}).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            write(staging / relative)
        meta = {
            "version": int(version),
            "export_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "signatures": _signature_specs(signatures),
            "tfrec_version": tfrec.__version__,
            "tensorflow_version": tf.__version__,
            "custom_op_namespaces": sorted(namespace_whitelist),
            **(metadata or {}),
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        try:
            os.rename(staging, final)
        except OSError as err:
            raise ValueError(f"cannot publish version {version} at {final}: {err}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


# --- the item vocabulary inside the graph ------------------------------------
def vocab_fingerprint(item_vocab):
    """sha256 of the vocabulary file contents (`Vocabulary.to_text`)."""
    return hashlib.sha256(item_vocab.to_text().encode("utf-8")).hexdigest()


def vocab_metadata(item_vocab):
    """The `vocab` entry of `export_metadata.json`."""
    return {"size": item_vocab.size, "num_items": len(item_vocab.tokens),
            "fingerprint": vocab_fingerprint(item_vocab), "asset": f"assets/{VOCAB_ASSET}"}


def warmup_file_writer(model_name, requests):
    """A `write(path)` for `write_saved_model(extra_files=...)`: TF Serving's warm-up file
    (`export.server.servable.WARMUP_FILE`), one `PredictionLog` per `(signature, {input: array})`
    of `requests`, replayed by `tfrec serve` and by `tensorflow_model_server` when they load the version."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    def write(path):
        with tf.io.TFRecordWriter(str(path)) as writer:
            for signature, inputs in requests:
                request = predict_pb2.PredictRequest()
                request.model_spec.name, request.model_spec.signature_name = model_name, signature
                for name, value in inputs.items():
                    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())

    return write


def _export_with_vocab(item_vocab, base_dir, version, build, metadata, extra_files=None):
    """Write the servable `build(vocab_file)` returns, its vocabulary shipped as an asset.

    `metadata(servable)` gives the servable's `export_metadata.json` entries
    (the `vocab` entry is added here).
    """
    version_dir(base_dir, version)  # fail before the slow part
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / VOCAB_ASSET
        item_vocab.save(vocab_file)
        servable = build(vocab_file)
        meta = {**metadata(servable), "vocab": vocab_metadata(item_vocab)}
        return write_saved_model(servable, base_dir, servable.signatures(), version=version, metadata=meta,
                                 extra_files=extra_files)


# Batch sizes the XLA programs of a sequential servable are compiled for at load (warm-up requests):
# the powers of two up to the server's default largest batch (`export.server.config`, 32).
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def export_sequential(model, item_vocab, base_dir, k=10, version=None, data_fingerprint=None, experiment_config=None,
                      jit_compile=True, warmup_batch_sizes=WARMUP_BATCH_SIZES):
    """Export a trained `NextItemRecommender` as a versioned SavedModel.

    Args:
        model: the trained model.
        item_vocab: its item `Vocabulary`.
        base_dir: model base directory; the SavedModel goes to `base_dir/<version>/`.
        k: int, items per `recommend` answer (1..number of items).
        version: int or None (next integer).
        data_fingerprint: optional fingerprint of the training data
            (`PreparedData.metadata["fingerprint"]`), recorded in the metadata.
        experiment_config: optional dict (`ExperimentConfig.to_dict()`), recorded.
        jit_compile: bool, XLA-compile the backbone and the catalogue search
            (`SequentialServable`; default True). The official TF Serving binary then
            needs `--xla_cpu_compilation_enabled=true` (export/TF_SERVING.md).
        warmup_batch_sizes: batch sizes of the `recommend` and `user_embedding` warm-up
            requests written with an XLA export (`assets.extra/tf_serving_warmup_requests`):
            the server compiles their programs when it loads the version, not on the first
            requests (about 1 s each on 2 cores for Beauty's DMESR-SASRec).

    Returns:
        `Path` of the version directory.
    """
    def metadata(servable):
        return {
            "kind": "sequential",
            "jit_compile": servable.jit_compile,
            "k": servable.k,
            "model_class": type(model).__name__,
            "model_config": model.get_config(),
            "max_length": model.max_length,
            "temperature": model.temperature,
            "embedding_dim": servable.index.dim,
            "data_fingerprint": data_fingerprint,
            "experiment_config": experiment_config,
            "stock_ops_only": True,
            "empty_history": "INVALID_ARGUMENT",
            "unknown_tokens": "dropped",
        }

    known = item_vocab.tokens[0]
    warmup = [(signature, inputs) for size in (warmup_batch_sizes if jit_compile else ())
              for signature, inputs in ((RECOMMEND, {"history": np.full((size, 1), known, object),
                                                     "exclude_history": np.zeros(size, bool)}),
                                        (USER_EMBEDDING, {"history": np.full((size, 1), known, object)}))]
    extra = {WARMUP_FILE: warmup_file_writer(Path(base_dir).name, warmup)} if warmup else None
    return _export_with_vocab(
        item_vocab, base_dir, version,
        lambda vocab_file: SequentialServable(model, item_vocab, vocab_file, k=k, jit_compile=jit_compile),
        metadata, extra_files=extra,
    )


def export_ctr(model, item_vocab, base_dir, version=None, max_history=None, data_fingerprint=None,
               experiment_config=None, users=None, user_profiles=None, new_items=None):
    """Export a trained lifelong CTR model as a versioned ranker SavedModel.

    Args:
        model: the trained `CTRModel` (`tfrec ctr train`'s `model.keras`).
        item_vocab: its item `Vocabulary` (`LifelongData.item_vocab`).
        base_dir: model base directory; the SavedModel goes to `base_dir/<version>/`.
        version: int or None (next integer).
        max_history: int or None. Most recent known history items the ranker
            reads (use the training `model.max_history`); None = all.
        data_fingerprint: optional fingerprint of the training data
            (`LifelongData.metadata["fingerprint"]`), recorded in the metadata.
        experiment_config: optional dict (`CTRConfig.to_dict()`), recorded.
        users, user_profiles: `LifelongData.users` and `.user_profiles`: the
            servable maps the request's `user` token to the training user id and
            profile in-graph (unknown user = a new user). Required when the
            model's wide part reads user ids / profiles (`ValueError` otherwise).
        new_items: optional `tfrec.ctr.new_items.NewItemRows`: the items added to a trained model
            without retraining (`export.ranker_items`), recorded in the metadata (`new_items`) and
            written to `assets.extra/new_items.npz` (the next add carries them over).

    Returns:
        `Path` of the version directory.
    """
    def metadata(servable):
        return {
            "kind": "ctr",
            "new_items": new_items.describe() if new_items is not None else None,
            "model_class": type(model).__name__,
            "model_config": model.get_config(),
            "max_history": servable.max_history,
            "data_fingerprint": data_fingerprint,
            "experiment_config": experiment_config,
            "stock_ops_only": True,
            "padding_candidates": {"probability": PADDING_PROBABILITY, "valid": False},
            "unknown_tokens": {"history": "dropped with their feedback", "candidates": "scored as the OOV id",
                               "user": "a new user (unknown id and profile)"},
            "num_users": servable.user_lookup.num_users,
            "user_profile": servable.user_lookup.profiles is not None,
            "empty_history": "scored (no behaviour)",
        }

    return _export_with_vocab(
        item_vocab, base_dir, version,
        lambda vocab_file: CTRServable(model, item_vocab, vocab_file, max_history=max_history, users=users,
                                       user_profiles=user_profiles), metadata,
        extra_files=None if new_items is None else {NEW_ITEMS_PATH: new_items.save},
    )


def export_index(index, base_dir, version=None, source=None):
    """Export a `RetrievalIndex` as a versioned SavedModel.

    Signatures `retrieve` and `serving_default`: `queries: float32 (batch, dim)`
    -> `{"item_ids": string (batch, k), "scores": float32 (batch, k)}`. A ScaNN
    index is saved with the `Scann` op namespace allowed; load it after
    `import scann`.

    Args:
        index: a `BruteForceIndex` or `ScaNNIndex`.
        base_dir, version: as `export_sequential`.
        source: optional dict recorded as the index's provenance (e.g. the
            model config, vocabulary and data fingerprints).

    Returns:
        `Path` of the version directory.
    """
    metadata = {
        "kind": f"retrieval_{index.kind}",
        "index": index.config(),
        "stock_ops_only": not index.save_namespace_whitelist,
        "requires": ["scann"] if index.save_namespace_whitelist else [],
        "source": source,
    }
    signatures = {SERVING_DEFAULT: index.retrieve, RETRIEVE_SIGNATURE: index.retrieve}
    return write_saved_model(
        index, base_dir, signatures, version=version, metadata=metadata,
        namespace_whitelist=index.save_namespace_whitelist,
    )


# --- `tfrec export` -----------------------------------------------------------
