"""Process set-up for entry points; runs before TensorFlow is imported.

TensorFlow reads some settings once, when it is imported or when `tf.keras` is
first touched, so an entry point (the `tfrec` CLI, the tests' conftest) calls
`configure()` before anything imports TensorFlow:

- `TF_USE_LEGACY_KERAS=1`: `tf.keras` is tf_keras, which TensorFlow
  Recommenders (the retrieval indexes of `tfrec.serving.retrieval`) and TFT need;
  `import keras` stays Keras 3, which all of our models use.
- Quiet start-up (unless `verbose`): TensorFlow's C++ log lines printed while
  it loads on a CPU-only machine (cuFFT/cuDNN/cuBLAS "Unable to register
  factory" errors, the oneDNN and CPU-feature notices, "Could not find
  TensorRT") are hidden with `TF_CPP_MIN_LOG_LEVEL=3` — they are printed before
  Python logging exists, so only this variable reaches them; TensorFlow errors
  still reach the user as Python exceptions. Known-noise Python warnings
  (`NOISE_WARNINGS`, by category and module) are ignored; every other warning
  is shown. `verbose=True` leaves TensorFlow's defaults and all warnings alone.

Variables already set in the environment are never overridden.

Example:
>>> import os
>>> configure(verbose=False)
>>> os.environ["TF_USE_LEGACY_KERAS"], os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3")
('1', True)
"""

import os
import warnings

# (category, module regex): warnings that say nothing about tfrec or the user's input.
NOISE_WARNINGS = (
    # "You are using a Python version (3.11.x) which Google will stop supporting ..."
    (FutureWarning, r"google\.api_core\._python_version_support"),
)


def configure(verbose=False):
    """Set the process-wide TensorFlow environment; call before importing TensorFlow.

    Args:
        verbose: bool. False = hide TensorFlow's start-up log lines and the
            known-noise warnings; True = TensorFlow's own defaults.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
