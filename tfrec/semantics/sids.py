"""Semantic IDs (SIDs) as an artifact: residual-quantizer codes for every item.

R2LED gives each item a short code of L levels from a residual quantizer over
its semantic embedding (MiniLM, 384-d, L2-normalised). This module fits a
`tfrec.layers.ResidualQuantizer` on an item embedding table aligned with the
item vocabulary (row i = item id i) and writes an artifact directory:

    sids.npy         (V, L) int32, or (V, L + 1) with de-duplication
    codebooks.npz    codebook_0 .. codebook_{L-1}: (K_l, code_dim) float32
    quantizer.keras  the fitted quantizer (keras.saving), for new items
    metadata.json    mode, levels, codebook sizes, config, seed, diagnostics,
                     source fingerprint, this artifact's fingerprint (written last)

Rows without a semantic ID hold `NO_SID = -1` in every column: rows 0 and 1
(padding, OOV) and items without the view (mask False; with no mask given,
all-zero rows, the semantic store's convention for missing text). They are
left out of fitting and of the diagnostics. Consumers that embed codes must
map -1 themselves (e.g. `codes + 1` with a table one row larger).

De-duplication (ours, optional, `deduplicate=True` by default): the TIGER-style
rule. An extra last level holds a running index among items sharing the same
L-level code, in item-id order (0 for the lowest id), so final SIDs are unique.
The extra level's range is `metadata["dedup_level_size"]` (largest group size).

Diagnostics (on the fitted rows): `code_utilisation` per level (fraction of a
level's codewords used), `collision_rate` (fraction of items whose full L-level
code equals another item's), `reconstruction_error` (MSE over all entries and
mean cosine between x and its reconstruction), also for each code prefix.

`tfrec sids --store DIR [--view title] --out DIR --mode rqkmeans|rqvae --levels 3
--codebook-size 256 [--seed 0]` runs it on a semantic store (`--embeddings
FILE.npy` takes a plain `(V, d)` array instead) and prints the diagnostics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

NO_SID = -1
FORMAT_VERSION = 1
CODES_FILE = "sids.npy"
CODEBOOKS_FILE = "codebooks.npz"
QUANTIZER_FILE = "quantizer.keras"
METADATA_FILE = "metadata.json"
SIDS_FOLDER = "sids"  # a run's semantic-ID artifact folder (`tfrec ctr train` writes <run>/sids)


class SidsFingerprintError(ValueError):
    """The SIDs were fitted on another semantic store than the one expected."""


SIDS_MODES = ("rqkmeans", "rqvae")


@dataclass
class SidsConfig:
    """How to fit SIDs: the one config of semantic IDs for every task.

    It is `tfrec sids`'s options, the `sids:` section of a CTR config
    (`tfrec.ctr.CTRConfig`, `tfrec ctr train`) and the TFX `SemanticIds`
    component's parameters. Quantizer arguments as in `ResidualQuantizer`.

    - `store_path`, `view`: the semantic store and its pooled view to quantise
      (`tfrec sids --store/--view`; CTR: `tfrec ctr encode` writes the store).
    - `mode`: `rqkmeans` or `rqvae`; `num_levels`: code length L.
    - `codebook_size`: codewords per level, one size for every level or one per
      level (an int is read as one size for all).
    - `iterations` is for rqkmeans (k-means iterations per level); `epochs`,
      `batch_size`, `learning_rate`, `latent_dim`, `hidden_dims`,
      `commitment_weight`, `dead_code_threshold` for rqvae.

    YAML key aliases (the older CTR names, still read): `quantizer` = `mode`,
    `levels` = `num_levels`; giving both names of one key is an error.

    >>> config = SidsConfig(num_levels=2, codebook_size=8)
    >>> config.codebook_size, config.level_sizes()
    ((8,), [8, 8])
    >>> SidsConfig(mode="pq").check("sids.")
    Traceback (most recent call last):
    ...
    ValueError: config key sids.mode must be one of rqkmeans, rqvae; got 'pq'
    """

    KEY_ALIASES: ClassVar[dict] = {"quantizer": "mode", "levels": "num_levels"}

    store_path: Optional[str] = None
    view: str = "title"
    mode: str = "rqkmeans"
    num_levels: int = 3
    codebook_size: tuple = (256,)
    deduplicate: bool = True
    seed: int = 0
    iterations: int = 20
    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 1e-3
    latent_dim: int = 32
    hidden_dims: tuple = (256, 128)
    commitment_weight: float = 0.25
    dead_code_threshold: int = 1

    def __post_init__(self):
        sizes = self.codebook_size
        self.codebook_size = (sizes,) if np.isscalar(sizes) else tuple(sizes)
        self.hidden_dims = tuple(self.hidden_dims)

    def check(self, where: str = "") -> "SidsConfig":
        """Value checks naming the offending key (`where` prefixes it, e.g. `"sids."`)."""
        if self.mode not in SIDS_MODES:
            raise ValueError(f"config key {where}mode must be one of {', '.join(SIDS_MODES)}; got {self.mode!r}")
        for key in ("num_levels", "iterations", "epochs", "batch_size", "latent_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {where}{key} must be >= 1, got {getattr(self, key)!r}")
        if len(self.codebook_size) not in (1, self.num_levels):
            raise ValueError(f"config key {where}codebook_size must have 1 or {where}num_levels={self.num_levels} "
                             f"entries, got {list(self.codebook_size)}")
        if any(int(k) != k or k < 2 for k in self.codebook_size):
            raise ValueError(f"config key {where}codebook_size: every size must be an integer >= 2, "
                             f"got {list(self.codebook_size)}")
        return self

    def level_sizes(self) -> list:
        """Codewords per level, one int for each of the `num_levels` levels."""
        sizes = list(self.codebook_size)
        return [int(k) for k in (sizes * self.num_levels if len(sizes) == 1 else sizes)]

    def fit_options(self) -> dict:
        """What the fit depends on (not where the store is): recorded in, and hashed into, the metadata."""
        options = dataclasses.asdict(self)
        for key in ("store_path", "view"):
            options.pop(key)
        options.update(codebook_size=self.level_sizes(), hidden_dims=list(self.hidden_dims))
        return options

    def quantizer_kwargs(self) -> dict:
        return dict(
            num_levels=self.num_levels, codebook_size=self.level_sizes(), mode=self.mode,
            latent_dim=self.latent_dim, hidden_dims=list(self.hidden_dims),
            commitment_weight=self.commitment_weight, dead_code_threshold=self.dead_code_threshold,
            seed=self.seed,
        )


@dataclass
class SemanticIds:
    """Loaded or freshly fitted SIDs.

    Attributes:
        codes: `(V, L[+1])` int32, row = item id, `NO_SID` (-1) where none.
        codebooks: list of `(K_l, code_dim)` float32 arrays.
        metadata: the `metadata.json` content.
        path: artifact directory, None before saving.
    """

    codes: np.ndarray
    codebooks: list
    metadata: dict
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def source_fingerprint(self) -> str:
        return self.metadata["source"]["fingerprint"]

    def load_quantizer(self):
        """The fitted `ResidualQuantizer` from `quantizer.keras` (needs a saved artifact)."""
        import keras

        import tfrec.layers.residual_quantizer  # noqa: F401  (registers the class)

        if self.path is None:
            raise ValueError("these SIDs have not been saved; the quantizer is only stored in an artifact dir")
        return keras.saving.load_model(self.path / QUANTIZER_FILE, compile=False).layers[-1]


# === Diagnostics and de-duplication ===
def code_utilisation(codes, codebook_sizes) -> list[float]:
    """Fraction of each level's codewords used by at least one row of `codes (N, L)`."""
    codes = np.asarray(codes)
    return [len(np.unique(codes[:, level])) / k for level, k in enumerate(codebook_sizes)]


