"""Does a SavedModel run on stock TF Serving? Check its ops in a clean process.

Stock TF Serving registers the ops of core TensorFlow and nothing else: a
SavedModel holding custom ops (ScaNN's `Scann>...`, tensorflow-text's ops) or
Python-only ops (`PyFunc`, `EagerPyFunc`) fails to load there. The check reads
every op type of the SavedModel's graphs, including the function library
(function calls are not ops), and looks each one up in the op registry of a
**fresh Python process that imports only TensorFlow** — never `scann` or
`tensorflow_text`, which would register their ops — then, by default, loads
the SavedModel in that process as a server without plug-ins would.

Example: a SavedModel of core ops passes; one calling back into Python does not.
Each call spawns a fresh Python process that imports TensorFlow (a few seconds;
`tests/test_export.py` and `tests/test_retrieval_servable.py` check real servables).
>>> import tempfile
>>> import tensorflow as tf
>>> spec = tf.TensorSpec([None], tf.float32)
>>> plus = tf.Module()
>>> plus.f = tf.function(lambda x: {"y": x + 1.0}, input_signature=[spec])
>>> python = tf.Module()
>>> python.f = tf.function(lambda x: {"y": tf.py_function(lambda v: v + 1.0, [x], tf.float32)},
...                        input_signature=[spec])
>>> root = tempfile.mkdtemp()
>>> tf.saved_model.save(plus, f"{root}/plus/1", signatures=plus.f)
>>> tf.saved_model.save(python, f"{root}/python/1", signatures=python.f)
>>> "AddV2" in assert_stock_ops(f"{root}/plus/1")[f"{root}/plus/1"]
True
>>> non_stock_ops(f"{root}/python/1")
['EagerPyFunc']
"""

import json
import os
import subprocess
import sys
from pathlib import Path

# Registered by core TensorFlow but executable only inside a Python runtime.
PYTHON_ONLY_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
# Packages that register extra ops on import; the checking process must not load them.
OP_PLUGIN_MODULES = ("scann", "tensorflow_text")
_MARKER = "TFREC_STOCK_OPS_RESULT:"


class NonStockOpsError(ValueError):
    """Some SavedModels hold ops that stock TF Serving does not have.

    Attributes:
        offenders: `{dir: {"non_stock": [op types], "load_error": str or None}}`
            for each failing directory (passing ones are absent).
    """

    def __init__(self, offenders):
        self.offenders = dict(offenders)
        parts = []
        for saved_model_dir, found in self.offenders.items():
            detail = f"non-stock ops {found['non_stock']}" if found["non_stock"] else "no unknown op types"
            if found["load_error"]:
                detail += f"; loading without op plug-ins failed: {found['load_error'].splitlines()[0][:300]}"
            parts.append(f"{saved_model_dir}: {detail}")
        super().__init__("not servable by stock TF Serving: " + " | ".join(parts))


def _check_dir(saved_model_dir):
    path = Path(saved_model_dir)
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise FileNotFoundError(f"no saved_model.pb in {path} (expected a SavedModel version directory)")
    return str(path.resolve())


def inspect_saved_models(saved_model_dirs, load=True, timeout=600):
    """Op types of SavedModels, checked in one fresh TensorFlow-only process.

    Args:
        saved_model_dirs: iterable of SavedModel directories (with `saved_model.pb`).
        load: also `tf.saved_model.load` each one in that process.
        timeout: seconds before the check process is killed.

    Returns:
        `{dir: {"ops": [op types], "non_stock": [op types], "load_error": str or None}}`
        keyed by the directories as given.
    """
    given = list(saved_model_dirs)
    resolved = [_check_dir(d) for d in given]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "export.stock_ops", json.dumps({"dirs": resolved, "load": bool(load)})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"stock-op check of {given} did not finish in {timeout} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"stock-op check process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(lines[-1][len(_MARKER):])
    if report["plugins_loaded"]:
        raise RuntimeError(f"the check process imported op plug-ins {report['plugins_loaded']}; the check is void")
    return {d: report["results"][r] for d, r in zip(given, resolved)}


def non_stock_ops(saved_model_dir):
    """Sorted op types of the SavedModel that core TensorFlow does not register (or Python-only ops)."""
    return inspect_saved_models([saved_model_dir], load=False)[saved_model_dir]["non_stock"]


def assert_stock_ops(*saved_model_dirs, load=True):
    """Raise `NonStockOpsError` unless stock TF Serving could run every SavedModel.

    All directories are checked in one fresh process.

    Args:
        *saved_model_dirs: SavedModel directories.
        load: also require that each loads in a process without op plug-ins.

    Returns:
        `{dir: sorted op types}` (all stock).
    """
    if not saved_model_dirs:
        raise ValueError("assert_stock_ops needs at least one SavedModel directory")
    results = inspect_saved_models(saved_model_dirs, load=load)
    offenders = {
        d: {"non_stock": r["non_stock"], "load_error": r["load_error"]}
        for d, r in results.items()
        if r["non_stock"] or r["load_error"]
    }
    if offenders:
        raise NonStockOpsError(offenders)
    return {d: r["ops"] for d, r in results.items()}


# --- runs inside the fresh process (`python -m export.stock_ops '{...}'`) ---------
def _graph_op_types(saved_model_dir):
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    binary = Path(saved_model_dir) / "saved_model.pb"
    if binary.is_file():
        saved_model.ParseFromString(binary.read_bytes())
    else:
        text_format.Parse((Path(saved_model_dir) / "saved_model.pbtxt").read_text(), saved_model)
    ops, functions = set(), set()
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        ops.update(node.op for node in graph.node)
        for function in graph.library.function:
            functions.add(function.signature.name)
            ops.update(node.op for node in function.node_def)
    return sorted(ops - functions)  # a node whose "op" is a library function is a call


def _inspect_here(dirs, load):
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    results = {}
    for saved_model_dir in dirs:
        ops = _graph_op_types(saved_model_dir)
        non_stock = [op for op in ops if op in PYTHON_ONLY_OPS or op_def_registry.get(op) is None]
        load_error = None
        if load:
            try:
                tf.saved_model.load(saved_model_dir)
            except Exception as err:  # any failure means a stock server fails too
                load_error = f"{type(err).__name__}: {err}"[:4000]
        results[saved_model_dir] = {"ops": ops, "non_stock": non_stock, "load_error": load_error}
    plugins = [name for name in OP_PLUGIN_MODULES if name in sys.modules]
    return {"results": results, "plugins_loaded": plugins}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(_MARKER + json.dumps(_inspect_here(request["dirs"], request["load"])), flush=True)
