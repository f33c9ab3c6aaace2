"""CTR evaluation: AUC / GAUC / LogLoss per split, next to the item-popularity reference."""

from __future__ import annotations

from tfrec.ctr.config import CTRConfig
from tfrec.ctr.data import load_ctr_data


class CTREvaluator:
    """`evaluate(model)` -> `{"auc", "gauc", "logloss"}` on one split (GAUC by user),
    for `BestEpochTracker(..., protocol=None)` and the final evaluation."""

    def __init__(self, data, split, batch_size=512, max_history=1024):
        from tfrec.data.lifelong import lifelong_dataset, sorted_by_history_length

        # sorted by history length, each batch trimmed to its longest history (same metrics, less padding)
        self.samples, _ = sorted_by_history_length(data.splits[split])
        self.dataset = lifelong_dataset(data, self.samples, batch_size=batch_size, max_history=max_history)

    def evaluate(self, model):
        from tfrec.models.ctr_baselines import evaluate_ctr

        result = evaluate_ctr(model, self.dataset, groups=self.samples.user)
        return {k: result[k] for k in ("auc", "gauc", "logloss")}


def popularity_metrics(data, split) -> dict:
    """AUC / GAUC / LogLoss of the item-popularity reference (training click rate of the target)."""
    from tfrec.metrics import auc, gauc, logloss

    samples = data.splits[split]
    predictions = data.item_click_prior()[samples.target_id]
    return {"auc": auc(samples.label, predictions), "gauc": gauc(samples.label, predictions, samples.user),
            "logloss": logloss(samples.label, predictions)}


def evaluated_splits(data) -> tuple:
    """The evaluation splits `data` has samples in (`valid`, `test`; the TFX Trainer has no test)."""
    return tuple(s for s in ("valid", "test") if s in data.splits and len(data.splits[s]))


def evaluate_ctr_splits(config: CTRConfig, model, data) -> dict:
    return {split: CTREvaluator(data, split, config.train.eval_batch_size, config.model.max_history).evaluate(model)
            for split in evaluated_splits(data)}


def evaluate_saved_ctr(config: CTRConfig, model, data=None) -> dict:
    """Validation and test metrics of a saved model on the data `config` names."""
    data = data if data is not None else load_ctr_data(config.data)
    if model.vocab_size != data.item_vocab.size:
        raise ValueError(f"model has {model.vocab_size} item ids but the configured data has "
                         f"{data.item_vocab.size}: was it trained with other data settings?")
    return {"config": config.to_dict(), "data": data.metadata, "splits": evaluate_ctr_splits(config, model, data),
            "reference": {"popularity": {s: popularity_metrics(data, s) for s in ("valid", "test")}}}


def format_ctr_results(results) -> str:
    from tfrec.metrics import format_metrics_table

    rows = [{"split": split, "model": results["config"]["model"]["name"], **metrics}
            for split, metrics in results["splits"].items()]
    rows += [{"split": split, "model": "popularity", **metrics}
             for split, metrics in results["reference"]["popularity"].items()]
    return format_metrics_table(rows)
