"""tfrec: production recommenders in TensorFlow / Keras 3.

Sub-packages (imports point downwards only; `tfrec` never imports `tfx` or `export`):

- `tfrec.data`: readers, vocabularies, k-core filtering, leave-one-out splits,
  Apache Beam preprocessing, `tf.data` input pipelines.
- `tfrec.layers`: Keras 3 layers (sequential backbones and their parts).
- `tfrec.models`: Keras models composed from layers (next-item task).
- `tfrec.metrics`: ranking and CTR metrics.
- `tfrec.cli`: the `tfrec` command.
"""

__version__ = "0.1.0"
