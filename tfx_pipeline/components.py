"""Custom pipeline components (Python-function components).

- `AnomalyGate`: reads ExampleValidator's anomalies and fails the run when any
  split has one, naming split, feature and problem. Transform depends on it,
  so corrupted data stops the pipeline before anything is trained or pushed
  (ExampleValidator itself only records anomalies).
- `ItemSemanticsGen`: item text -> a versioned semantic store
  (`tfrec.semantics.encode.encode_items`), aligned with the Transform
  vocabulary (ids = line + 2, tfrec's layout). Named `...Gen` like TFX's
  generators, and so as not to clash with `tfrec.ctr.ItemSemantics`
  (the semantics a CTR model trains on); in the pipeline its node id stays
  `ItemSemantics` (`ITEM_SEMANTICS_ID`), the name runs, caches and reports
  know it by.
- `SemanticIds`: residual-quantizer semantic IDs of the store's item vectors
  (`tfrec.semantics.sids.sids_from_store`).
- `SemanticTrainer`: the stock TFX Trainer (same executor, same `run_fn`
  contract) with two more, optional inputs, `semantic_store` and
  `semantic_ids`; their URIs reach `run_fn` as
  `fn_args.custom_config[SEMANTIC_STORE_KEY]` / `[SEMANTIC_IDS_KEY]` (the DMESR
  item encoder reads the store; R2LED reads the store and the codes, see
  `tfx_pipeline.trainer`).

The semantic components import tfrec.semantics lazily inside the function, so
this module imports without them; the pipeline adds them only when
`pipeline.item_semantics` / `pipeline.semantic_ids` are set.
"""

import dataclasses
import json
import os
import tempfile

from tfx import v1 as tfx
from tfx.components.trainer import executor as trainer_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.proto import trainer_pb2
from tfx.types import Channel, artifact_utils, standard_artifacts, standard_component_specs
from tfx.types.artifact import Artifact
from tfx.types.component_spec import ChannelParameter
from tfx.utils import json_utils

InputArtifact = tfx.dsl.components.InputArtifact
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter
ANOMALIES_FILE = "SchemaDiff.pb"
SEMANTIC_STORE_KEY = "semantic_store"
SEMANTIC_IDS_KEY = "semantic_ids"


class SemanticStoreArtifact(Artifact):
    """A versioned `tfrec.semantics.store` folder (`v<N>/`, `LATEST`)."""

    TYPE_NAME = "tfrec.SemanticStore"


class SemanticIdsArtifact(Artifact):
    """A `tfrec.semantics.sids` folder (`sids.npy`, codebooks, metadata)."""

    TYPE_NAME = "tfrec.SemanticIds"


class DataAnomaliesError(ValueError):
    """ExampleValidator found anomalies; the message lists them."""


