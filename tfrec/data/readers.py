"""Readers for interaction logs, item tables and item attributes (offline only).

Canonical interaction frame, as returned by :func:`read_interactions`, in this
column order:

- ``user_id`` (object/str), ``item_id`` (object/str): tokens exactly as written
  in the file, surrounding whitespace stripped. Never converted to numbers.
- ``timestamp`` (int64): Unix seconds, or any chronological index (amazon-toys
  only has positions: a file with a ``position`` column and no ``timestamp`` is
  read with ``position`` as the timestamp). Integral floats such as ``881250949.0``
  are accepted.
- optional ``rating`` (float64) and ``label`` (float64), kept when present.

Row order is always the file order (it is the chronological tie-break); nothing
is sorted or deduplicated (``tfrec prepare`` reports exact duplicate rows and drops
them with ``--drop-duplicates``). Blank lines are skipped. User and item tokens
longer than ``MAX_TOKEN_CHARS`` (1024) characters are malformed input.

Supported formats (``fmt``, inferred from the file name when ``None``; a ``.gz``
suffix means gzip for any text format): ``tsv`` (.tsv/.txt), ``csv`` (.csv),
``parquet``, ``recbole`` (.inter/.item atomic files with typed headers such as
``user_id:token``; the type suffix is dropped) and ``movielens-dat`` (.dat,
headerless ``::``-separated). Text encodings must be ASCII-compatible.

Error contract: every malformed input raises :class:`DataFormatError` (a
``ValueError``) whose message names the file, the 1-based line as in the file
(header = line 1) when known, and the problem; for Parquet files the 1-based
data row is named instead. A missing file is a ``DataFormatError`` as well.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import re
import zlib
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

DEFAULT_DATA_ROOT = Path(
    os.environ.get("TFREC_DATA_ROOT")
    or Path(__file__).resolve().parents[2].parent / "shared" / "data"
)

_SEPARATORS = {"tsv": "\t", "csv": ",", "recbole": "\t", "movielens-dat": "::"}
_SUFFIXES = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".parquet": "parquet",
             ".inter": "recbole", ".item": "recbole", ".dat": "movielens-dat"}
_FORMATS = sorted(set(_SUFFIXES.values()))
_DAT_SEP = b"\x1f"  # "::" is rewritten to this byte so pandas' C parser can split it


class DataFormatError(ValueError):
    """Raised for malformed input. Message names the file, the line (1-based, as in
    the file, header = line 1) when known, and the problem."""

    def __init__(self, path, problem, line=None):
        self.path, self.problem, self.line = str(path), problem, line
        where = self.path if line is None else f"{self.path}: line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep picklable (e.g. across Beam workers)
        return type(self), (self.path, self.problem, self.line)


# --------------------------------------------------------------------------- text

def _infer_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise DataFormatError(path, f"cannot infer format from the name; pass fmt= ({_FORMATS})")


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFormatError(path, f"not a valid gzip file ({e})") from None
    return data


def _decode(path: Path, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(path, f"bad encoding: byte 0x{data[e.start]:02x} at offset "
                                    f"{e.start} is not valid {encoding}", line) from None


def _line_layout(data: bytes, sep: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised per-line (field count, is blank) for ``data`` split on newlines."""
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10)
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(arr))
    starts = np.concatenate(([0], ends[:-1] + 1))
    length = ends - starts
    blank = (length == 0) | ((length == 1) & (arr[np.minimum(starts, len(arr) - 1)] == 13))
    seps = np.flatnonzero(arr == sep[0])
    fields = np.bincount(np.searchsorted(ends, seps), minlength=len(ends)) + 1
    return fields, blank


