"""tfrec: production recommenders in TensorFlow / Keras 3.

Sub-packages (imports point downwards only; `tfrec` never imports `tfx` or `export`):

- `tfrec.data`: readers, vocabularies, k-core filtering, leave-one-out splits,
  Apache Beam preprocessing, `tf.data` input pipelines.
- `tfrec.layers`: Keras 3 layers (sequential backbones and their parts).
- `tfrec.models`: Keras models composed from layers (next-item task).
- `tfrec.metrics`: ranking and CTR metrics.
- `tfrec.ctr`: lifelong CTR models (R2LED, baselines): config, data, training, evaluation.
- `tfrec.serving`: the serving contract and the servables (below `export` and `tfx_pipeline`).

The `tfrec` command lives above the library, in `tfrec_cli`.
"""

import os as _os

# TensorFlow's BFC allocator on CPU reuses large buffers instead of returning
# them to the OS; on VMs where page faults are expensive it makes the
# catalog-wide softmax about 2x faster. Effective only if tfrec is imported
# before tensorflow (the `tfrec` CLI does); users may set it to "false".
_os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

__version__ = "0.1.0"
