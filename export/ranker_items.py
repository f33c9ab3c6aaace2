"""New items in the served CTR ranker without retraining: a new ranker version (issue 22 item 5, ranker side).

``tfrec items add --items new.tsv --ranker runs/r2led-ml1m --ranker_out servables/ranker
[--init sid_neighbours|zero] [--version V] [--history_store URL]`` (or :func:`add_ranker_items`):

1. reads the trained run (`tfrec.ctr.new_items.RankerRun`: ``model.keras``, ``item_vocab.txt``,
   ``results.json``, the frozen quantizer in ``sids/``) and the rows of ``new.tsv`` (the row rules of
   ``tfrec items add``, `export.items_add.check_item_rows`);
2. gives every new item its rows in each per-item table the model reads (semantic IDs from the
   frozen quantizer, ID embedding row and item bias by ``init``, genres, text vectors; see
   `tfrec.ctr.new_items`), carrying over the items earlier adds gave the latest version in
   ``--ranker_out`` (its ``assets.extra/new_items.npz``, when that version extends the same trained
   model), so ids and rows of earlier new items never change either;
3. with ``--history_store URL``: adds the new items' codes to the store's SID routes in place
   (`tfrec.history.base.HistoryStore.extend_routes`; the store's routes must be this ranker's: the
   trained items' codes are compared), so their events land in their SID-prefix buckets;
4. exports the extended model with `export.saved_model.export_ctr` as the next version of
   ``--ranker_out`` (written under a temporary name, then renamed): a running ``tfrec serve`` or
   TF Serving (version policy ``latest``) loads it and swaps it in, requests in flight finishing on
   the old version (zero failed requests, ``tests/test_ranker_items.py``). The trained items score
   as in the previous version; a new item is scored with its own rows instead of the OOV id's.

The same add runs on the model server: ``tfrec serve ... --items_delta PATH --items_encoder ... --items_ranker RUN
--items_ranker_out BASE`` answers ``POST /v1/items`` with the delta write *and* this ranker version, through the one
code path of ``tfrec items add`` (`export.items_add.add_rows` with a :class:`RankerTarget`; order and failures
there).

Every check comes before anything is written: an unknown run, a token the ranker already has (a
trained item, or one an earlier add gave the served version: re-adding is refused, never a silent
change of its rows), a missing column or text the model reads, a malformed file, an existing
``--version``: a clear ``ValueError`` / ``FileNotFoundError`` naming it, nothing written.

Example (not run as a doctest: it needs a trained R2LED run; ``tests/test_ranker_items.py`` trains one):
>>> rows = read_items_file("new.tsv")                                                     # doctest: +SKIP
>>> add_ranker_items(rows, "runs/r2led-ml1m", "servables/ranker")                          # doctest: +SKIP
{'added': 2, 'items': 2, 'version': 2, 'path': 'servables/ranker/2', 'routes': None, ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from export.saved_model import NEW_ITEMS_PATH, export_ctr, next_version, version_dir
from tfrec.ctr.new_items import INITS, NewItemRows, RankerRun


def latest_version(base_dir):
    """The largest integer-named version folder under ``base_dir`` (None if there is none)."""
    latest = next_version(base_dir) - 1
    return Path(base_dir) / str(latest) if latest else None


def earlier_items(base_dir, ranker: RankerRun):
    """`(NewItemRows or None, version folder or None)`: the items earlier adds gave the latest version of
    ``base_dir`` when that version extends ``ranker``'s trained model (else None: nothing to carry over)."""
    latest = latest_version(base_dir)
    if latest is None or not (latest / NEW_ITEMS_PATH).is_file():
        return None, latest
    try:
        rows = NewItemRows.load(latest / NEW_ITEMS_PATH)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{latest / NEW_ITEMS_PATH} is not readable ({err}): cannot carry its new items over") \
            from None
    return (rows if rows.base == ranker.fingerprint else None), latest


