"""Lifelong CTR models (R2LED and its baselines): config, data, item semantics, models, training, evaluation.

The package has the sequential side's shape, one module per concern:
`tfrec.ctr.config` (`CTRConfig` and its sections, `load_ctr_config`),
`tfrec.ctr.data` (`load_ctr_data`), `tfrec.ctr.semantics` (`ItemSemantics`,
`prepare_item_semantics`), `tfrec.ctr.models` (`build_ctr_model`),
`tfrec.ctr.training` (`train_ctr`, `fit_reference`), `tfrec.ctr.evaluation`
(`CTREvaluator`, `evaluate_saved_ctr`) and `tfrec.ctr.new_items` (`RankerRun`,
`extend_ctr_model`: new items in a trained ranker's tables without retraining); the
public names are importable from `tfrec.ctr` itself.

`train_ctr(config)` is what `tfrec ctr train` runs:

1. lifelong CTR samples (`tfrec.data.lifelong`: rating >= 4 = click, global time
   split, item vocabulary from training events), optionally restricted to a random
   subset of users (`data.max_train_samples`, for quick runs);
2. item semantics (`prepare_item_semantics`): the semantic store whose rows follow
   that item vocabulary (`sids.store_path`; written by `tfrec ctr encode`: MiniLM
   over "Title (Year). Genres: A, B"), semantic IDs fitted on its pooled `view`
   (RQ-KMeans or RQ-VAE, `tfrec.semantics.sids.fit_sids`), and the pooled vectors
   (SIM-soft's frozen semantic table);
3. the model `model.name` names: `r2led` or an ablation of `R2LED_VARIANTS`, or a
   baseline of `CTR_BASELINES` (`din`, `sim-hard`, `sim-soft`, `eta`, `twin`, `full`),
   each with the wide part and feedback-carrying behaviours (`tfrec.models.ctr_wide`);
   or a reference (`popularity`, `logreg`: `fit_reference`, what `tfrec ctr train`
   runs for them: the logistic regression is scikit-learn's, fitted on training samples);
4. `model.fit` with log loss; after every epoch (one pass over the training
   samples, or `train.steps_per_epoch` batches) the validation AUC is computed and
   the best weights kept (the engine `tfrec.training.engine.fit`); training stops
   after `patience` epochs without a new best or once `max_train_seconds` are spent
   (checked after every batch), and the best weights are restored; a checkpoint
   after every epoch lets `train.resume` (`tfrec ctr train --resume`) continue;
5. validation and test AUC, GAUC (by user) and LogLoss (`evaluate_ctr`), next to
   the item-popularity reference (smoothed training click rate of the target);
6. the run directory gets `model.keras`, `item_vocab.txt`, `results.json` and the
   fitted SIDs (`sids/`).

Budget matching (ours): R2LED attends `top_k` behaviours per route; a baseline keeps
`baseline_top_k` behaviours, by default as many as R2LED attends in total
(routes x `top_k`), so both see the same number of behaviours. SIDs are fitted once
per run with `sids.seed` (not the training seed) and without the de-duplication
level by default: R2LED's routes use SID prefixes, an extra "which duplicate" level
would only add a route matching the target itself.

CLI: `tfrec ctr train --config configs/r2led_ml1m.yaml [key=value ...]`,
`tfrec ctr evaluate --config ... [--model run/model.keras]`, `tfrec ctr encode --config ...`,
`tfrec ctr export --config ... --out DIR [--version V] [--model run/model.keras]`
(the ranker SavedModel `<out>/ranker/<v>`, `export.saved_model.export_ctr`, reading
the most recent `model.max_history` items).
"""

from tfrec.ctr.config import (
    MONITORS,
    REFERENCES,
    WIDE_SIDE,
    CTRConfig,
    CTRDataConfig,
    CTRModelConfig,
    CTRTrainConfig,
    check_ctr_config,
    ctr_config_from_dict,
    ctr_sids_defaults,
    load_ctr_config,
    model_names,
)
from tfrec.ctr.data import load_ctr_data, subsample_users
from tfrec.ctr.evaluation import (
    CTREvaluator,
    evaluate_ctr_splits,
    evaluate_saved_ctr,
    evaluated_splits,
    format_ctr_results,
    popularity_metrics,
)
from tfrec.ctr.models import build_ctr_model, load_ctr_model, model_users, needs_semantics, wide_config
from tfrec.ctr.semantics import (
    STORE_COMMAND,
    ItemSemantics,
    encode_lifelong_store,
    item_semantics_of,
    load_store_for,
    prepare_item_semantics,
)
from tfrec.ctr.training import fit_reference, load_trained_ctr, train_ctr
from tfrec.ctr.new_items import INITS, NewItemRows, RankerRun, extend_ctr_model, initial_rows
