"""The Trainer's module: `run_fn` builds the tfrec model from the config and fits it.

Hyper-parameters come from `fn_args.custom_config[CONFIG_KEY]` (the
experiment config plus the pipeline's `train_steps` and `top_k`, see
`tfx_pipeline.pipeline.trainer_config`). `run_fn`:

1. reads the transformed `train` and `eval` splits (`history_ids`, `target_id`);
   a training sequence is `history_ids + [target_id]`;
2. builds the `NextItemRecommender` with `tfrec.training.build_model` over the
   Transform output's item vocabulary, and its item encoder with
   `tfrec.training.build_item_encoder`: ID embeddings, or with
   `model.item_encoder: dmesr` the DMESR encoder over the semantic store wired
   into the Trainer (`fn_args.custom_config[SEMANTIC_STORE_KEY]`, written by
   `ItemSemantics` over that same vocabulary: `dmesr.store_path` is set to it,
   and the store's rows are checked to follow the vocabulary token by token);
3. trains with tfrec's engine (`tfrec.training.engine.fit`, under the
   `train.distribution` strategy as TFX's templates do) on the training examples
   **streamed** from the TFRecord files through tf.data (`streaming_training_dataset`:
   all positions at once, a seeded shuffle buffer, never the whole split in memory):
   validation NDCG@10 (full ranking) on the `eval` split after every epoch, early
   stopping, best weights restored, budget, checkpoints under `model_run_dir/backup`.
   With `train_steps` set it runs exactly that many steps (one epoch);
4. saves `RecommenderServable` (`tfx_pipeline.serving`; a DMESR model is
   served as its materialised item table) to
   `fn_args.serving_model_dir` and, beside the TensorBoard logs in
   `fn_args.model_run_dir`, `model.keras` and `training.json`.

Validation pairs whose target is out of vocabulary (an item seen only as a
validation target) cannot be ranked and are left out of early stopping.

**CTR task** (`task: ctr`, `run_ctr`): the transformed `train` / `eval` examples
(`history_ids`, `target_id`, `label`, `user_id`) become a
`tfrec.data.lifelong.LifelongData` whose flat event array is the concatenation of
the examples' histories (`lifelong_data_from_examples`; history ids outside the
vocabulary are dropped, as the serving graph drops unknown tokens); the item
semantics come from the ItemSemantics store and the SemanticIds codes wired into
the Trainer (`tfrec.ctr.item_semantics_of`); then
`tfrec.ctr.train_ctr` builds the model (`build_ctr_model` over the
Transform vocabulary) and fits it with validation AUC early stopping on the
`eval` split (`train.monitor`). `pipeline.train_steps` = one epoch of that many
steps. The serving SavedModel is `tfrec.serving.servables.CTRServable` (signatures
`serving_default` = `score`, `score_examples`: raw tokens in, probabilities
out), its lookup table reading the Transform's vocabulary file (the same ids:
line + 2, unknown = OOV 1, `""` = padding).
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.evaluation import SequentialEvaluator
from tfrec.training import build_item_encoder, build_model
from tfrec.training.engine import build_optimizer, compile_options, fit, make_strategy, seed_everything
from tfx_pipeline.components import SEMANTIC_IDS_KEY, SEMANTIC_STORE_KEY
from tfx_pipeline.config import CTR, ctr_experiment_from_dict, experiment_from_dict
from tfx_pipeline.data import (
    CTR_FEEDBACK, HISTORY_LABELS, HISTORY_RATINGS, HISTORY_TIMESTAMPS, LABEL, TARGET_TIMESTAMP, USER_ID)
from tfx_pipeline.preprocessing import HISTORY_IDS, ITEM_VOCAB, TARGET_ID
from tfx_pipeline.serving import RecommenderServable

CONFIG_KEY = "tfrec"
TASK_KEY = "task"
MODEL_FILE, REPORT_FILE = "model.keras", "training.json"


def read_transformed(file_patterns, columns, histories=True, lists=None):
    """`(histories: list of int64 arrays, {name: (n,) array})` from transformed examples.

    Args:
        file_patterns: globs of (optionally GZIP) TFRecord files of `tf.Example`s.
        columns: `{feature name: tf dtype}` of the scalar features to read beside `HISTORY_IDS`.
        histories: False = skip `HISTORY_IDS` (returned as None): only the scalar columns.
        lists: `{feature name: tf dtype}` of variable-length features (returned as lists of arrays).
    """
    lists = dict(lists or {})
    files = transformed_files(file_patterns)
    spec = {**{name: tf.io.FixedLenFeature([], dtype) for name, dtype in columns.items()},
            **{name: tf.io.RaggedFeature(dtype) for name, dtype in lists.items()}}
    if histories:
        spec[HISTORY_IDS] = tf.io.RaggedFeature(tf.int64)
    rows, values = [], {name: [] for name in (*columns, *lists)}
    for path in files:
        compression = "GZIP" if path.endswith(".gz") else ""
        for batch in tf.data.TFRecordDataset(path, compression_type=compression).batch(4096):
            parsed = tf.io.parse_example(batch, spec)
            if histories:
                rows += [np.asarray(h, np.int64) for h in parsed[HISTORY_IDS].numpy()]
            for name in columns:
                values[name].append(parsed[name].numpy())
            for name in lists:
                values[name] += [np.asarray(v) for v in parsed[name].numpy()]
    return (rows if histories else None), {name: np.concatenate(v) if name in columns else v
                                           for name, v in values.items()}


def read_pairs(file_patterns):
    """`(histories: list of int64 arrays, targets: int64 (n,))` from transformed examples."""
    histories, columns = read_transformed(file_patterns, {TARGET_ID: tf.int64})
    return histories, columns[TARGET_ID].astype(np.int64)


def _known(ids):
    return ids[ids >= NUM_RESERVED]


def with_semantic_store(experiment, store_uri):
    """`experiment` reading the pipeline's semantic store when its item encoder needs one.

    Raises:
        ValueError: `model.item_encoder` is `dmesr` but no store was wired into the Trainer.
    """
    if experiment.model.item_encoder != "dmesr":
        return experiment
    if not store_uri:
        raise ValueError(
            "model.item_encoder is dmesr but the Trainer has no semantic_store input: "
            "set pipeline.item_semantics: true (the ItemSemantics component writes the store)"
        )
    return dataclasses.replace(experiment, dmesr=dataclasses.replace(experiment.dmesr, store_path=store_uri))


def _compression(files):
    kinds = {f.endswith(".gz") for f in files}
    if len(kinds) > 1:
        raise ValueError(f"transformed examples mix GZIP and plain TFRecord files: {files}")
    return "GZIP" if kinds.pop() else ""


def transformed_files(file_patterns):
    """The sorted files matching `file_patterns` (FileNotFoundError when none)."""
    files = sorted(f for pattern in file_patterns for f in tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no transformed examples match {list(file_patterns)}")
    return files


def sequence_stream(file_patterns):
    """A lazy `tf.data.Dataset` of training sequences `history_ids + [target_id]` (int64 1-D)
    read from transformed TFRecord files; nothing is loaded into memory up front."""
    files = transformed_files(file_patterns)
    spec = {HISTORY_IDS: tf.io.RaggedFeature(tf.int64), TARGET_ID: tf.io.FixedLenFeature([], tf.int64)}

    def to_sequence(serialized):
        parsed = tf.io.parse_single_example(serialized, spec)
        return tf.concat([parsed[HISTORY_IDS], parsed[TARGET_ID][None]], axis=0)

    return tf.data.TFRecordDataset(files, compression_type=_compression(files)).map(to_sequence)


def stream_statistics(file_patterns, vocab_size):
    """`(examples, item counts (vocab_size,))` of the training sequences, in one streaming pass
    (memory O(vocab_size), not O(examples))."""

    def add(state, seq):
        count, counts = state
        ids = tf.clip_by_value(seq, 0, vocab_size - 1)
        return count + 1, counts + tf.math.bincount(ids, minlength=vocab_size, maxlength=vocab_size, dtype=tf.int64)

    count, counts = sequence_stream(file_patterns).reduce(
        (tf.constant(0, tf.int64), tf.zeros([vocab_size], tf.int64)), add)
    return int(count), counts.numpy()


def streaming_training_dataset(file_patterns, max_length, batch_size, objective="causal", mask_prob=0.2,
                               mask_token_id=None, seed=0, shuffle_buffer=10_000):
    """`tfrec.data.pipelines.training_dataset`'s batches, streamed from transformed files.

    Causal: every (item, next item) pair once, sequences cut from their end into
    windows of `max_length + 1` items overlapping by one (as `causal_training_arrays`);
    cloze: the most recent `max_length` items, masked by `cloze_masking`. Examples are
    shuffled in a window of `shuffle_buffer` (seeded), so memory is bounded by the
    buffer, not by the number of examples. No length bucketing (ours: streaming).
    """
    from tfrec.data.pipelines import _trim_to_longest, cloze_masking

    length = int(max_length)
    ds = sequence_stream(file_patterns).shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)

    def pad(x):
        x = x[-length:]
        return tf.pad(x, [[0, length - tf.shape(x)[0]]])

    if objective == "causal":
        def windows(seq):
            ends = tf.range(tf.shape(seq)[0], 1, -length)  # window ends n, n-L, ... (>= 2 items)

            def window(end):
                w = seq[tf.maximum(0, end - length - 1):end]
                return pad(w[:-1]), pad(w[1:])

            return tf.data.Dataset.from_tensor_slices(ends).map(window)

        ds = ds.filter(lambda seq: tf.shape(seq)[0] >= 2).flat_map(windows).batch(batch_size)
        ds = ds.map(lambda x, y: ({"item_ids": x}, y))
    elif objective == "cloze":
        if mask_token_id is None:
            raise ValueError("objective='cloze' needs mask_token_id.")
        ds = ds.filter(lambda seq: tf.shape(seq)[0] >= 1).map(lambda seq: (pad(seq), pad(seq))).batch(batch_size)
        ds = ds.map(cloze_masking(mask_prob, mask_token_id, seed))
    else:
        raise ValueError(f"objective must be 'causal' or 'cloze', got {objective!r}.")
    return ds.map(_trim_to_longest).prefetch(2)


def train_model(experiment, train_files, eval_files, vocab_size, train_steps=None, log_dir=None, item_encoder=None,
                strategy=None, backup_dir=None):
    """Fit a model on transformed examples streamed from `train_files`; returns `(model, report dict)`.

    The training examples go through `streaming_training_dataset` (tf.data over the
    files, never all in memory); the validation pairs of `eval_files` are read for the
    evaluator. Training is the engine's `fit` (`tfrec.training.engine`), under
    `strategy` (default: `make_strategy(train.distribution)`).
    `item_encoder` defaults to ID embeddings (`tfrec.training.build_model`).
    """
    mc, tc, ec = experiment.model, experiment.train, experiment.eval
    tc.check()
    if tc.scheme != "positions":
        raise ValueError(f"the TFX Trainer streams every position at once: train.scheme must be positions, "
                         f"got {tc.scheme!r}")
    strategy = strategy or make_strategy(tc.distribution)
    valid_histories, valid_targets = read_pairs(eval_files)
    valid = [(_known(h), t) for h, t in zip(valid_histories, valid_targets) if t >= NUM_RESERVED and len(_known(h))]
    if not valid:
        raise ValueError("no validation example has a target and a history inside the training vocabulary")
    train_examples, item_counts = stream_statistics(train_files, vocab_size)

    seed_everything(tc.seed, tc.deterministic_ops)
    with strategy.scope():
        model = build_model(mc, vocab_size, item_encoder=item_encoder, seed=tc.seed)
        model.set_item_counts(item_counts)
        model.compile(optimizer=build_optimizer(tc), **compile_options(tc))

    def epoch_data(epoch):
        ds = streaming_training_dataset(
            train_files, mc.max_length, tc.batch_size, objective=model.objective, mask_prob=mc.mask_prob,
            mask_token_id=model.mask_token_id, seed=tc.seed + epoch)
        return ds.repeat() if train_steps else ds

    evaluator = SequentialEvaluator(
        [h for h, _ in valid], np.array([t for _, t in valid]), vocab_size=vocab_size,
        max_length=mc.max_length, protocols=("full",), ks=ec.ks, exclude_history=ec.exclude_history,
        seed=ec.seed, batch_size=ec.batch_size,
    )
    engine_config = dataclasses.replace(tc, epochs=1) if train_steps else tc
    result = fit(model, epoch_data, evaluator, engine_config, protocol="full",
                 steps_per_epoch=int(train_steps) if train_steps else None, backup_dir=backup_dir,
                 tensorboard_dir=log_dir, verbose=2, strategy=strategy)
    report = {
        "item_encoder": mc.item_encoder,
        "train_examples": train_examples,
        "valid_examples": len(valid),
        "vocab_size": int(vocab_size),
        "epochs": result.epochs,
        "train_steps": train_steps,
        "best_epoch": result.best_epoch,
        "stopped_by": result.stopped_by,
        "train_seconds": result.train_seconds,
        "validation_curve": result.validation_curve,
        "loss_curve": result.losses,
        "streamed": True,
    }
    return model, report


def read_ctr_examples(file_patterns, histories=True):
    """`(histories: list of int64 arrays, target_id, label, user_id, feedback)` from transformed CTR
    examples; `feedback`: `{history_ratings, history_labels, history_timestamps: lists of arrays aligned
    with the histories, target_timestamp: (n,) int64}`.

    `histories=False`: histories, users and the feedback lists are None (only targets, labels
    and target times are read: what the popularity reference of a streamed training split needs)."""
    columns = {TARGET_ID: tf.int64, LABEL: tf.int64, TARGET_TIMESTAMP: tf.int64}
    lists = {}
    if histories:
        columns[USER_ID] = tf.string
        lists = {HISTORY_RATINGS: tf.float32, HISTORY_LABELS: tf.float32, HISTORY_TIMESTAMPS: tf.int64}
    rows, values = read_transformed(file_patterns, columns, histories=histories, lists=lists)
    feedback = {name: values.get(name) for name in (*CTR_FEEDBACK, TARGET_TIMESTAMP)}
    return (rows, values[TARGET_ID].astype(np.int64), values[LABEL].astype(np.float32),
            values[USER_ID] if histories else None, feedback)


def streaming_ctr_dataset(file_patterns, batch_size, max_history, seed=0, shuffle_buffer=10_000):
    """`tfrec.data.lifelong.lifelong_dataset`'s training batches streamed from transformed CTR
    examples: `({"history_ids" (B, H) int32 right-padded, oldest kept first; "history_labels",
    "history_ratings" (B, H) float32; "history_gaps" (B, H) int32 (`gap_bucket` of the target's
    time minus the behaviour's, 0 = padding); "target_id" (B,) int32}, label (B,) float32)`,
    history ids outside the vocabulary dropped with their feedback (as
    `lifelong_data_from_examples`), a seeded shuffle buffer; memory bounded by the buffer.
    No `user_id`: a streamed split has no user index (the user bias, `model.wide_user_id`,
    is refused by `run_ctr`)."""
    from tfrec.data.lifelong import gap_bucket

    files = transformed_files(file_patterns)
    width = int(max_history)
    spec = {HISTORY_IDS: tf.io.RaggedFeature(tf.int64), TARGET_ID: tf.io.FixedLenFeature([], tf.int64),
            LABEL: tf.io.FixedLenFeature([], tf.int64), TARGET_TIMESTAMP: tf.io.FixedLenFeature([], tf.int64),
            HISTORY_RATINGS: tf.io.RaggedFeature(tf.float32), HISTORY_LABELS: tf.io.RaggedFeature(tf.float32),
            HISTORY_TIMESTAMPS: tf.io.RaggedFeature(tf.int64)}

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, spec)
        known = parsed[HISTORY_IDS] >= NUM_RESERVED
        pad = lambda values: tf.pad(tf.boolean_mask(values, known)[-width:],  # noqa: E731
                                    [[0, width - tf.minimum(tf.reduce_sum(tf.cast(known, tf.int32)), width)]])
        history = pad(parsed[HISTORY_IDS])
        stamps = pad(parsed[HISTORY_TIMESTAMPS])
        valid = history > 0
        gaps = tf.where(valid, gap_bucket(parsed[TARGET_TIMESTAMP] - stamps), 0)
        ratings = tf.where(tf.math.is_nan(parsed[HISTORY_RATINGS]), 0.0, parsed[HISTORY_RATINGS])
        return ({"history_ids": tf.cast(history, tf.int32), "history_labels": pad(parsed[HISTORY_LABELS]),
                 "history_ratings": pad(ratings), "history_gaps": tf.cast(gaps, tf.int32),
                 "target_id": tf.cast(parsed[TARGET_ID], tf.int32)},
                tf.cast(parsed[LABEL], tf.float32))

    ds = tf.data.TFRecordDataset(files, compression_type=_compression(files))
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False).map(parse)
    return ds.batch(int(batch_size)).prefetch(2)


def lifelong_data_from_examples(splits, item_vocab):
    """A `tfrec.data.lifelong.LifelongData` of transformed CTR examples.

    Args:
        splits: `{lifelong split name ("train", "valid"): read_ctr_examples(...) result}`.
        item_vocab: the Transform vocabulary (`Vocabulary`, ids = line + 2).

    Each example's history (known ids only, oldest first, each with its feedback:
    rating, click and time; OOV ids dropped with theirs, as the serving graph
    does) becomes its own range of the flat event array, so `lifelong_dataset` /
    `CTREvaluator` read them as they read `tfrec ctr train` samples; users are the
    examples' `user_id` tokens; the target's time is `target_timestamp`.
    """
    from tfrec.data.lifelong import LifelongData, LifelongSamples

    pieces, samples, offset = [], {}, 0
    feedback_pieces = {name: [] for name in CTR_FEEDBACK}
    user_index = {}
    for name, (histories, target, label, user, feedback) in splits.items():
        # histories None (a streamed training split): empty histories, targets and labels only.
        if histories is not None:
            masks = [h >= NUM_RESERVED for h in histories]
            known = [h[m] for h, m in zip(histories, masks)]
            for field in CTR_FEEDBACK:
                if any(len(v) != len(h) for v, h in zip(feedback[field], histories)):
                    raise ValueError(f"{name} examples: {field} needs one value per history item")
                feedback_pieces[field] += [np.asarray(v)[m] for v, m in zip(feedback[field], masks)]
            lengths = np.array([len(h) for h in known], np.int64)
        else:
            known, lengths = [], np.zeros(len(target), np.int64)
        ends = offset + np.cumsum(lengths)
        user_ids = (np.array([user_index.setdefault(u, len(user_index)) for u in user.tolist()], np.int64)
                    if user is not None else np.zeros(len(target), np.int64))
        samples[name] = LifelongSamples(
            event=np.arange(len(target), dtype=np.int64), user=user_ids, history_start=ends - lengths,
            history_end=ends, target_id=target.astype(np.int32), label=label.astype(np.float32),
            timestamp=np.asarray(feedback[TARGET_TIMESTAMP], np.int64))
        pieces += known
        offset = int(ends[-1]) if len(ends) else offset
    users = np.array([u.decode("utf-8") for u in user_index], dtype=object)
    events = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    flat = {field: (np.concatenate(v) if v else np.zeros(0)) for field, v in feedback_pieces.items()}
    metadata = {"num_items": len(item_vocab.tokens), "num_users": len(users),
                "num_samples": {n: len(s) for n, s in samples.items()},
                "click_rate": {n: float(s.label.mean()) if len(s) else None for n, s in samples.items()},
                "source": "transformed examples"}
    return LifelongData(
        item_vocab=item_vocab, users=users, user_offsets=np.zeros(1, np.int64), event_items=events,
        event_timestamps=flat[HISTORY_TIMESTAMPS].astype(np.int64),
        event_labels=flat[HISTORY_LABELS].astype(np.float32),
        event_ratings=flat[HISTORY_RATINGS].astype(np.float32), event_split=np.zeros(len(events), np.int8),
        splits=samples, cutoffs={}, genre_vocab=None, item_genres=None, metadata=metadata)


def pipeline_item_semantics(config, item_vocab, store_uri, sids_uri):
    """`tfrec.ctr.ItemSemantics` from the ItemSemantics store and SemanticIds codes (or None).

    Raises:
        ValueError: the model needs a store / codes the Trainer was not given.
        VocabularyMismatchError: the store does not follow the Transform vocabulary.
    """
    from tfrec.ctr import item_semantics_of, load_store_for, needs_semantics
    from tfrec.semantics.sids import load_sids

    need = needs_semantics(config.model.name)
    if need is None:
        return None
    if not store_uri:
        raise ValueError(f"model {config.model.name} needs item semantics but the Trainer has no semantic_store "
                         f"input: set pipeline.item_semantics: true")
    store = load_store_for(store_uri, item_vocab)
    if need != "sids":
        return item_semantics_of(store, config.sids.view)
    if not sids_uri:
        raise ValueError(f"model {config.model.name} needs semantic IDs but the Trainer has no semantic_ids "
                         f"input: set pipeline.semantic_ids: true")
    return item_semantics_of(store, config.sids.view, load_sids(sids_uri, expected_fingerprint=store.fingerprint))


def _item_genres(config, item_vocab):
    """`(V, G)` genre ids over `item_vocab` from the dataset's item table (SIM-hard)."""
    from tfrec.data.lifelong import item_tables
    from tfrec.data.readers import load_dataset

    items = load_dataset(config.data.dataset, config.data.data_root).items
    if items is None:
        raise ValueError(f"model sim-hard needs item genres: dataset {config.data.dataset} has no item table")
    return item_tables(items, item_vocab)[1]


