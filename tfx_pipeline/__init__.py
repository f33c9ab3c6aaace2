"""TFX pipeline for tfrec models (ExampleGen -> ... -> Pusher).

Not built yet: this package is reserved by the project layout and is filled by
the TFX pipeline issue. It may import `tfrec`, never `export`.
"""
