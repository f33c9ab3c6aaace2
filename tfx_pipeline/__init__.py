"""TFX pipeline for tfrec next-item models (ExampleGen -> ... -> Pusher).

Modules (importing this package imports nothing heavy):

- `config`: `PipelineConfig` = an `ExperimentConfig` (or a `CTRConfig` with
  `task: ctr`) + the `pipeline:` section.
- `data`: the ExampleGen input (leave-one-out pairs, or lifelong CTR samples, as `tf.Example`s).
- `schema/schema.pbtxt`, `schema/ctr_schema.pbtxt`: the curated schemas (ImportSchemaGen).
- `preprocessing`: Transform's `preprocessing_fn` (tft item vocabulary).
- `trainer`: the Trainer's `run_fn` (tfrec model, `model.fit`).
- `serving`: the Trainer's sequential SavedModel (`tfrec.serving.servables.SequentialServable`
  over the Transform's vocabulary, plus TFMA's `evaluate`).
- `tfma_metrics`: NDCG/HR/MRR@K for the Evaluator.
- `components`: custom components (AnomalyGate, ItemSemanticsGen, SemanticIds).
- `pipeline`: `create_pipeline(config)`.
- `runner`: `run_pipeline` (LocalDagRunner + report), `compile_pipeline` (Kubeflow/Vertex).
- `commands`: `tfrec pipeline run|compile`.

It may import `tfrec`, never `export`: the servables (the CTR Trainer's
`CTRServable` too) come from `tfrec.serving`. See `tfx_pipeline/README.md`.
"""
