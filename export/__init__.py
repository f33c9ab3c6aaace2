"""Export and serving: SavedModel signatures, retrieval indexes, the model server.

- `export.saved_model`: versioned TF Serving SavedModels of trained models
  (`recommend`, `user_embedding`, `recommend_examples` on raw item tokens) and
  of retrieval indexes; `tfrec export`.
- `export.retrieval`: `BruteForceIndex` (stock ops) and `ScaNNIndex` over an
  item-embedding table, `build_indexes`, `recall_at_k`.
- `export.stock_ops`: `assert_stock_ops` — does a SavedModel load on stock TF
  Serving (checked in a fresh process that never imports ScaNN)?

Importing this package imports nothing heavy (no TensorFlow, no ScaNN). It may
import `tfrec`, never `tfx_pipeline`.
"""
