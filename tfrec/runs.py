"""What a run directory records: `results.json` (`tfrec train`, `tfrec ctr train`), `evaluation.json` (`evaluate`).

Example:
>>> import json, tempfile
>>> from pathlib import Path
>>> run = Path(tempfile.mkdtemp())
>>> _ = (run / "results.json").write_text(json.dumps({"data": {"fingerprint": "abc"}}))
>>> recorded_data_fingerprint(run)
'abc'
"""

import json
from pathlib import Path


def recorded_data_fingerprint(run_dir):
    """The training data fingerprint a run recorded (`results.json`, else `evaluation.json`), or None."""
    for name in ("results.json", "evaluation.json"):
        path = Path(run_dir) / name
        fingerprint = json.loads(path.read_text()).get("data", {}).get("fingerprint") if path.is_file() else None
        if fingerprint is not None:
            return fingerprint
    return None
