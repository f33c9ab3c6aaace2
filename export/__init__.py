"""Export and serving: SavedModel signatures, ScaNN indexes, the model server.

Not built yet: this package is reserved by the project layout and is filled by
the export/serving issue. It may import `tfrec`, never `tfx_pipeline`.
"""
