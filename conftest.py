"""Root pytest configuration: doctest collection for `scripts/test.sh`.

`scripts/test.sh` runs `pytest tests tfrec export tfx_pipeline tfrec_cli --doctest-modules`,
so every docstring example in the library, the export layer, the TFX
pipeline and the CLI runs as a doctest beside the unit tests. No module is excluded for
heavy or side-effect imports: all of them import in a few seconds without
touching data, the network or the GPU. (`benchmarks/` is not collected: its
scripts are run, not imported, and the directory would shadow packages
if pytest put it on `sys.path`; `tests/test_benchmark_doctests.py` runs its
examples, loading each module by path.)
"""