def run_ctr(fn_args, settings, options):
    """The CTR Trainer (`task: ctr`, see the module doc)."""
    from tfrec.serving.servables import CTRServable
    from tfrec.ctr import train_ctr

    config = ctr_experiment_from_dict(settings)
    if options.get("train_steps"):
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=1, steps_per_epoch=int(options["train_steps"])))
    if config.model.wide_user_id:
        raise ValueError("model.wide_user_id is not supported by the TFX CTR Trainer: it streams its training "
                         "examples and keeps no user index (set model.wide_user_id: false)")
    tft_output = tft.TFTransformOutput(fn_args.transform_output)
    vocab_file = tft_output.vocabulary_file_by_name(ITEM_VOCAB)
    item_vocab = Vocabulary.load(vocab_file)  # ids = line + 2
    # Training examples are streamed (`streaming_ctr_dataset`); of the train split only targets
    # and labels are held (the popularity reference); the eval split is read for the evaluator.
    data = lifelong_data_from_examples(
        {"train": read_ctr_examples(fn_args.train_files, histories=False),
         "valid": read_ctr_examples(fn_args.eval_files)}, item_vocab)
    if config.model.name == "sim-hard":
        data.item_genres = _item_genres(config, item_vocab)
    semantics = pipeline_item_semantics(config, item_vocab, fn_args.custom_config.get(SEMANTIC_STORE_KEY),
                                        fn_args.custom_config.get(SEMANTIC_IDS_KEY))
    tc = config.train
    results, model, _ = train_ctr(
        config, verbose=2, save=False, data=data, semantics=semantics,
        train_data=lambda epoch: streaming_ctr_dataset(fn_args.train_files, tc.batch_size, config.model.max_history,
                                                       seed=tc.seed + epoch))
    results["semantic_store"] = fn_args.custom_config.get(SEMANTIC_STORE_KEY)
    results["semantic_ids"] = fn_args.custom_config.get(SEMANTIC_IDS_KEY)
    results["train_steps"] = options.get("train_steps")
    results["vocab_size"] = int(item_vocab.size)
    servable = CTRServable(model, item_vocab, vocab_file, max_history=config.model.max_history,
                           users=data.users, user_profiles=data.user_profiles)
    tf.saved_model.save(servable, fn_args.serving_model_dir, signatures=servable.signatures())
    tf.io.gfile.makedirs(fn_args.model_run_dir)
    model.save(os.path.join(fn_args.model_run_dir, MODEL_FILE))
    with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, REPORT_FILE), "w") as f:
        f.write(json.dumps(results, indent=2, default=str))


