"""Apache Beam version of ``prepare`` + ``save_prepared`` (same files, same bytes*).

``run_prepare_beam(path, out_dir, cfg)`` writes into ``out_dir`` what
``save_prepared(prepare(read_interactions(path), cfg), out_dir)`` writes, except that the
sequences are sharded (``sequences-00000-of-0000N.tfrecord``, user order within shards
unspecified). ``item_vocab.txt``, ``user_vocab.txt`` and ``metadata.json`` are byte-identical
(*including the fingerprint); ``load_prepared`` reads both layouts into equal
``PreparedData``.

Example::

    run_prepare_beam("ml-100k.inter", "/tmp/prep", PrepareConfig(user_core=5, item_core=5))
    data = load_prepared("/tmp/prep")
    # at scale: beam_args=["--runner=DataflowRunner", "--project=...", "--temp_location=gs://..."]

Pipeline (composite PTransforms, rows are tuples ``(row, user_id, item_id, timestamp)``
with ``row`` the 0-based position in the input file, which travels with every row so
equal-timestamp interactions keep file order):

1. ``ReadInteractions``: one worker parses the file with
   ``tfrec.data.readers.read_interactions`` (every supported format, identical parsing
   and errors to the in-memory path), then ``Reshuffle`` spreads rows. This bounds input
   size by one worker's memory (tens of millions of rows on a high-memory worker). For larger
   inputs, pass a PCollection of row tuples you built yourself (e.g. BigQuery with
   ``ROW_NUMBER()``) to ``build_prepare_pipeline``; rows need a global index because
   ``ReadFromText`` does not expose line numbers.
2. ``DropDuplicates`` (``config.dedupe``): keep the lowest row per (user, item, timestamp).
3. ``KCoreRound`` x ``config.max_core_rounds``, unrolled (a no-op once converged): group by
   user and drop small users, then group by item and drop small items -- exactly the
   in-memory round. ``CountCoreViolations`` then counts users/items still below their
   core; if non-zero the vocabulary step raises ``RuntimeError`` so nothing depending on
   it (vocabularies, sequences, metadata) is written. Every unrolled round costs two
   shuffles even after convergence: at scale set ``max_core_rounds`` close to what the
   data needs (``kcore_filter`` on a sample tells; too few fails loudly, never silently).
4. ``ComputeVocabulary`` (``Count.PerElement`` + ``ToList`` -> ``Vocabulary.from_counts``,
   same ordering rule) for users and items, written from the singletons.
5. ``WriteSequences``: group by user, stable sort by (timestamp, row), item ids via the
   item-vocabulary side input, ``tf.train.Example`` -> ``WriteToTFRecord``.
6. ``Fingerprint``: the fingerprint of ``preprocess.data_fingerprint`` is a sum of keyed
   per-row hashes, so it is computed in the pipeline over batches with a global combine
   (no driver-side pass over the file); metadata.json is written from the singletons.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsSingleton

from tfrec.data.preprocess import (
    ITEM_VOCAB_FILE, METADATA_FILE, SEQUENCES_PREFIX, USER_VOCAB_FILE, PrepareConfig,
    build_metadata, canonical_interactions, fingerprint_hex, fingerprint_partial,
    make_example, merge_fingerprint_partials, metadata_json, remove_sequence_files, write_text)
from tfrec.data.vocab import OOV_ID, Vocabulary

DEFAULT_BEAM_ARGS = ("--runner=DirectRunner", "--direct_num_workers=1",
                     "--direct_running_mode=in_memory")
ROW, USER, ITEM, TS = 0, 1, 2, 3  # fields of a row tuple


def _read_rows(path: str, read_kwargs: dict):
    from tfrec.data.readers import read_interactions

    df = canonical_interactions(read_interactions(path, **read_kwargs))
    yield from zip(range(len(df)), df["user_id"].tolist(), df["item_id"].tolist(),
                   df["timestamp"].tolist())


class ReadInteractions(beam.PTransform):
    """PBegin -> rows ``(row, user_id, item_id, timestamp)`` of one interactions file.

    ``read_kwargs`` go to ``read_interactions`` (e.g. ``columns=``, ``encoding=``)."""

    def __init__(self, path, read_kwargs: Optional[dict] = None):
        super().__init__()
        self.path, self.read_kwargs = os.fspath(path), dict(read_kwargs or {})

    def expand(self, pbegin):
        return (pbegin
                | "Path" >> beam.Create([self.path])
                | "Parse" >> beam.FlatMap(_read_rows, self.read_kwargs)
                | "Spread" >> beam.Reshuffle())


class DropDuplicates(beam.PTransform):
    """Keep the first row (lowest ``row``) of each (user_id, item_id, timestamp)."""

    def expand(self, rows):
        return (rows
                | "KeyByContent" >> beam.Map(lambda r: ((r[USER], r[ITEM], r[TS]), r))
                | "FirstRow" >> beam.CombinePerKey(min)
                | "Rows" >> beam.Values())


def _keep_group(kv, core: int):
    rows = list(kv[1])
    if len(rows) >= core:
        yield from rows


class KCoreRound(beam.PTransform):
    """One k-core round: drop users with < user_core rows, then items with < item_core."""

    def __init__(self, user_core: int, item_core: int):
        super().__init__()
        self.user_core, self.item_core = user_core, item_core

    def expand(self, rows):
        for name, field, core in (("User", USER, self.user_core), ("Item", ITEM, self.item_core)):
            if core > 1:
                rows = (rows
                        | f"By{name}" >> beam.Map(lambda r, f=field: (r[f], r))
                        | f"Group{name}" >> beam.GroupByKey()
                        | f"Keep{name}s" >> beam.FlatMap(_keep_group, core))
        return rows


class CountCoreViolations(beam.PTransform):
    """rows -> singleton int: number of users below user_core plus items below item_core."""

    def __init__(self, user_core: int, item_core: int):
        super().__init__()
        self.user_core, self.item_core = user_core, item_core

    def expand(self, rows):
        parts = []
        for name, field, core in (("User", USER, self.user_core), ("Item", ITEM, self.item_core)):
            if core > 1:
                parts.append(rows
                             | f"{name}Ones" >> beam.Map(lambda r, f=field: (r[f], 1))
                             | f"{name}Counts" >> beam.CombinePerKey(sum)
                             | f"{name}Small" >> beam.Filter(lambda kv, c=core: kv[1] < c)
                             | f"{name}Violations" >> beam.combiners.Count.Globally())
        if not parts:
            return rows.pipeline | "NoCore" >> beam.Create([0])
        return parts | "Flatten" >> beam.Flatten() | "Total" >> beam.CombineGlobally(sum)


def _build_vocab(token_counts, violations: int, config: PrepareConfig) -> Vocabulary:
    if violations:
        raise RuntimeError(
            f"k-core filtering (user_core={config.user_core}, item_core={config.item_core}) did "
            f"not converge in {config.max_core_rounds} rounds ({violations} users/items still "
            "below their core); raise max_core_rounds")
    if not token_counts:
        raise ValueError(f"no interactions left after filtering with {config}")
    return Vocabulary.from_counts(dict(token_counts))


class ComputeVocabulary(beam.PTransform):
    """rows -> singleton ``Vocabulary`` of field ``field`` (count desc, token asc)."""

    def __init__(self, field: int, violations, config: PrepareConfig):
        super().__init__()
        self.field, self.violations, self.config = field, violations, config

    def expand(self, rows):
        return (rows
                | "Tokens" >> beam.Map(lambda r, f=self.field: r[f])
                | "Count" >> beam.combiners.Count.PerElement()
                | "ToList" >> beam.combiners.ToList()
                | "Build" >> beam.Map(_build_vocab, AsSingleton(self.violations), self.config))


def _user_example(kv, item_vocab: Vocabulary) -> bytes:
    user, rows = kv
    rows = sorted(rows, key=lambda r: (r[TS], r[ROW]))
    items = item_vocab.lookup([r[ITEM] for r in rows])
    if (items == OOV_ID).any():
        raise RuntimeError(f"user {user!r} has items missing from the item vocabulary")
    return make_example(user, items, [r[TS] for r in rows])


class WriteSequences(beam.PTransform):
    """rows -> one tf.train.Example per user -> ``out_dir/sequences-*-of-*.tfrecord``."""

    def __init__(self, item_vocab, out_dir: str):
        super().__init__()
        self.item_vocab, self.out_dir = item_vocab, out_dir

    def expand(self, rows):
        return (rows
                | "ByUser" >> beam.Map(lambda r: (r[USER], r))
                | "GroupUser" >> beam.GroupByKey()
                | "ToExample" >> beam.Map(_user_example, AsSingleton(self.item_vocab))
                | "Write" >> beam.io.WriteToTFRecord(
                    os.path.join(self.out_dir, SEQUENCES_PREFIX), file_name_suffix=".tfrecord"))


def _batch_partial(batch):
    rows, users, items, ts = zip(*batch)
    return fingerprint_partial(rows, users, items, ts)


class Fingerprint(beam.PTransform):
    """rows (all input rows) -> singleton hex fingerprint equal to ``data_fingerprint(df)``."""

    def expand(self, rows):
        return (rows
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=20000)
                | "Partial" >> beam.Map(_batch_partial)
                | "Merge" >> beam.CombineGlobally(merge_fingerprint_partials)
                | "Hex" >> beam.Map(fingerprint_hex))


def _save_vocab(vocab: Vocabulary, path: str) -> str:
    vocab.save(path)
    return path


def _metadata(_, user_vocab, item_vocab, num_interactions, fingerprint, config, source):
    return build_metadata(len(user_vocab.tokens), len(item_vocab.tokens), num_interactions,
                          config, fingerprint, source)


def build_prepare_pipeline(pipeline: beam.Pipeline,
                           interactions_path_or_pcoll: Union[str, os.PathLike, beam.PCollection],
                           config: PrepareConfig, out_dir, source: Optional[str] = None,
                           read_kwargs: Optional[dict] = None) -> dict:
    """Add the preparation transforms to ``pipeline``; returns the main PCollections.

    Args:
        pipeline: a ``beam.Pipeline`` (not yet run).
        interactions_path_or_pcoll: a file readable by ``read_interactions`` on a worker,
            or a PCollection of ``(row: int, user_id: str, item_id: str, timestamp: int)``
            with ``row`` = 0-based position in the logical input (unique, 0..n-1).
        config: ``PrepareConfig``; out_dir: output directory (local or ``gs://``).
        source: copied into ``metadata["source"]`` (pass the same value to ``prepare``).
        read_kwargs: extra ``read_interactions`` arguments when reading a path.

    Returns:
        dict with PCollections ``rows``, ``filtered``, ``user_vocab``, ``item_vocab``
        (singletons), ``sequence_files`` and ``metadata`` (singleton dict).
    """
    out_dir = os.fspath(out_dir)
    if isinstance(interactions_path_or_pcoll, beam.PCollection):
        rows = interactions_path_or_pcoll
    else:
        rows = pipeline | "ReadInteractions" >> ReadInteractions(interactions_path_or_pcoll, read_kwargs)
    fingerprint = rows | "Fingerprint" >> Fingerprint()
    filtered = rows
    if config.dedupe:
        filtered = filtered | "DropDuplicates" >> DropDuplicates()
    if config.user_core > 1 or config.item_core > 1:
        for r in range(config.max_core_rounds):
            filtered = filtered | f"KCoreRound{r + 1}" >> KCoreRound(config.user_core, config.item_core)
    violations = filtered | "CountCoreViolations" >> CountCoreViolations(config.user_core, config.item_core)
    user_vocab = filtered | "UserVocabulary" >> ComputeVocabulary(USER, violations, config)
    item_vocab = filtered | "ItemVocabulary" >> ComputeVocabulary(ITEM, violations, config)
    user_vocab | "SaveUserVocab" >> beam.Map(_save_vocab, os.path.join(out_dir, USER_VOCAB_FILE))
    item_vocab | "SaveItemVocab" >> beam.Map(_save_vocab, os.path.join(out_dir, ITEM_VOCAB_FILE))
    files = filtered | "WriteSequences" >> WriteSequences(item_vocab, out_dir)
    num_interactions = filtered | "CountInteractions" >> beam.combiners.Count.Globally()
    metadata = (pipeline
                | "MetadataSeed" >> beam.Create([None])
                | "Metadata" >> beam.Map(_metadata, AsSingleton(user_vocab), AsSingleton(item_vocab),
                                         AsSingleton(num_interactions), AsSingleton(fingerprint),
                                         config, source))
    metadata | "SaveMetadata" >> beam.Map(
        lambda m: write_text(os.path.join(out_dir, METADATA_FILE), metadata_json(m)))
    return {"rows": rows, "filtered": filtered, "user_vocab": user_vocab, "item_vocab": item_vocab,
            "sequence_files": files, "metadata": metadata}


def run_prepare_beam(interactions_path, out_dir, config: PrepareConfig = PrepareConfig(),
                     beam_args: Optional[Sequence[str]] = None, source: Optional[str] = None,
                     read_kwargs: Optional[dict] = None) -> None:
    """Run the pipeline to completion; output as ``save_prepared`` (sequences sharded).

    ``beam_args`` are Beam pipeline options; default ``DEFAULT_BEAM_ARGS`` (DirectRunner,
    one worker, in-memory). For scale pass e.g. Dataflow/Flink/Spark runner args. Existing
    ``sequences*.tfrecord*`` files in ``out_dir`` are deleted first.
    """
    import tensorflow as tf

    out_dir = os.fspath(out_dir)
    tf.io.gfile.makedirs(out_dir)
    remove_sequence_files(out_dir)
    options = PipelineOptions(list(beam_args) if beam_args is not None else list(DEFAULT_BEAM_ARGS))
    with beam.Pipeline(options=options) as p:
        build_prepare_pipeline(p, interactions_path, config, out_dir, source=source, read_kwargs=read_kwargs)
