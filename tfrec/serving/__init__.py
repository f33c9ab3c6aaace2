"""The serving contract and the servables, below both `export` and `tfx_pipeline`.

- `tfrec.serving.contract`: signature names, input specs, the history-id
  compaction and checks, `tf.Example` parsing (re-exported here);
- `tfrec.serving.servables`: `SequentialServable`, `CTRServable`, `ItemLookup`,
  `UserLookup`, `catalog_table` — the one serving graph per task;
- `tfrec.serving.retrieval`: `BruteForceIndex` / `ScaNNIndex` (TFRS
  `factorized_top_k`), `build_indexes`, `recall_at_k`.

TensorFlow Recommenders (the retrieval indexes) subclasses `tf.keras`, so it
needs `tf.keras` = tf_keras: `TF_USE_LEGACY_KERAS=1` is set here, before this
package imports TensorFlow (entry points set it earlier with
`tfrec.runtime.configure`); `import keras` stays Keras 3.
"""

import os as _os

_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from tfrec.serving.contract import (  # noqa: E402
    CANDIDATES_SPEC,
    CTR_EXAMPLE_TIMESTAMP,
    CTR_EXAMPLE_USER,
    CTR_FEEDBACK_INPUTS,
    CTR_SCORE_SPECS,
    EXCLUDE_SPEC,
    EXCLUDED_SCORE,
    HISTORY_LABELS_SPEC,
    HISTORY_RATINGS_SPEC,
    HISTORY_SPEC,
    HISTORY_TIMESTAMPS_SPEC,
    PADDING_PROBABILITY,
    RECOMMEND,
    RECOMMEND_EXAMPLES,
    SCORE,
    SCORE_EXAMPLES,
    SERIALIZED_SPEC,
    SERVING_DEFAULT,
    TIMESTAMP_SPEC,
    USER_EMBEDDING,
    USER_SPEC,
    checked_exclude_flags,
    checked_same_rows,
    checked_same_shape,
    compact_known_ids,
    ctr_history_features,
    gather_recent,
    parse_ctr_examples,
    parse_history_examples,
    recent_known_ids,
    recent_known_positions,
    signature_variables,
)
