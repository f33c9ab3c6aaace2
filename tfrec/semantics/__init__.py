"""Item semantics as artifacts: text encoder, MLLM enrichment, semantic store, semantic IDs.

Run once (Beam), read by models as frozen tables. See the modules:
`text_encoder` (MiniLM via keras-hub), `store` (versioned on-disk store),
`encode` (Beam encoding job, `tfrec encode`), `enrich` (MLLM enrichment,
`tfrec enrich`), `sids` (semantic IDs from a residual quantizer, `tfrec sids`).
"""