def _read_text(path: Path, fmt: str, sep: str, encoding: str,
               names: Optional[Sequence[str]]) -> tuple[pd.DataFrame, Optional[np.ndarray]]:
    """Parse a delimited text file as strings. ``names`` given = headerless file.

    Returns the frame and, per row, its 1-based file line (None if unknown)."""
    data = _read_bytes(path)
    if fmt == "movielens-dat":
        data, sep = data.replace(sep.encode(encoding), _DAT_SEP), _DAT_SEP.decode()
    _decode(path, data, encoding)  # validate only; pandas decodes again, faster
    if not data.strip():
        raise DataFormatError(path, "empty file (no header and no rows)")
    fields, blank = _line_layout(data, sep.encode(encoding))
    quoted = fmt == "csv" and b'"' in data  # field counts unreliable: pandas checks
    if not quoted:
        expected = len(names) if names else fields[np.argmax(~blank)]
        bad = np.flatnonzero(~blank & (fields != expected))
        if bad.size:
            raise DataFormatError(path, f"wrong number of fields: expected {expected}, "
                                        f"found {fields[bad[0]]}", int(bad[0]) + 1)
    try:
        df = pd.read_csv(io.BytesIO(data), sep=sep, encoding=encoding, dtype=str,
                         keep_default_na=False, header=None if names else 0, names=names,
                         quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
    except pd.errors.ParserError as e:
        match = re.search(r"in line (\d+)", str(e))
        raise DataFormatError(path, f"wrong number of fields or bad quoting ({str(e).strip()})",
                              int(match.group(1)) if match else None) from None
    if len(df) and not isinstance(df.index, pd.RangeIndex):  # extra field -> index
        raise DataFormatError(path, "wrong number of fields: more than in the header")
    row_lines = np.flatnonzero(~blank)[0 if names else 1:] + 1
    if len(row_lines) != len(df):  # multi-line quoted fields: lines unknown
        row_lines = None
    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    if fmt == "recbole":
        df.columns = [c.rsplit(":", 1)[0] for c in df.columns]
    return df, row_lines


def _read_table(path, fmt, sep, encoding, dat_names):
    """Read any supported format; ``dat_names`` name the headerless .dat columns.

    Returns (path, frame with a fresh RangeIndex, 1-based line per row or None)."""
    path = Path(path)
    fmt = fmt or _infer_format(path)
    if fmt == "parquet":
        if not path.exists():
            raise DataFormatError(path, "file not found")
        try:
            df, row_lines = pd.read_parquet(path), None
        except Exception as e:  # pyarrow raises many types for corrupt files
            raise DataFormatError(path, f"unreadable parquet file ({e})") from None
        df.columns = [str(c) for c in df.columns]
    elif fmt in _SEPARATORS:
        if sep is not None and len(sep) != 1 and fmt != "movielens-dat":
            raise ValueError(f"sep must be a single character, got {sep!r}")
        names = dat_names if fmt == "movielens-dat" else None
        df, row_lines = _read_text(path, fmt, sep or _SEPARATORS[fmt], encoding, names)
    else:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {_FORMATS}")
    if df.empty:
        raise DataFormatError(path, "empty file (no data rows)")
    return path, df.reset_index(drop=True), row_lines


# ----------------------------------------------------------------------- columns

def _fail(path, problem, pos, row_lines):
    """Raise for the data row at position ``pos``, naming its line if known."""
    if row_lines is None:
        raise DataFormatError(path, f"{problem} (data row {pos + 1})")
    raise DataFormatError(path, problem, int(row_lines[pos]))


def _require(path, df, required):
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing required column(s) {missing}; "
                                    f"found {list(df.columns)}")


MAX_TOKEN_CHARS = 1024  # longest user/item token accepted; longer ones are malformed input


def _ids(path, df, col, row_lines) -> pd.Series:
    """Id tokens as str, whitespace-stripped; stripping runs on the unique values. Tokens
    longer than :data:`MAX_TOKEN_CHARS` are rejected, naming the first line holding one."""
    codes, uniques = pd.factorize(df[col])  # missing -> code -1
    tokens = np.asarray(uniques.astype(str).str.strip(), dtype=object)
    bad = np.append(tokens == "", True)[codes]
    if bad.any():
        _fail(path, f"empty {col}", int(np.argmax(bad)), row_lines)
    too_long = np.fromiter((len(t) > MAX_TOKEN_CHARS for t in tokens), bool, len(tokens))[codes]
    if too_long.any():
        pos = int(np.argmax(too_long))
        _fail(path, f"{col} of {len(tokens[codes[pos]])} characters is longer than the limit of "
                    f"{MAX_TOKEN_CHARS}", pos, row_lines)
    return pd.Series(tokens[codes], index=df.index, name=col)


def _numbers(path, df, col, row_lines, integral=False) -> pd.Series:
    raw = df[col]
    if raw.dtype == object:  # fast path for clean text; anything else is diagnosed below
        try:
            values = raw.astype("int64" if integral else "float64")
            if not values.isna().any():
                return values
        except (ValueError, OverflowError):
            pass
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        value = raw.iloc[pos]
        missing = value is None or pd.isna(value) or not str(value).strip()
        _fail(path, f"missing {col}" if missing else f"non-numeric {col} {value!r}",
              pos, row_lines)
    if not integral:
        return values.astype("float64")
    if values.dtype.kind in "fu":  # uint64 when a value exceeds int64
        whole = (values == np.floor(values)) & (values.abs() < 2.0**63)  # False for inf
        if not whole.all():
            pos = int(np.argmax(~whole.to_numpy()))
            _fail(path, f"non-integral or out-of-range {col} {raw.iloc[pos]!r}", pos, row_lines)
    return values.astype("int64")


# ----------------------------------------------------------------------- readers

def read_interactions(path, *, fmt=None, sep=None, columns: Optional[Mapping[str, str]] = None,
                      encoding="utf-8") -> pd.DataFrame:
    """Read an interaction log into the canonical frame (see module docstring).

    ``columns`` maps the file's column names to canonical ones, e.g.
    ``{"position": "timestamp"}``; without a ``timestamp`` column, a ``position``
    column (an integer order, e.g. 0, 1, 2 per user) is taken as the chronological order. ``movielens-dat`` files are read as
    ``UserID::MovieID::Rating::Timestamp``."""
    path, df, lines = _read_table(path, fmt, sep, encoding,
                                  ["user_id", "item_id", "rating", "timestamp"])
    df = df.rename(columns=dict(columns or {}))
    if "timestamp" not in df.columns and "position" in df.columns:
        df = df.rename(columns={"position": "timestamp"})  # a per-user order (amazon-toys layout)
    _require(path, df, ["user_id", "item_id", "timestamp"])
    out = pd.DataFrame({"user_id": _ids(path, df, "user_id", lines),
                        "item_id": _ids(path, df, "item_id", lines),
                        "timestamp": _numbers(path, df, "timestamp", lines, integral=True)})
    for col in ("rating", "label"):
        if col in df.columns:
            out[col] = _numbers(path, df, col, lines)
    return out


