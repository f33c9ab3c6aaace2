"""Root pytest configuration: doctest collection for `scripts/test.sh`.

`scripts/test.sh` runs `pytest tests tfrec export tfx_pipeline --doctest-modules`,
so every docstring example in the library, the export layer and the TFX
pipeline runs as a doctest beside the unit tests. No module is excluded for
heavy or side-effect imports: all of them import in a few seconds without
touching data, the network or the GPU. (`benchmarks/` is not collected: its
scripts are run, not imported, and the directory would shadow packages such
as `scann` if pytest put it on `sys.path`.)
"""

from pathlib import Path

import pytest

# TEMPORARY (issue 23, phase A): files whose doctests are being fixed by the
# engineers rewriting them (CTR and DMESR issues). Their doctest items are
# skipped so the suite passes meanwhile; the lead empties this list at merge.
# This is the ONE place where doctests are excluded.
DOCTESTS_PENDING = (
    "tfrec/layers/bilevel_fusion.py",
    "tfrec/layers/multi_route_retrieval.py",
    "tfrec/layers/target_attention.py",
)


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parent
    pending = {root / p for p in DOCTESTS_PENDING}
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.path in pending:
            item.add_marker(
                pytest.mark.skip(reason="doctest pending (conftest.DOCTESTS_PENDING, issue 23)")
            )
