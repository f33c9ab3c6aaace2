"""Per-user event histories for serving by user id (issue 22): the contract and its backends.

:func:`open_store` opens a store from a URL:

- ``sqlite:///abs/path/events.db`` (or ``sqlite://relative/path.db``): the embedded
  :class:`~tfrec.history.sqlite_store.SQLiteHistoryStore` (default backend);
- ``redis://host[:port][/db]``: :class:`~tfrec.history.redis_store.RedisHistoryStore`.

Example:
>>> import os, tempfile
>>> store = open_store("sqlite:///" + os.path.join(tempfile.mkdtemp(), "h.db"))
>>> type(store).__name__
'SQLiteHistoryStore'
>>> store.close()
"""

from tfrec.history.base import (
    MAX_APPEND,
    MAX_ID_BYTES,
    MAX_TOKEN_BYTES,
    Event,
    HistoryStore,
    HistoryStoreError,
    InvalidEvent,
    StoreUnavailable,
    check_event,
    check_events,
    event_from_mapping,
)


def open_store(url: str, root=None, **options) -> HistoryStore:
    """The :class:`HistoryStore` a URL names (see the module docstring).

    Args:
        url: ``sqlite://PATH`` or ``redis://host[:port][/db]``.
        root: optional folder a SQLite file must lie in.
        **options: passed to the backend's constructor.
    """
    if not isinstance(url, str):
        raise ValueError(f"history store URL must be a string, got {type(url).__name__}")
    if url.startswith("sqlite://"):
        from tfrec.history.sqlite_store import SQLiteHistoryStore

        return SQLiteHistoryStore(url[len("sqlite://"):], root=root, **options)
    if url.startswith("redis://"):
        from tfrec.history.redis_store import RedisHistoryStore

        return RedisHistoryStore(url, **options)
    raise ValueError(f"unknown history store URL {url!r}: expected sqlite:///path/file.db or redis://host:port/db")


__all__ = ["Event", "HistoryStore", "HistoryStoreError", "InvalidEvent", "StoreUnavailable", "check_event",
           "check_events", "event_from_mapping", "open_store", "MAX_APPEND", "MAX_ID_BYTES", "MAX_TOKEN_BYTES"]
