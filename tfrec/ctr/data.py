"""CTR data: the lifelong samples a `CTRDataConfig` names, optionally a random subset of users."""

from __future__ import annotations

import dataclasses

import numpy as np

from tfrec.ctr.config import CTRDataConfig


def subsample_users(data, max_train_samples: int, seed: int = 0):
    """`data` restricted to random users whose training samples total <= `max_train_samples`
    (at least one user); every split keeps only those users' samples."""
    from tfrec.data.lifelong import LifelongSamples

    counts = np.bincount(data.splits["train"].user, minlength=len(data.users))
    order = np.random.default_rng(seed).permutation(len(data.users))
    within = np.cumsum(counts[order]) <= max_train_samples
    within[0] = True
    keep = np.zeros(len(data.users), bool)
    keep[order[within]] = True
    splits = {}
    for name, samples in data.splits.items():
        rows = keep[samples.user]
        splits[name] = LifelongSamples(**{f.name: getattr(samples, f.name)[rows]
                                          for f in dataclasses.fields(LifelongSamples)})
    metadata = {**data.metadata, "num_samples": {n: int(len(s)) for n, s in splits.items()},
                "subsample": {"max_train_samples": int(max_train_samples), "seed": int(seed),
                              "users_kept": int(keep.sum())}}
    return dataclasses.replace(data, splits=splits, metadata=metadata)


def load_ctr_data(data_config: CTRDataConfig):
    """The `LifelongData` a `CTRDataConfig` names."""
    from tfrec.data.lifelong import load_lifelong_dataset, load_lifelong_files

    dc = data_config
    labels = {} if dc.click_threshold is None else {"click_threshold": float(dc.click_threshold)}
    fields = None if dc.user_fields is None else tuple(dc.user_fields)
    split = dict(valid_fraction=dc.valid_fraction, test_fraction=dc.test_fraction, vocabulary=dc.vocabulary,
                 min_history=dc.min_history)
    if dc.interactions_path:
        data = load_lifelong_files(dc.interactions_path, dc.items_path, dc.users_path, fields, **labels, **split)
    elif dc.items_path or dc.users_path:
        raise ValueError("config keys data.items_path / data.users_path go with data.interactions_path "
                         f"(your own data); the bundled dataset {dc.dataset!r} brings its own side files")
    else:
        data = load_lifelong_dataset(dc.dataset, dc.data_root, user_fields=fields, **split, **labels)
    if dc.max_train_samples is not None:
        data = subsample_users(data, dc.max_train_samples, dc.subsample_seed)
    return data