def _group_ids(codes):
    """(N,) index of each row's distinct code, and the size of each distinct code's group."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_rate(codes) -> float:
    """Fraction of rows whose full code equals another row's code.

    >>> collision_rate(np.array([[0, 1], [0, 1], [0, 2], [3, 3]]))
    0.5
    """
    codes = np.asarray(codes)
    if len(codes) == 0:
        return 0.0
    inverse, counts = _group_ids(codes)
    return float(np.mean(counts[inverse] > 1))


def reconstruction_error(x, x_hat) -> dict:
    """`{"mse": mean over all entries, "mean_cosine": mean row cosine}` of `x` vs `x_hat`."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    cosine = np.sum(x * x_hat, axis=1) / np.maximum(norms, 1e-12)
    return {"mse": float(np.mean((x - x_hat) ** 2)), "mean_cosine": float(np.mean(cosine))}


def deduplicate_codes(codes) -> np.ndarray:
    """Append a level with a running index among rows sharing the same code.

    Rows keep their order (the index counts in row = item-id order); rows with
    any `NO_SID` get `NO_SID` in the new level too.

    >>> deduplicate_codes(np.array([[4, 2], [1, 0], [4, 2], [-1, -1]])).tolist()
    [[4, 2, 0], [1, 0, 0], [4, 2, 1], [-1, -1, -1]]
    """
    codes = np.asarray(codes)
    extra = np.full(len(codes), NO_SID, dtype=np.int64)
    valid = np.all(codes >= 0, axis=1)
    if valid.any():
        inverse, _ = _group_ids(codes[valid])
        order = np.argsort(inverse, kind="stable")  # grouped, row order inside a group
        grouped = inverse[order]
        starts = np.r_[True, grouped[1:] != grouped[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        running = np.empty(len(order), dtype=np.int64)
        running[order] = np.arange(len(order)) - first
        extra[valid] = running
    return np.concatenate([codes, extra[:, None]], axis=1).astype(np.int32)


def diagnose(quantizer, x, codes) -> dict:
    """All diagnostics of `codes (N, L)` = `quantizer.compute_codes(x)` for `x (N, d)`."""
    import keras

    per_level = [
        reconstruction_error(x, keras.ops.convert_to_numpy(quantizer.reconstruct(codes[:, : level + 1])))
        for level in range(quantizer.num_levels)
    ]
    _, counts = _group_ids(codes)
    return {
        "num_items": int(len(codes)),
        "codes_used": [int(len(np.unique(codes[:, level]))) for level in range(quantizer.num_levels)],
        "code_utilisation": code_utilisation(codes, quantizer.codebook_sizes),
        "collision_rate": collision_rate(codes),
        "max_items_per_code": int(counts.max()),
        "reconstruction_mse": per_level[-1]["mse"],
        "reconstruction_cosine": per_level[-1]["mean_cosine"],
        "level_reconstruction_mse": [e["mse"] for e in per_level],
        "level_reconstruction_cosine": [e["mean_cosine"] for e in per_level],
    }


def format_diagnostics(metadata: dict) -> str:
    """The diagnostics table printed by `tfrec sids` (one row per level, cumulative)."""
    from tfrec.metrics import format_metrics_table

    diag = metadata["diagnostics"]
    rows = [
        {
            "level": level,
            "codebook_size": k,
            "codes_used": diag["codes_used"][level],
            "utilisation": diag["code_utilisation"][level],
            "recon_mse (levels <= l)": diag["level_reconstruction_mse"][level],
            "recon_cosine (levels <= l)": diag["level_reconstruction_cosine"][level],
        }
        for level, k in enumerate(metadata["codebook_sizes"])
    ]
    lines = [
        format_metrics_table(rows),
        f"items fitted: {diag['num_items']} of {metadata['num_rows']} rows "
        f"({metadata['num_rows'] - diag['num_items']} without SID, code {NO_SID})",
        f"collision rate (full {len(rows)}-level code): {diag['collision_rate']:.4f}, "
        f"largest group: {diag['max_items_per_code']} items",
    ]
    if metadata["deduplicated"]:
        lines.append(f"de-duplicated: extra level of size {metadata['dedup_level_size']}, final SIDs unique")
    return "\n".join(lines)


# === Fitting and the artifact ===
def array_fingerprint(array) -> str:
    """sha256 of an array's dtype, shape and bytes (for `--embeddings FILE.npy`)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def fit_sids(embeddings, source_fingerprint: str, config: SidsConfig | None = None, *, mask=None,
             item_vocab=None, source: dict | None = None):
    """Fit a quantizer on the item table and compute SIDs for every row.

    Args:
        embeddings: `(V, d)` float array, row i = item id i (rows 0, 1 reserved).
        source_fingerprint: fingerprint of the data the embeddings come from
            (the semantic store's `fingerprint`), recorded in the metadata.
        config: `SidsConfig`; defaults to `SidsConfig()`.
        mask: optional `(V,)` bool, True = the item has an embedding. Defaults to
            "row is not all zeros".
        item_vocab: optional `Vocabulary`; if given, V must equal `item_vocab.size`.
        source: optional extra description of the source (store path, view).

    Returns:
        `(SemanticIds, ResidualQuantizer)`; save them with `save_sids`.
    """
    from tfrec.layers.residual_quantizer import ResidualQuantizer

    config = (config or SidsConfig()).check()
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] < 3:
        raise ValueError(
            f"embeddings must be (V, d) with V >= 3 (padding, OOV, items), got shape {embeddings.shape}."
        )
    num_rows = embeddings.shape[0]
    if item_vocab is not None and item_vocab.size != num_rows:
        raise ValueError(f"embeddings have {num_rows} rows but the item vocabulary has size {item_vocab.size}.")
    if mask is None:
        mask = np.any(embeddings != 0, axis=1)
    mask = np.asarray(mask)
    if mask.shape != (num_rows,) or mask.dtype != bool:
        raise ValueError(f"mask must be a bool array of shape ({num_rows},), got {mask.dtype} {mask.shape}.")
    fitted = mask.copy()
    fitted[:2] = False
    rows = np.flatnonzero(fitted)
    if rows.size == 0:
        raise ValueError("no item row has an embedding (all masked out or zero); nothing to fit.")
    x = embeddings[rows]

    start = time.time()
    quantizer = ResidualQuantizer(**config.quantizer_kwargs())
    if config.mode == "rqvae":
        quantizer.fit_rqvae(x, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                            learning_rate=config.learning_rate)
    else:
        quantizer.fit_rqkmeans(x, iterations=config.iterations, seed=config.seed)
    fit_seconds = time.time() - start
    import keras

    item_codes = keras.ops.convert_to_numpy(quantizer.compute_codes(x)).astype(np.int32)  # (N, L)
    diagnostics = diagnose(quantizer, x, item_codes)
    codes = np.full((num_rows, config.num_levels), NO_SID, dtype=np.int32)
    codes[rows] = item_codes
    dedup_level_size = None
    if config.deduplicate:
        codes = deduplicate_codes(codes)
        dedup_level_size = int(codes[:, -1].max()) + 1
    codebooks = [keras.ops.convert_to_numpy(cb).astype(np.float32) for cb in quantizer.codebooks]

    digest = hashlib.sha256(source_fingerprint.encode())
    digest.update(json.dumps(config.fit_options(), sort_keys=True).encode())
    digest.update(codes.tobytes())
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "semantic_ids",
        "mode": config.mode,
        "num_levels": config.num_levels,
        "codebook_sizes": quantizer.codebook_sizes,
        "deduplicated": config.deduplicate,
        "dedup_level_size": dedup_level_size,
        "code_length": int(codes.shape[1]),
        "no_sid_code": NO_SID,
        "num_rows": num_rows,
        "embedding_dim": int(embeddings.shape[1]),
        "seed": config.seed,
        "config": config.fit_options(),
        "source": {"fingerprint": source_fingerprint, **(source or {})},
        "diagnostics": diagnostics,
        "fingerprint": digest.hexdigest(),
        "fit_seconds": round(fit_seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return SemanticIds(codes, codebooks, metadata), quantizer


def sids_view(sids: SemanticIds) -> str:
    """The semantic store view the SIDs were fitted on (recorded in their metadata's ``source``)."""
    view = (sids.metadata.get("source") or {}).get("view")
    if not view:
        raise ValueError(f"the semantic IDs{' at ' + str(sids.path) if sids.path else ''} do not record which "
                         "store view they were fitted on; fit them again (tfrec sids / tfrec ctr train)")
    return view


def new_item_sids(sids: SemanticIds, quantizer, embeddings, mask=None) -> np.ndarray:
    """Semantic IDs of items the artifact was not fitted on, from its frozen quantizer: THE new-item codes.

    Each row with an embedding gets, level by level, the nearest codeword of what the earlier
    levels left (`ResidualQuantizer.compute_codes`: the same codes `fit_sids` gave the fitted rows);
    rows without one get `NO_SID` everywhere. Used by both new-item paths: the R2LED ranker's tables
    (`tfrec.ctr.new_items`) and the retrieval delta (`tfrec.semantics.new_items.NewItemEncoder`).

    With de-duplication (ours, as `deduplicate_codes`): a new item's extra level is the next free
    index among the fitted items (and the earlier rows of this call) sharing its `L`-level code,
    capped at `dedup_level_size - 1` (a model's code table for that level has no row beyond it; the
    capped item then shares its full code with another).

    Args:
        sids: the fitted `SemanticIds` (their codes and metadata).
        quantizer: their fitted `ResidualQuantizer` (`SemanticIds.load_quantizer`, or `fit_sids`'s).
        embeddings: `(n, d)` float vectors in the fitted space (the store view's pooled vectors).
        mask: optional `(n,)` bool, True = the row has an embedding. Defaults to "row is not all zeros".

    Returns:
        `(n, code_length)` int32.

    Example:
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(12, 4)).astype("float32")
    >>> sids, quantizer = fit_sids(x, "demo", SidsConfig(num_levels=2, codebook_size=3, deduplicate=False))
    >>> bool((new_item_sids(sids, quantizer, x[5:8]) == sids.codes[5:8]).all())
    True
    >>> new_item_sids(sids, quantizer, np.zeros((1, 4), "float32")).tolist()
    [[-1, -1]]
    """
    import keras

    embeddings = np.asarray(embeddings, np.float32)
    dim = int(sids.metadata["embedding_dim"])
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"new item embeddings must be (n, {dim}) (the fitted space), got {embeddings.shape}")
    mask = np.any(embeddings != 0, axis=1) if mask is None else np.asarray(mask, bool)
    if mask.shape != (len(embeddings),):
        raise ValueError(f"mask must be ({len(embeddings)},) bool, got {mask.shape}")
    levels = int(sids.metadata["num_levels"])
    codes = np.full((len(embeddings), int(sids.metadata["code_length"])), NO_SID, np.int32)
    rows = np.flatnonzero(mask)
    if rows.size:
        codes[rows, :levels] = keras.ops.convert_to_numpy(quantizer.compute_codes(embeddings[rows]))
    if sids.metadata["deduplicated"]:
        size = int(sids.metadata["dedup_level_size"])
        taken: dict = {}
        for code in sids.codes[sids.codes[:, 0] >= 0]:
            key = tuple(code[:levels].tolist())
            taken[key] = max(taken.get(key, 0), int(code[levels]) + 1)
        for row in rows:
            key = tuple(codes[row, :levels].tolist())
            codes[row, levels] = min(taken.get(key, 0), size - 1)
            taken[key] = taken.get(key, 0) + 1
    return codes


def save_sids(sids: SemanticIds, quantizer, out_dir) -> SemanticIds:
    """Write the artifact dir (created if needed; files of an earlier run replaced)."""
    import keras

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)  # metadata is written last: marks a complete artifact
    np.save(out / CODES_FILE, sids.codes)
    np.savez(out / CODEBOOKS_FILE, **{f"codebook_{i}": cb for i, cb in enumerate(sids.codebooks)})
    model = keras.Sequential([keras.Input((sids.metadata["embedding_dim"],)), quantizer])
    model.save(out / QUANTIZER_FILE)
    (out / METADATA_FILE).write_text(json.dumps(sids.metadata, indent=2) + "\n")
    return dataclasses.replace(sids, path=out)


def load_sids(path, expected_fingerprint: str | None = None) -> SemanticIds:
    """Read an artifact written by `save_sids`.

    Args:
        path: artifact directory.
        expected_fingerprint: if given, the source fingerprint the SIDs must have
            been fitted on (e.g. the current semantic store's `fingerprint`);
            a mismatch raises `SidsFingerprintError` (a `ValueError`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no semantic-ID artifact at {path} (not a directory); run `tfrec sids` first")
    for name in (METADATA_FILE, CODES_FILE, CODEBOOKS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: incomplete semantic-ID artifact; rerun `tfrec sids`")
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
        source_fingerprint = metadata["source"]["fingerprint"]
        expected_shape = (metadata["num_rows"], metadata["code_length"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path / METADATA_FILE}: not a semantic-ID metadata file ({err!r})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / METADATA_FILE}: format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if expected_fingerprint is not None and source_fingerprint != expected_fingerprint:
        raise SidsFingerprintError(
            f"semantic IDs at {path} were fitted on source fingerprint {source_fingerprint}, expected "
            f"{expected_fingerprint}; the semantic store changed, rerun `tfrec sids`"
        )
    codes = np.load(path / CODES_FILE)
    if codes.shape != expected_shape or codes.dtype != np.int32:
        raise ValueError(
            f"{path / CODES_FILE}: {codes.dtype} {codes.shape}, metadata says int32 {expected_shape}"
        )
    with np.load(path / CODEBOOKS_FILE) as archive:
        codebooks = [archive[f"codebook_{i}"] for i in range(metadata["num_levels"])]
    return SemanticIds(codes, codebooks, metadata, path)


def sids_from_store(store_path, out_dir, view: str = "title", config: SidsConfig | None = None) -> SemanticIds:
    """Fit and save SIDs for the pooled `view` of a semantic store (`tfrec.semantics.store`)."""
    try:
        from tfrec.semantics.store import SemanticStore
    except ModuleNotFoundError as err:
        if err.name != "tfrec.semantics.store":
            raise
        raise ValueError("reading a semantic store needs tfrec.semantics.store, which is not installed") from None
    store = SemanticStore.load(store_path)
    store_view = store.view(view)
    sids, quantizer = fit_sids(
        np.asarray(store_view.pooled), store.fingerprint, config,
        mask=np.asarray(store_view.mask, dtype=bool),
        source={"store": str(store_path), "view": view,
                "item_vocab_fingerprint": getattr(store, "vocab_fingerprint", None)},
    )
    return save_sids(sids, quantizer, out_dir)


# === CLI ===
def _codebook_size(text):
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--codebook-size expects an int or comma-separated ints, got {text!r}") from None
    return sizes[0] if len(sizes) == 1 else sizes


def _cmd_sids(args):
    config = SidsConfig(
        store_path=args.store, view=args.view,
        mode=args.mode, num_levels=args.levels, codebook_size=_codebook_size(args.codebook_size),
        deduplicate=not args.no_dedup, seed=args.seed, iterations=args.iterations, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, latent_dim=args.latent_dim,
    ).check()
    if config.store_path:
        sids = sids_from_store(config.store_path, args.out, view=config.view, config=config)
    else:
        if not Path(args.embeddings).is_file():
            raise FileNotFoundError(f"embeddings file not found: {args.embeddings}")
        try:
            embeddings = np.load(args.embeddings, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{args.embeddings}: not a numpy .npy array ({err})") from None
        source = {"embeddings": str(args.embeddings)}
        sids = save_sids(*fit_sids(embeddings, array_fingerprint(embeddings), config, source=source), args.out)
    print(format_diagnostics(sids.metadata))
    print(f"\nwrote {sids.path} (fingerprint {sids.fingerprint[:12]}, fit {sids.metadata['fit_seconds']:.1f}s)")


def add_commands(subparsers):
    cmd = subparsers.add_parser("sids", help="fit semantic IDs (residual quantizer) for an item embedding table")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="semantic store directory (tfrec encode)")
    source.add_argument("--embeddings", help="a (V, d) .npy table aligned with the item vocabulary instead")
    cmd.add_argument("--view", default="title", help="store view to quantize (default: title)")
    cmd.add_argument("--out", required=True, help="output artifact directory")
    cmd.add_argument("--mode", choices=SIDS_MODES, default="rqkmeans")
    cmd.add_argument("--levels", type=int, default=3)
    cmd.add_argument("--codebook-size", default="256", help="int, or one int per level: 256,256,256")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--no-dedup", action="store_true", help="do not append the de-duplication level")
    cmd.add_argument("--iterations", type=int, default=20, help="k-means iterations per level (rqkmeans)")
    cmd.add_argument("--epochs", type=int, default=50, help="training epochs (rqvae)")
    cmd.add_argument("--batch-size", type=int, default=256, help="batch size (rqvae)")
    cmd.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (rqvae)")
    cmd.add_argument("--latent-dim", type=int, default=32, help="latent size (rqvae)")
    cmd.set_defaults(func=_cmd_sids)
