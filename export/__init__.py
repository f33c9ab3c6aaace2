"""Export and serving: SavedModel signatures, retrieval indexes, the model server.

- `export.saved_model`: versioned TF Serving SavedModels of trained models
  (the servables of `tfrec.serving.servables`: `recommend`, `user_embedding`,
  `recommend_examples` on raw item tokens; the CTR `score`) and of retrieval
  indexes (`tfrec.serving.retrieval`: `BruteForceIndex`, `ScaNNIndex`).
- `export.stock_ops`: `assert_stock_ops` — does a SavedModel load on stock TF
  Serving (checked in a fresh process that never imports ScaNN)?

Importing this package imports nothing heavy (no TensorFlow, no ScaNN). It may
import `tfrec`, never `tfx_pipeline`.
"""