def read_items(path, *, fmt=None, encoding="utf-8") -> pd.DataFrame:
    """Read an item table: ``item_id`` (str) first, every other column as text
    (missing -> ""). ``movielens-dat`` files are read as ``MovieID::Title::Genres``
    into ``item_id, title, genres``. Duplicate item ids are an error."""
    path, df, lines = _read_table(path, fmt, None, encoding, ["item_id", "title", "genres"])
    _require(path, df, ["item_id"])
    df["item_id"] = _ids(path, df, "item_id", lines)
    duplicated = df["item_id"].duplicated().to_numpy()
    if duplicated.any():
        pos = int(np.argmax(duplicated))
        _fail(path, f"duplicate item_id {df['item_id'].iloc[pos]!r}", pos, lines)
    for col in df.columns.drop("item_id"):
        df[col] = df[col].fillna("").astype(str)
    return df[["item_id", *df.columns.drop("item_id")]]


def read_item_attributes(path) -> dict[str, list[str]]:
    """Read ``{item_id: [attribute ids]}`` JSON; ids (keys and values) become str."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        raw = json.loads(_decode(path, data, "utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON at column {e.colno}: {e.msg}",
                              e.lineno) from None
    if not isinstance(raw, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(raw).__name__}")
    out = {}
    for item, attrs in raw.items():
        if not isinstance(attrs, list):
            raise DataFormatError(path, f"item {item!r}: expected a list of attribute ids, "
                                        f"got {type(attrs).__name__}")
        out[str(item)] = [str(a) for a in attrs]
    return out


# ---------------------------------------------------------------------- datasets

@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Layout of one bundled dataset folder (file names relative to it)."""
    description: str
    interactions: str
    items: Optional[str] = None
    item_attributes: Optional[str] = None
    encoding: str = "utf-8"
    columns: Optional[Mapping[str, str]] = None
    click_threshold: Optional[float] = None  # CTR label = (rating >= threshold)


DATASETS: dict[str, DatasetSpec] = {
    "amazon-beauty": DatasetSpec(
        "Amazon 2014 Beauty 5-core (S3-Rec split) with item titles and attributes.",
        "interactions.tsv", "items.tsv", "item_attributes.json"),
    "amazon-sports": DatasetSpec(
        "Amazon 2014 Sports_and_Outdoors 5-core (S3-Rec), ID-only plus attributes.",
        "interactions.tsv", None, "item_attributes.json"),
    "amazon-toys": DatasetSpec(
        "Amazon 2014 Toys_and_Games 5-core (S3-Rec), ID-only; position used as timestamp.",
        "interactions.tsv", None, "item_attributes.json", columns={"position": "timestamp"}),
    "movielens-1m-subset": DatasetSpec(
        "MovieLens-1M ratings of users 1-2998; label = rating >= 4 (a click).",
        "ratings.dat.gz", "movies.dat", None, encoding="latin-1", click_threshold=4.0),
    "movielens-100k": DatasetSpec(
        "MovieLens-100K, RecBole atomic files (rating kept).",
        "ml-100k.inter", "ml-100k.item"),
}


@dataclasses.dataclass
class Dataset:
    """A loaded dataset; ``source_files`` are the absolute paths read."""
    name: str
    interactions: pd.DataFrame
    items: Optional[pd.DataFrame]
    item_attributes: Optional[dict]
    source_files: list[str]


def load_dataset(name, data_root=None) -> Dataset:
    """Load a bundled dataset by registry name from ``data_root`` (default
    :data:`DEFAULT_DATA_ROOT`, i.e. ``$TFREC_DATA_ROOT`` or ``../shared/data``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = Path(DEFAULT_DATA_ROOT if data_root is None else data_root).resolve() / name
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} not found; pass data_root= or set "
                                f"TFREC_DATA_ROOT to the folder holding the datasets")
    interactions = read_interactions(folder / spec.interactions, columns=spec.columns,
                                     encoding=spec.encoding)
    files = [folder / spec.interactions]
    if spec.click_threshold is not None:
        interactions["label"] = (interactions["rating"] >= spec.click_threshold).astype("float64")
    items = attributes = None
    if spec.items:
        items = read_items(folder / spec.items, encoding=spec.encoding)
        files.append(folder / spec.items)
    if spec.item_attributes:
        attributes = read_item_attributes(folder / spec.item_attributes)
        files.append(folder / spec.item_attributes)
    return Dataset(name, interactions, items, attributes, [str(f) for f in files])