def describe_anomalies(anomalies_artifact):
    """`["split 'train': feature 'x': <problem>", ...]` for an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    problems = []
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies_artifact], split), ANOMALIES_FILE)
        with tfx.dsl.io.fileio.open(path, "rb") as f:
            anomalies = anomalies_pb2.Anomalies.FromString(f.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            reasons = "; ".join(r.description or r.short_description for r in info.reason)
            if info.short_description and not reasons.startswith(info.short_description):
                reasons = f"{info.short_description}: {reasons}" if reasons else info.short_description
            problems.append(f"split {split!r}: feature {feature!r}: {reasons}")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            problems.append(f"split {split!r}: dataset: {info.short_description} ({info.description})")
    return problems


@tfx.dsl.components.component
def AnomalyGate(anomalies: InputArtifact[standard_artifacts.ExampleAnomalies]) -> None:
    """Fail the run when ExampleValidator found any anomaly (see the module doc)."""
    problems = describe_anomalies(anomalies)
    if problems:
        raise DataAnomaliesError(
            "ExampleValidator found anomalies in the input data, nothing is trained or pushed: "
            + " | ".join(problems)
        )


# Pipeline node id of ItemSemanticsGen (unchanged by the rename: MLMD, caching, reports).
ITEM_SEMANTICS_ID = "ItemSemantics"


@tfx.dsl.components.component
def ItemSemanticsGen(
    transform_graph: InputArtifact[standard_artifacts.TransformGraph],
    semantic_store: OutputArtifact[SemanticStoreArtifact],
    dataset: Parameter[str] = "",
    items_path: Parameter[str] = "",
    max_tokens: Parameter[int] = 32,
    data_root: Parameter[str] = "",
) -> None:
    """Encode the item texts of the Transform vocabulary into a semantic store.

    `dataset` names a bundled dataset whose item table is read (under `data_root`
    when set); `items_path` an item table file instead."""
    import tensorflow_transform as tft

    from tfrec.data.vocab import Vocabulary
    from tfrec.semantics.encode import encode_items
    from tfx_pipeline.preprocessing import ITEM_VOCAB

    vocab_file = tft.TFTransformOutput(transform_graph.uri).vocabulary_file_by_name(ITEM_VOCAB)
    with tempfile.TemporaryDirectory() as prepared:  # encode_items reads <dir>/item_vocab.txt
        Vocabulary.load(vocab_file).save(os.path.join(prepared, "item_vocab.txt"))
        encode_items(prepared, items_path or None, semantic_store.uri, dataset=dataset or None, max_tokens=max_tokens,
                     data_root=data_root or None)


@tfx.dsl.components.component
def SemanticIds(
    semantic_store: InputArtifact[SemanticStoreArtifact],
    semantic_ids: OutputArtifact[SemanticIdsArtifact],
    config: Parameter[str] = "{}",
) -> None:
    """Fit semantic IDs on a pooled view of the semantic store.

    `config`: a `tfrec.semantics.sids.SidsConfig` as a JSON mapping (keys as the
    `sids:` config section, checked the same way; `{}` = the defaults; its
    `store_path` is not used: the store is the `semantic_store` input); build it
    with `sids_config_parameter`.
    """
    from tfrec.config import build_config
    from tfrec.semantics.sids import SidsConfig, sids_from_store

    sids = build_config(SidsConfig, json.loads(config), "sids.").check("sids.")
    sids_from_store(semantic_store.uri, semantic_ids.uri, view=sids.view, config=sids)


def sids_config_parameter(config) -> str:
    """The `SemanticIds` component's `config` parameter for a `SidsConfig` (JSON, without `store_path`).

    >>> from tfrec.semantics.sids import SidsConfig
    >>> json.loads(sids_config_parameter(SidsConfig(num_levels=2, codebook_size=8)))["codebook_size"]
    [8]
    """
    values = dataclasses.asdict(config)
    values.pop("store_path")
    return json.dumps(values, sort_keys=True)


class SemanticTrainerSpec(standard_component_specs.TrainerSpec):
    """`TrainerSpec` plus optional `semantic_store` and `semantic_ids` inputs."""

    INPUTS = {
        **standard_component_specs.TrainerSpec.INPUTS,
        SEMANTIC_STORE_KEY: ChannelParameter(type=SemanticStoreArtifact, optional=True),
        SEMANTIC_IDS_KEY: ChannelParameter(type=SemanticIdsArtifact, optional=True),
    }


class SemanticTrainerExecutor(trainer_executor.GenericExecutor):
    """The Trainer's `GenericExecutor`; adds the semantic store / IDs URIs to `fn_args.custom_config`."""

    def _GetFnArgs(self, input_dict, output_dict, exec_properties):
        fn_args = super()._GetFnArgs(input_dict, output_dict, exec_properties)
        for key in (SEMANTIC_STORE_KEY, SEMANTIC_IDS_KEY):
            artifacts = input_dict.get(key)
            if artifacts:
                fn_args.custom_config = {**(fn_args.custom_config or {}), key: artifact_utils.get_single_uri(artifacts)}
        return fn_args


class SemanticTrainer(base_component.BaseComponent):
    """The TFX Trainer with optional `semantic_store` (`ItemSemanticsGen`) and `semantic_ids` (`SemanticIds`) inputs.

    Same outputs (`model`, `model_run`) and `run_fn` contract as
    `tfx.components.Trainer`; with `semantic_store` wired, `run_fn` finds the
    store's URI at `fn_args.custom_config[SEMANTIC_STORE_KEY]`. Its node id is
    `Trainer` unless set with `with_id`.

    Example (the upstream outputs as bare channels; `tfx_pipeline.pipeline.create_pipeline`
    wires the real ones and `tests/test_tfx_pipeline.py` runs it):
    >>> trainer = SemanticTrainer(
    ...     examples=Channel(type=standard_artifacts.Examples),
    ...     transform_graph=Channel(type=standard_artifacts.TransformGraph),
    ...     run_fn="tfx_pipeline.trainer.run_fn", custom_config={"task": "sequential"},
    ...     semantic_store=Channel(type=SemanticStoreArtifact))
    >>> trainer.id, sorted(trainer.inputs), sorted(trainer.outputs)
    ('Trainer', ['examples', 'semantic_store', 'transform_graph'], ['model', 'model_run'])
    """

    SPEC_CLASS = SemanticTrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(SemanticTrainerExecutor)

    def __init__(self, examples, transform_graph, run_fn, train_args=None, eval_args=None, custom_config=None,
                 semantic_store=None, semantic_ids=None):
        spec = SemanticTrainerSpec(
            examples=examples,
            transform_graph=transform_graph,
            semantic_store=semantic_store,
            semantic_ids=semantic_ids,
            train_args=train_args or trainer_pb2.TrainArgs(),
            eval_args=eval_args or trainer_pb2.EvalArgs(),
            run_fn=run_fn,
            custom_config=json_utils.dumps(custom_config),
            model=Channel(type=standard_artifacts.Model),
            model_run=Channel(type=standard_artifacts.ModelRun),
        )
        super().__init__(spec=spec)
        self.with_id("Trainer")
