"""MLLM enrichment job (DMESR): describe every item from its image, its text, and both.

    tfrec enrich --dataset amazon-beauty --out enrich/beauty.jsonl --backend openai \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct [--image-dir DIR]
    tfrec enrich --items items.tsv --out out.jsonl --backend keras_hub --preset presets/gemma3
    tfrec enrich --items items.tsv --out out.jsonl --backend jsonl --import precomputed.jsonl

Output (the contract `tfrec encode --mllm-outputs` reads): a JSONL file, one line per
(item, view), `{"item_id", "view", "text", "backend", "model", "prompt_version"}`.

- **Views.** `image`, `text`, `both` (templates in `tfrec.semantics.prompts`).
  Items without an image have no `image` / `both` lines and items without text no
  `text` / `both` lines: an absent line is the view mask. (An imported file is
  taken as it is: its views are not masked by local images or text.)
- **Crash-safe and resumable.** Each batch is appended with one write, then flush
  and fsync. On restart, pairs already in the file are never recomputed; a
  partially written last line (a crash mid-write) is truncated with a warning.
  Existing lines of the requested views must come from the same backend, model
  and prompt version, else the run stops (write to a new file instead).
- **Retries.** Transient backend errors (HTTP 408/429/5xx, timeouts, connection
  errors) are retried with exponential backoff (`backoff_base * 2**attempt`,
  capped at `backoff_max`, at least the server's `Retry-After`); permanent ones
  stop the run after the finished batches are written (`on_error="skip"` counts
  them as failed and goes on). Up to `concurrency` batches run at once.
- A `<out>.meta.json` manifest records templates, backend, model and the summary.

Example:

>>> import json, tempfile
>>> from pathlib import Path
>>> import pandas as pd
>>> from tfrec.semantics.mllm_backends import JsonlImportBackend
>>> work = Path(tempfile.mkdtemp())
>>> done = [{"item_id": i, "view": "text", "text": f"Item {i}."} for i in ("a", "b")]
>>> _ = (work / "done.jsonl").write_text(chr(10).join(json.dumps(d) for d in done))
>>> items = pd.DataFrame({"item_id": ["a", "b"], "title": ["Red polish", "Blue shampoo"]})
>>> summary = enrich_items(items, work / "out.jsonl", JsonlImportBackend(work / "done.jsonl"), views=["text"])
>>> summary.done, summary.resumed
(2, 0)
>>> again = enrich_items(items, work / "out.jsonl", JsonlImportBackend(work / "done.jsonl"), views=["text"])
>>> again.done, again.resumed  # a second run resumes: nothing left to do
(0, 2)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfrec.data.readers import DataFormatError
from tfrec.semantics.mllm_backends import (BACKENDS, OUTPUT_KEYS, BackendError, JsonlImportBackend,
                                           KerasHubBackend, MLLMBackend, MLLMRequest, OpenAIBackend,
                                           TransientBackendError, parse_output_line)
from tfrec.semantics.prompts import (DATASET_TEXT_FIELDS, VIEWS, PromptTemplates, dataset_items,
                                     load_item_inputs)

logger = logging.getLogger(__name__)

NEEDS_IMAGE = {"image": True, "text": False, "both": True}
NEEDS_TEXT = {"image": False, "text": True, "both": True}


@dataclasses.dataclass
class EnrichSummary:
    """Counts of one run, over the (item, view) pairs requested.

    `done`: written by this run (`empty`: of which the answer was empty);
    `resumed`: already in the file; `missing_image` / `missing_text`: skipped
    (view mask); `no_output`: the backend had none (imports); `failed`: permanent
    errors skipped with `on_error="skip"`. `unknown_item_ids`: ids the backend
    holds outputs for that are not among the items processed.
    """

    out_path: str
    items: int = 0
    pairs: int = 0
    done: int = 0
    empty: int = 0
    resumed: int = 0
    missing_image: int = 0
    missing_text: int = 0
    no_output: int = 0
    failed: int = 0
    unknown_item_ids: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self):
        counts = ", ".join(f"{key} {getattr(self, key)}" for key in (
            "done", "resumed", "missing_image", "missing_text", "no_output", "failed"))
        unknown = f"; {len(self.unknown_item_ids)} unknown item ids" if self.unknown_item_ids else ""
        return f"{self.items} items, {self.pairs} (item, view) pairs: {counts}{unknown} -> {self.out_path}"


# ------------------------------------------------------------------------ output

class OutputLog:
    """The append-only JSONL output: existing pairs, crash-safe appends.

    Opening validates the file; a last line without a newline (interrupted write)
    is truncated away with a warning; any other bad line is a `DataFormatError`.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.done = {}  # (item_id, view) -> (backend, model, prompt_version)
        if self.path.is_dir():
            raise ValueError(f"output path {self.path} is a folder; expected a .jsonl file")
        if self.path.exists():
            self._load()
        else:  # created even if nothing gets written: readers find an empty output
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        self._file = None

    def _load(self):
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("%s: removing a partially written last line (%d bytes) left by an "
                           "interrupted run", self.path, len(data) - complete)
            os.truncate(self.path, complete)
            data = data[:complete]
        first_line = {}
        for line_no, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = parse_output_line(raw, required=OUTPUT_KEYS)
            except ValueError as err:
                raise DataFormatError(self.path, f"not an enrichment output line: {err}", line_no) from None
            key = (record["item_id"], record["view"])
            if key in first_line:
                raise DataFormatError(self.path, f"duplicate (item {key[0]!r}, view {key[1]!r}), "
                                                 f"first at line {first_line[key]}", line_no)
            first_line[key] = line_no
            self.done[key] = (record["backend"], record["model"], record["prompt_version"])

    def append(self, records: Sequence[dict]):
        """Append records with a single write, then flush and fsync."""
        if not records:
            return
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        for r in records:
            self.done[r["item_id"], r["view"]] = (r["backend"], r["model"], r["prompt_version"])

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_manifest(path: Path, manifest: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- job

def call_with_retries(fn: Callable, *, max_retries=5, backoff_base=1.0, backoff_max=30.0):
    """`fn()`, retried on `TransientBackendError` with exponential backoff; after
    `max_retries` retries the last error is raised as a permanent `BackendError`."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except TransientBackendError as err:
            if attempt == max_retries:
                raise BackendError(f"{err} (gave up after {attempt + 1} attempts)") from err
            delay = min(backoff_max, max(backoff_base * 2 ** attempt, err.retry_after or 0.0))
            logger.warning("%s; retry %d/%d in %.2fs", err, attempt + 1, max_retries, delay)
            time.sleep(delay)


def enrich_items(items, out_path, backend: MLLMBackend, *, views=VIEWS, templates=None, text_fields=None,
                 image_column=None, image_dir=None, batch_size=8, concurrency=1, max_retries=5,
                 backoff_base=1.0, backoff_max=30.0, max_items=None, on_error="raise",
                 progress: Optional[Callable[[int, int], None]] = None) -> EnrichSummary:
    """Run (or resume) the enrichment of `items` into the JSONL file `out_path`.

    Args:
        items: DataFrame with `item_id` and text columns, or an item-table path
            (read with `tfrec.data.readers.read_items`).
        out_path: str or Path. Output JSONL (appended to; see the module docstring).
        backend: MLLMBackend.
        views: sequence of `"image"`, `"text"`, `"both"`. Default all three.
        templates: PromptTemplates or None (defaults).
        text_fields, image_column, image_dir, max_items: which item text and
            images to use, see `tfrec.semantics.prompts.load_item_inputs`.
        batch_size: int. Requests per backend call and per fsync. Default 8.
        concurrency: int. Batches in flight at once (capped by the backend). Default 1.
        max_retries, backoff_base, backoff_max: retry policy for transient errors
            (defaults 5, 1 s, 30 s).
        on_error: `"raise"` (default) or `"skip"` (count permanent failures, go on).
        progress: callable `(finished, total)` called after each batch, or None.

    Returns:
        EnrichSummary.
    """
    views = tuple(views)
    if not views or len(set(views)) != len(views) or set(views) - set(VIEWS):
        raise ValueError(f"views must be distinct values among {list(VIEWS)}, got {list(views)}")
    for name, value, low in (("batch_size", batch_size, 1), ("concurrency", concurrency, 1),
                             ("max_retries", max_retries, 0), ("max_items", max_items, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    templates = templates or PromptTemplates()
    inputs = load_item_inputs(items, text_fields=text_fields, image_column=image_column,
                              image_dir=image_dir, max_items=max_items)
    out = OutputLog(out_path)
    summary = EnrichSummary(str(out_path), items=len(inputs.item_ids), pairs=len(inputs.item_ids) * len(views))
    pending = _plan(inputs, views, templates, backend, out, summary)
    available = backend.available_item_ids()
    if available is not None:
        summary.unknown_item_ids = sorted(available - set(inputs.item_ids))

    def retrying(batch):
        return call_with_retries(lambda: _checked(backend.generate(batch), len(batch), backend),
                                 max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)

    def run_batch(batch):  # -> (outputs of a prefix of the batch, error or None)
        outputs = []
        try:
            if backend.native_batch:
                outputs = retrying(batch)
            else:  # one call per request: a failure keeps the answers already paid for
                for request in batch:
                    outputs += retrying([request])
        except Exception as err:  # re-raised in the calling thread
            return outputs, err
        return outputs, None

    def write(batch, outputs, err):  # in the calling thread only
        records = [{"item_id": r.item_id, "view": r.view, "text": text, "backend": backend.name,
                    "model": backend.model, "prompt_version": r.prompt_version}
                   for r, text in zip(batch, outputs) if text is not None]
        out.append(records)
        summary.done += len(records)
        summary.empty += sum(not r["text"] for r in records)
        summary.no_output += len(outputs) - len(records)
        if err is None:
            return None
        if on_error == "raise" or not isinstance(err, (ValueError, OSError)):
            return err
        summary.failed += len(batch) - len(outputs)
        logger.warning("skipping %d request(s) after a permanent error: %s", len(batch) - len(outputs), err)
        return None

    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    try:
        _run_batches(batches, run_batch, write, min(concurrency, backend.max_concurrency or concurrency),
                     progress)
    finally:
        out.close()
    _write_manifest(Path(f"{out_path}.meta.json"), {
        "format": "tfrec-mllm-enrichment-v1", "items_source": inputs.source, "backend": backend.name,
        "model": backend.model, "views": list(views), "prompts": templates.to_dict(),
        "text_fields": inputs.text_fields, "image_column": image_column,
        "image_dir": None if image_dir is None else str(image_dir), "summary": summary.as_dict()})
    return summary


def _plan(inputs, views, templates, backend, out, summary) -> list:
    """The requests still to run; counts resumed and masked pairs into `summary`."""
    versions = {view: templates.version(view) for view in views}
    for (item_id, view), made_by in out.done.items():
        expected = (backend.name, backend.model, versions.get(view))
        if view in versions and made_by != expected:
            raise ValueError(f"{out.path} already holds view {view!r} of item {item_id!r} made with (backend, "
                             f"model, prompt_version) {made_by}, but this run uses {expected}; write to a "
                             f"new output file")
    pending = []
    for item_id, text, image in zip(inputs.item_ids, inputs.texts, inputs.images):
        for view in views:
            if (item_id, view) in out.done:
                summary.resumed += 1
            elif not backend.precomputed and NEEDS_IMAGE[view] and image is None:
                summary.missing_image += 1
            elif not backend.precomputed and NEEDS_TEXT[view] and not text:
                summary.missing_text += 1
            else:
                prompt = templates.render(view, text) if text or view == "image" else ""
                pending.append(MLLMRequest(item_id, view, prompt, image if NEEDS_IMAGE[view] else None,
                                           versions[view]))
    with_images = sorted({r.view for r in pending if r.image})
    if not backend.precomputed and not backend.supports_images and with_images:
        raise ValueError(f"backend {backend.name} ({backend.model}) takes no images, but items have images "
                         f"for views {with_images}; pass views=('text',)")
    return pending


def _run_batches(batches, run_batch, write, workers, progress):
    """Run up to `workers` batches at once; `write(batch, outputs, err)` each result
    in this thread. After an error `write` returns, no new batch starts; the ones in
    flight finish and are written, then the error is raised."""
    total, finished, error = sum(len(b) for b in batches), 0, None
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue, in_flight = iter(batches), {}

        def submit():
            batch = next(queue, None)
            if batch is not None:
                in_flight[pool.submit(run_batch, batch)] = batch

        for _ in range(workers):
            submit()
        while in_flight:
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                batch = in_flight.pop(future)
                error = write(batch, *future.result()) or error
                finished += len(batch)
                if progress is not None:
                    progress(finished, total)
                if error is None:
                    submit()
    if error is not None:
        raise error


def _checked(outputs, expected, backend):
    if not isinstance(outputs, list) or len(outputs) != expected:
        got = f"{len(outputs)} outputs" if isinstance(outputs, list) else type(outputs).__name__
        raise BackendError(f"backend {backend.name} returned {got}, expected a list of {expected}")
    return outputs


# --------------------------------------------------------------------------- CLI

class _Progress:
    """`\\r`-updated line on a terminal, a line per 10% otherwise."""

    def __init__(self, stream=None):
        self.stream, self.start, self.last_decile = stream or sys.stderr, time.monotonic(), -1

    def __call__(self, finished, total):
        rate = finished / max(time.monotonic() - self.start, 1e-9)
        eta = (total - finished) / rate if rate else 0.0
        percent = 100 * finished // max(total, 1)
        line = f"enrich: {finished}/{total} requests ({percent}%), {rate:.1f}/s, ETA {eta:.0f}s"
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if finished == total else ""))
        elif finished * 10 // max(total, 1) > self.last_decile:
            self.last_decile = finished * 10 // max(total, 1)
            self.stream.write(line + "\n")
        self.stream.flush()


def _make_backend(args) -> MLLMBackend:
    required = {"keras_hub": ("preset",), "openai": ("base_url", "model"), "jsonl": ("import_path",)}
    missing = [name for name in required[args.backend] if not getattr(args, name)]
    if missing:
        flags = ", ".join("--" + ("import" if m == "import_path" else m.replace("_", "-")) for m in missing)
        raise ValueError(f"--backend {args.backend} needs {flags}")
    if args.backend == "keras_hub":
        return KerasHubBackend(args.preset, max_length=args.max_length, model_name=args.model)
    if args.backend == "openai":
        return OpenAIBackend(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout,
                             max_tokens=args.max_tokens)
    return JsonlImportBackend(args.import_path, model=args.model)


def _cmd_enrich(args):
    if bool(args.items) == bool(args.dataset):
        raise ValueError("pass exactly one of --items FILE or --dataset NAME")
    if args.dataset:
        items, text_fields, _ = dataset_items(args.dataset, args.data_root)
    else:
        items, text_fields = args.items, None
    templates = PromptTemplates.from_file(args.prompts) if args.prompts else None
    backend = _make_backend(args)
    summary = enrich_items(
        items, args.out, backend, views=args.views, templates=templates,
        text_fields=args.text_fields or text_fields, image_column=args.image_column, image_dir=args.image_dir,
        batch_size=args.batch_size, concurrency=args.concurrency, max_retries=args.max_retries,
        max_items=args.max_items, on_error=args.on_error, progress=_Progress())
    print(summary)
    if summary.unknown_item_ids:
        print(f"warning: {len(summary.unknown_item_ids)} imported item id(s) not among the items: "
              f"{', '.join(summary.unknown_item_ids[:5])}{' ...' if len(summary.unknown_item_ids) > 5 else ''}")


def add_commands(subparsers):
    """Register `tfrec enrich`."""
    cmd = subparsers.add_parser("enrich", help="describe items with a multimodal LLM (image / text / both)")
    source = cmd.add_argument_group("items")
    source.add_argument("--items", help="item table (TSV/CSV/Parquet/...) with item_id and text columns")
    source.add_argument("--dataset", help=f"bundled dataset with item text ({', '.join(DATASET_TEXT_FIELDS)})")
    source.add_argument("--data-root", help="folder of the bundled datasets (default: ../shared/data)")
    source.add_argument("--text-fields", nargs="+", help="columns forming the item text (default: all but ids)")
    source.add_argument("--image-column", help="column of image paths")
    source.add_argument("--image-dir", help="image folder (<item_id>.jpg|png|... unless --image-column)")
    source.add_argument("--max-items", type=int, help="only the first N items")
    cmd.add_argument("--out", required=True, help="output JSONL (resumed if it exists)")
    cmd.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    cmd.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS)
    cmd.add_argument("--prompts", help="YAML/JSON file {image|text|both: template}; {text} = item text")
    cmd.add_argument("--preset", help="keras_hub: local preset folder")
    cmd.add_argument("--max-length", type=int, help="keras_hub: total sequence length (prompt + answer)")
    cmd.add_argument("--base-url", help="openai: endpoint base URL, e.g. http://localhost:8000/v1")
    cmd.add_argument("--model", help="openai: model name; keras_hub/jsonl: name recorded in the output")
    cmd.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the API key")
    cmd.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    cmd.add_argument("--max-tokens", type=int, default=256, help="openai: answer length limit")
    cmd.add_argument("--import", dest="import_path", help="jsonl: file of precomputed outputs")
    cmd.add_argument("--batch-size", type=int, default=8)
    cmd.add_argument("--concurrency", type=int, default=1, help="batches in flight (openai)")
    cmd.add_argument("--max-retries", type=int, default=5)
    cmd.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    cmd.set_defaults(func=_cmd_enrich)