def check_routes_store(store, ranker: RankerRun) -> None:
    """``ValueError`` unless the history ``store`` has SID routes that are ``ranker``'s (every trained item in
    its map carries the ranker's codes, and at least one is there)."""
    from tfrec.data.vocab import NUM_RESERVED

    routes = store.current_routes(max_age_seconds=0.0)
    if routes is None:
        raise ValueError("the history store has no SID routes to extend (set them first: tfrec events routes)")
    if ranker.model_sids is None:
        raise ValueError("stateful SID routes are R2LED's: this ranker has no semantic IDs")
    shared = 0
    for index, token in enumerate(ranker.item_vocab.tokens):
        codes = routes.sids.get(token)
        if codes is None:
            continue
        if codes != tuple(int(c) for c in ranker.model_sids[index + NUM_RESERVED]):
            raise ValueError(f"the history store's SID routes are not this ranker's (item {token[:64]!r} has codes "
                             f"{codes} there, {ranker.model_sids[index + NUM_RESERVED].tolist()} in the ranker)")
        shared += 1
    if not shared:
        raise ValueError("the history store's SID routes hold none of this ranker's trained items: not its routes")


@dataclasses.dataclass
class PreparedAdd:
    """Everything a ranker add writes, computed and checked (:func:`prepare_ranker_items`); nothing written yet."""

    ranker: RankerRun
    new: NewItemRows  # the items of this add
    every: NewItemRows  # every new item the version holds (earlier adds' first)
    model: object  # the extended CTR model
    item_vocab: object  # its vocabulary (trained tokens, then every.tokens)
    users: object
    user_profiles: object
    base_dir: Path
    version: int
    history_store: str = None
    started: float = 0.0


def prepare_ranker_items(rows, run, ranker_out, *, init: str = "sid_neighbours", version=None, store=None,
                         history_store=None, ranker=None) -> PreparedAdd:
    """Compute and check a ranker add (the arguments of :func:`add_ranker_items`) without writing anything."""
    started = time.perf_counter()
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    final = version_dir(ranker_out, version)  # an existing --version fails before the slow part
    ranker = ranker or RankerRun(run, store=store)
    earlier, latest = earlier_items(ranker_out, ranker)
    if earlier is not None:
        again = [row["item_id"] for row in rows if row["item_id"] in set(earlier.tokens)]
        if again:
            raise ValueError(f"{len(again)} item(s) were added to the served ranker already ({latest}), e.g. "
                             f"{again[:3]}: re-adding is refused (their rows would change)")
    if history_store is not None:
        from tfrec.history import open_store

        handle = open_store(history_store)
        try:
            check_routes_store(handle, ranker)
        finally:
            handle.close()
    new = ranker.new_item_rows(rows, init)
    every = earlier.concat(new) if earlier is not None else new
    model, item_vocab = ranker.extended(every)
    users, profiles = ranker.users()
    return PreparedAdd(ranker, new, every, model, item_vocab, users, profiles, Path(ranker_out), int(final.name),
                       history_store, started)


def publish_ranker_items(prepared: PreparedAdd) -> dict:
    """Write a prepared add: the store's SID routes (when given), then the new ranker version."""
    routed = None
    every = prepared.every
    if prepared.history_store is not None:  # before the version is published: its first requests find the buckets
        from tfrec.history import open_store

        handle = open_store(prepared.history_store)
        try:
            routed = handle.extend_routes({token: tuple(int(c) for c in codes)
                                           for token, codes in zip(every.tokens, every.sids)})
        finally:
            handle.close()
    ranker = prepared.ranker
    path = export_ctr(prepared.model, prepared.item_vocab, prepared.base_dir, version=prepared.version,
                      max_history=ranker.config.model.max_history, data_fingerprint=ranker.data_fingerprint,
                      experiment_config=ranker.config.to_dict(), users=prepared.users,
                      user_profiles=prepared.user_profiles, new_items=every)
    levels = prepared.new.init_level.tolist()
    return {"added": len(prepared.new), "items": len(every), "version": int(path.name), "path": str(path),
            "routes": routed, "init_levels": {str(level): levels.count(level) for level in sorted(set(levels))},
            "seconds": round(time.perf_counter() - prepared.started, 3)}