def run_fn(fn_args):
    """TFX Trainer entry point (`Trainer(run_fn="tfx_pipeline.trainer.run_fn", ...)`)."""
    settings = dict(fn_args.custom_config[CONFIG_KEY])
    options = settings.pop("pipeline")
    if settings.pop(TASK_KEY, None) == CTR:
        return run_ctr(fn_args, settings, options)
    experiment = with_semantic_store(experiment_from_dict(settings), fn_args.custom_config.get(SEMANTIC_STORE_KEY))
    tft_output = tft.TFTransformOutput(fn_args.transform_output)
    item_vocab = Vocabulary.load(tft_output.vocabulary_file_by_name(ITEM_VOCAB))  # ids = line + 2
    strategy = make_strategy(experiment.train.distribution)  # as TFX's templates: the strategy wraps the model
    seed_everything(experiment.train.seed)  # the encoder's initial weights too
    with strategy.scope():
        item_encoder = build_item_encoder(experiment, item_vocab)  # DMESR: VocabularyMismatchError unless aligned
    model, report = train_model(
        experiment, fn_args.train_files, fn_args.eval_files, item_vocab.size,
        train_steps=options.get("train_steps"),
        log_dir=experiment.train.tensorboard_dir or os.path.join(fn_args.model_run_dir, "logs"),
        item_encoder=item_encoder, strategy=strategy,
        backup_dir=experiment.train.backup_dir or os.path.join(fn_args.model_run_dir, "backup"),
    )
    report["semantic_store"] = experiment.dmesr.store_path if experiment.model.item_encoder == "dmesr" else None
    servable = RecommenderServable(
        model, tft_output, top_k=options["top_k"], exclude_history=experiment.eval.exclude_history
    )
    tf.saved_model.save(servable, fn_args.serving_model_dir, signatures=servable.signatures())
    tf.io.gfile.makedirs(fn_args.model_run_dir)
    model.save(os.path.join(fn_args.model_run_dir, MODEL_FILE))
    with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, REPORT_FILE), "w") as f:
        f.write(json.dumps(report, indent=2))
