"""Version folders on a file system (TF Serving's ``FileSystemStoragePathSource``).

A model's ``base_path`` holds one folder per version, named by its number
(``<base_path>/3/saved_model.pb``); other names are ignored. Local paths use
``os``; URLs (``gs://``, ``hdfs://`` ...) use ``tf.io.gfile``. :func:`snapshot`
fingerprints a version folder (file names, sizes, mtimes) so the registry can
tell a complete, stable version from one still being written.

Example::

    >>> list_versions("/no/such/folder") is None
    True
"""

from __future__ import annotations

import os
from typing import Dict, Optional


MAX_VERSION_FILES = 100_000  # a "version" folder with more files is not a SavedModel (e.g. /proc/<pid>)


def snapshot(path: str) -> Optional[tuple]:
    """(relative path, size, mtime) of every file under ``path``; ``None`` without saved_model.pb,
    when a file cannot be read, or beyond :data:`MAX_VERSION_FILES` files."""
    entries = []
    if "://" not in path:
        try:
            if not {"saved_model.pb", "saved_model.pbtxt"} & set(os.listdir(path)):
                return None  # checked first: never walk a folder that is no SavedModel
        except OSError:
            return None
    if "://" in path:
        import tensorflow as tf

        for root, _, files in tf.io.gfile.walk(path):
            for name in files:
                full = os.path.join(root, name)
                stat = tf.io.gfile.stat(full)
                entries.append((os.path.relpath(full, path), stat.length, stat.mtime_nsec))
    else:
        for root, _, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                try:
                    stat = os.stat(full)
                except OSError:  # removed while listing, or unreadable: not stable
                    return None
                entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
                if len(entries) > MAX_VERSION_FILES:
                    return None
    names = {e[0] for e in entries}
    if not names & {"saved_model.pb", "saved_model.pbtxt"}:
        return None
    return tuple(sorted(entries))


def list_versions(base_path: str) -> Optional[Dict[int, str]]:
    """Numbered version folders of ``base_path``; ``None`` if the folder does not exist.

    Other failures (permission denied, I/O errors) raise ``OSError``: the registry marks
    that model as failed and goes on with the others.
    """
    if "://" in base_path:
        import tensorflow as tf

        if not tf.io.gfile.isdir(base_path):
            return None
        names = [n.rstrip("/") for n in tf.io.gfile.listdir(base_path)]
        isdir = tf.io.gfile.isdir
    else:
        try:
            names = os.listdir(base_path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        isdir = os.path.isdir
    versions = {}
    for name in names:
        if name.isascii() and name.isdigit() and isdir(os.path.join(base_path, name)):
            versions[int(name)] = os.path.join(base_path, name)
    return versions