def add_ranker_items(rows, run, ranker_out, *, init: str = "sid_neighbours", version=None, store=None,
                     history_store=None, ranker=None) -> dict:
    """Export a new version of the ranker of ``run`` under ``ranker_out`` with the new items ``rows`` (see the
    module doc): :func:`prepare_ranker_items` then :func:`publish_ranker_items`, the code path of
    ``tfrec items add --ranker``.

    Args:
        rows: checked rows (`export.items_add.check_item_rows` / `read_items_file`).
        run: the ``tfrec ctr train`` run folder (or its ``model.keras``).
        ranker_out: the served ranker's base directory (TF Serving ``base_path``).
        init: ``sid_neighbours`` (default) or ``zero`` (`tfrec.ctr.new_items`).
        version: int or None (the next free version).
        store: optional semantic store (default: the run's).
        history_store: optional history store URL (``sqlite:///...``, ``redis://...``) whose SID routes get
            the new items.
        ranker: optional loaded `RankerRun` of ``run`` (several adds in one process).

    Returns:
        ``{"added", "items", "version", "path", "routes", "init_levels", "seconds"}``: the items added, the
        new items the version holds in all, its number and folder, the items added to the store's routes
        (None without ``history_store``), how many added items had their rows averaged over each SID prefix
        length (``tfrec.ctr.new_items.NewItemRows.init_level``: 0 = catalogue mean, -1 = ``zero``).
    """
    return publish_ranker_items(prepare_ranker_items(rows, run, ranker_out, init=init, version=version, store=store,
                                                     history_store=history_store, ranker=ranker))


def withdraw_version(path) -> None:
    """Remove a version folder this process just published (an add whose delta write failed after it,
    `export.items_add.add_rows`): renamed first to a non-numeric name (atomic: a server polling the base path
    sees the version gone, never half of it, and goes back to the previous one), then deleted."""
    path = Path(path)
    hidden = path.parent / f".withdrawn-{path.name}-{uuid.uuid4().hex[:8]}"  # not a number: servers ignore it
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


@dataclasses.dataclass
class RankerTarget:
    """Where the ranker side of an add goes, fixed once by the operator (``tfrec items add --ranker RUN
    --ranker_out BASE ...``, ``tfrec serve --items_ranker RUN --items_ranker_out BASE ...``) and used for every
    add (`export.items_add.add_rows`). :meth:`load` reads the trained run once (the server does it at start-up).

    Args:
        run: the ``tfrec ctr train`` run folder (or its ``model.keras``).
        ranker_out: the served ranker's base directory.
        init: ``sid_neighbours`` (default) or ``zero``.
        version: int or None (the next free version; the CLI's ``--version``).
        store: optional semantic store of the run.
        history_store: optional history store URL whose SID routes get the new items (required there).
        ranker: the loaded `RankerRun` (None: loaded by :meth:`load`).

    >>> RankerTarget("runs/r2led", "servables/ranker", init="random")
    Traceback (most recent call last):
    ...
    ValueError: init must be one of sid_neighbours, zero, got 'random'
    """

    run: str
    ranker_out: str
    init: str = "sid_neighbours"
    version: Optional[int] = None
    store: Optional[str] = None
    history_store: Optional[str] = None
    ranker: Optional[RankerRun] = None

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")

    def load(self) -> "RankerTarget":
        """Read the trained run (once); returns ``self``."""
        if self.ranker is None:
            self.ranker = RankerRun(self.run, store=self.store)
        return self

    def prepare(self, rows) -> PreparedAdd:
        """:func:`prepare_ranker_items` of ``rows`` (checked and computed; nothing written)."""
        return prepare_ranker_items(rows, self.run, self.ranker_out, init=self.init, version=self.version,
                                    store=self.store, history_store=self.history_store, ranker=self.load().ranker)

    @contextlib.contextmanager
    def lock(self):
        """An exclusive ``flock`` on ``<ranker_out>.lock`` (beside the base directory, which servers list):
        adds to one served ranker (the server's ``POST /v1/items``, ``tfrec items add --ranker`` runs) take
        turns, so none publishes a version without the items of one published meanwhile."""
        base = Path(self.ranker_out)
        base.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{base}.lock", "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            handle.close()


def describe(result: dict) -> str:
    """The line ``tfrec items add --ranker`` prints."""
    routes = "" if result["routes"] is None else f"; {result['routes']} added to the store's SID routes"
    return (f"tfrec items add: {result['added']} added to the ranker; version {result['version']} ({result['path']}) "
            f"holds {result['items']} new items (init levels {json.dumps(result['init_levels'])}){routes}, "
            f"{result['seconds']} s")
