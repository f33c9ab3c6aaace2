"""Stateful R2LED routes of an exported ranker: its item -> SID map, read from the SavedModel.

``tfrec events routes --store URL --model_dir SERVABLE/VERSION --model NAME``
stores the SID map of an exported R2LED ranker (``tfrec ctr export``) in a
history store, so that the server's ``score`` requests by user id for model
``NAME`` gather the candidates' SID-prefix buckets instead of reading the
history (``tfrec.history.routes``, ``export.server.user_history``).

The map comes from the SavedModel itself: its ``export_metadata.json`` (kind
``ctr``, ``model_class`` ``R2LED``, the route levels and ``top_k``), its
``item_sids`` variable ``(V, L)`` and its ``assets/item_vocab.txt`` (rows after
the reserved ids). Nothing else is trusted: a SavedModel that is not an R2LED
ranker is refused with the reason.

Example (not run as a doctest: it needs an exported, trained R2LED ranker;
``tests/test_user_history_routes.py`` exports one):
>>> routes = savedmodel_routes("servables/r2led/1", model="r2led")  # doctest: +SKIP
>>> routes.levels                                                   # doctest: +SKIP
[1, 2, 3]
"""

from __future__ import annotations

import json
import os

from tfrec.history.routes import DEFAULT_BUCKET_SIZE, DEFAULT_RECENT, SIDRoutes, model_sid_map

METADATA_FILE = "export_metadata.json"  # export.saved_model.METADATA_FILE (not imported: it loads TensorFlow)
VOCAB_ASSET = os.path.join("assets", "item_vocab.txt")


def savedmodel_routes(version_dir: str, model: str = None, bucket_size: int = DEFAULT_BUCKET_SIZE,
                      recent: int = DEFAULT_RECENT) -> SIDRoutes:
    """The :class:`SIDRoutes` of the R2LED ranker exported in ``version_dir`` (see the module doc).

    ``ValueError`` naming the problem when ``version_dir`` is not an exported R2LED ranker, or when
    ``bucket_size`` is below the model's ``top_k`` (a route could then miss matches it would select).
    """
    import numpy as np
    import tensorflow as tf

    from tfrec.data.vocab import Vocabulary

    path = os.path.join(version_dir, METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{version_dir} is not an exported tfrec model ({METADATA_FILE}: {err})") from None
    if metadata.get("kind") != "ctr" or metadata.get("model_class") != "R2LED":
        raise ValueError(f"{version_dir} holds a {metadata.get('model_class') or metadata.get('kind')} model; "
                         "stateful routes need an exported R2LED ranker (tfrec ctr export)")
    config = metadata.get("model_config", {})
    top_k = config.get("top_k", 32)
    largest = max(top_k) if isinstance(top_k, list) else int(top_k)
    if bucket_size < largest:
        raise ValueError(f"bucket_size={bucket_size} is below the model's top_k={largest}: routes would miss "
                         "behaviours the model selects")
    loaded = tf.saved_model.load(version_dir)
    tables = [v for v in getattr(loaded, "model_variables", ())
              if v.name.split("/")[-1].startswith("item_sids") and v.shape.rank == 2 and v.dtype.is_integer]
    if len(tables) != 1:
        raise ValueError(f"{version_dir}: expected one item_sids variable in the SavedModel, found {len(tables)}")
    vocab = Vocabulary.load(os.path.join(version_dir, VOCAB_ASSET))
    sids = model_sid_map(np.asarray(tables[0].numpy()), vocab.tokens)
    return SIDRoutes(sids, config.get("route_levels"), bucket_size, recent, model)
