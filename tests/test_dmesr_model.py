"""Tests for DMESR inside the next-item task (`tfrec.semantics.dmesr` + `NextItemRecommender`).

A DMESR item encoder built from small random tables (2 views, attributes, token
states) replaces `IdItemEncoder` in SASRec, BERT4Rec (cloze) and GRU4Rec with
no change to backbone or task code: `model.fit` lowers the loss, the
alignment loss reaches the task's total loss, scores survive save/load, and
the materialised table serves the same scores. Then the ablation switches, the
builder (PCA, token clusters, attribute renumbering, content-PCA ID init,
variants) and the semantic-store loader. Training runs eagerly (a handful of steps: tracing the
train step would cost more than running it), except where the behaviour under
test is the traced train step itself.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrec.config import _build
from tfrec.data.vocab import NUM_RESERVED, Vocabulary
from tfrec.layers import BERT4RecBackbone, GRU4RecBackbone, SASRecBackbone
from tfrec.layers.dmesr_encoder import DMESRItemEncoder
from tfrec.semantics.dmesr import (
    DMESR_VARIANTS,
    DMESRConfig,
    DMESRTables,
    build_dmesr_item_encoder,
    fit_pca,
    load_dmesr_tables,
    reduce_new_items,
    reduce_rows,
    token_clusters,
)
from tfrec.models.next_item import NextItemRecommender

VOCAB = 30
NUM_ITEMS = VOCAB - NUM_RESERVED
L = 6
DIM = 16
BACKBONES = {
    "sasrec": ("causal", lambda: SASRecBackbone(L, num_layers=1, num_heads=1, dropout=0.0)),
    "gru4rec": ("causal", lambda: GRU4RecBackbone(DIM, num_layers=1, dropout=0.0, input_norm=True)),
    "bert4rec": ("cloze", lambda: BERT4RecBackbone(L, num_layers=1, num_heads=1, dropout=0.0)),
}
SMALL = dict(token_pca_dim=6, max_tokens=4, token_clusters=2, dropout=0.0)


def np_(x):
    return keras.ops.convert_to_numpy(x)


def random_tables(seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(2, vocab, 12)).astype("float32")
    view_mask = rng.random((2, vocab)) < 0.8
    tokens = rng.normal(size=(vocab, 5, 10)).astype("float16")
    token_mask = np.arange(5)[None, :] < rng.integers(0, 6, vocab)[:, None]
    attributes = rng.choice([0, 7, 40, 41, 900], size=(vocab, 3))
    return DMESRTables(view_embeddings=views, view_mask=view_mask, view_names=("title", "generated"),
                       token_states=tokens, token_mask=token_mask, attribute_ids=attributes)


def cycle(start, n):
    return (np.arange(start, start + n) % NUM_ITEMS) + NUM_RESERVED


def make_model(name, seed=0, run_eagerly=True, **config):
    keras.utils.set_random_seed(seed)
    objective, backbone = BACKBONES[name]
    encoder = build_dmesr_item_encoder(DMESRConfig(**{**SMALL, **config}), random_tables(), VOCAB, DIM)
    model = NextItemRecommender(encoder, backbone(), max_length=L, objective=objective, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(0.02), jit_compile=False, run_eagerly=run_eagerly)
    return model


def training_data(model):
    """Causal: the cycle k -> k + 1. Cloze: rows ending in a mask token whose target is the next item."""
    if model.objective == "causal":
        seqs = np.stack([cycle(i, L + 1) for i in range(NUM_ITEMS)])
        return seqs[:, :-1], seqs[:, 1:]
    x = np.zeros((NUM_ITEMS, L), np.int32)
    y = np.zeros((NUM_ITEMS, L), np.int32)
    x[:, :3] = np.stack([cycle(i, 3) for i in range(NUM_ITEMS)])
    x[:, 3] = model.mask_token_id
    y[:, 3] = (x[:, 2] - NUM_RESERVED + 1) % NUM_ITEMS + NUM_RESERVED
    return x, y


@pytest.fixture(scope="module")
def trained():
    """{backbone: (model, loss history)} after a few full-softmax epochs of `model.fit`."""
    out = {}
    for name in BACKBONES:
        model = make_model(name)
        x, y = training_data(model)
        history = model.fit({"item_ids": x}, y, batch_size=NUM_ITEMS, epochs=10, verbose=0, shuffle=False)
        out[name] = (model, history.history["loss"])
    return out


# ------------------------------------------------------------------------- task integration
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fit_with_dmesr_encoder_lowers_loss(trained, name):
    model, losses = trained[name]
    assert isinstance(model.item_encoder, DMESRItemEncoder)
    assert np.all(np.isfinite(losses))
    # The cloze model sees items only through attention, which starts nearly uniform: slower.
    assert np.mean(losses[-2:]) < (0.95 if name == "bert4rec" else 0.6) * np.mean(losses[:2]), losses
    scores = np_(model.score_items(np.array([[2, 3, 4, 0], [9, 0, 0, 0]])))
    assert scores.shape == (2, VOCAB) and np.all(scores[:, :NUM_RESERVED] < -1e8)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_save_load_gives_identical_scores(trained, name, tmp_path):
    model, _ = trained[name]
    histories = np.array([[2, 3, 4, 0, 0], [7, 8, 9, 10, 11], [5, 0, 0, 0, 0]])
    want = np_(model.score_items(histories))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.item_encoder) is DMESRItemEncoder
    assert loaded.item_encoder.get_config() == model.item_encoder.get_config()
    np.testing.assert_array_equal(np_(loaded.item_encoder.token_table), np_(model.item_encoder.token_table))
    np.testing.assert_allclose(np_(loaded.score_items(histories)), want, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_materialized_table_serves_the_same_scores(trained, name):
    """Export path: a plain (vocab, dim) table + the user embedding reproduce `score_items`."""
    model, _ = trained[name]
    histories = np.array([[2, 3, 4, 0], [11, 12, 13, 14]])
    table = model.item_encoder.materialize(batch_size=7)
    assert table.shape == (VOCAB, DIM) and table.dtype == np.float32
    scores = np_(model.user_embedding(histories)) @ table.T
    np.testing.assert_allclose(scores[:, NUM_RESERVED:], np_(model.score_items(histories))[:, NUM_RESERVED:],
                               rtol=1e-4, atol=1e-4)


def test_cloze_mask_token_path(trained):
    """BERT4Rec: the mask id (== vocab_size) never reaches the encoder's tables; masked
    positions read the task's mask embedding."""
    model, _ = trained["bert4rec"]
    ids = np.array([[2, model.mask_token_id, 4, 0]])
    vectors = np_(model._embed(ids))
    np.testing.assert_allclose(vectors[0, 1], np_(model.mask_embedding), atol=1e-6)
    np.testing.assert_allclose(vectors[0, [0, 2]], np_(model.item_encoder(np.array([2, 4]))), atol=1e-6)
    assert np.all(np.isfinite(np_(model.score_items(np.array([[2, 3, 4, 5, 6, 7, 8]])))))


def test_alignment_loss_reaches_the_total_loss():
    """The task's loss = rec loss + lambda * alignment loss of the batch's distinct items, in
    `compute_loss` and in the loss `fit` reports (first step, before any update)."""
    model = make_model("sasrec", alignment_weight=2.0)
    x, y = training_data(model)
    alignment = float(model.item_encoder.alignment_loss(x))
    rec_only = float(model.compute_loss(x, y, model({"item_ids": x}, training=False)))  # no layer loss
    states = model({"item_ids": x}, training=True)  # dropout is 0: same states
    assert [float(v) for v in model.losses] == pytest.approx([2.0 * alignment], rel=1e-6)
    total = float(model.compute_loss(x, y, states))
    assert alignment > 0.1
    assert total == pytest.approx(rec_only + 2.0 * alignment, rel=1e-5)
    reported = model.fit({"item_ids": x}, y, batch_size=len(x), epochs=1, verbose=0).history["loss"][0]
    assert reported == pytest.approx(total, rel=1e-5)


def test_tables_survive_a_lazy_build_inside_fit():
    """An encoder first built while `fit` traces its train step (graph mode) still holds the
    given features (they are initial values, not assignments a trace could drop)."""
    keras.utils.set_random_seed(0)
    tables = random_tables()
    coarse = np.transpose(tables.view_embeddings, (1, 0, 2))
    features = {"coarse": coarse, "coarse_mask": tables.view_mask.T, "attributes": tables.attribute_ids}
    encoder = DMESRItemEncoder(VOCAB, DIM, config=DMESRConfig(align=False, combine="add"), features=features,
                               view_names=tables.view_names)
    assert not encoder.built
    model = NextItemRecommender(encoder, GRU4RecBackbone(DIM, dropout=0.0), max_length=L)
    model.compile(optimizer="adam", jit_compile=False)
    x, y = training_data(model)
    model.fit({"item_ids": x}, y, batch_size=len(x), epochs=1, verbose=0)
    mask = tables.view_mask.T.copy()
    mask[:NUM_RESERVED] = False
    np.testing.assert_array_equal(np_(encoder.coarse_mask_table) > 0, mask)
    stored = encoder._row_features({"coarse": coarse, "coarse_mask": tables.view_mask.T})["coarse"]  # normalised once
    np.testing.assert_allclose(np_(encoder.coarse_table)[NUM_RESERVED:], stored[NUM_RESERVED:], rtol=1e-6)
    assert np_(encoder.attribute_table).max() == 900


def test_ablation_switches_change_only_what_they_name():
    """Each variant differs from the full model only in its named part: same features elsewhere,
    same weights elsewhere (same seed), and the named part off."""
    tables = random_tables()

    def build(name):
        keras.utils.set_random_seed(0)
        return build_dmesr_item_encoder(DMESRConfig.variant(name, **SMALL), tables, VOCAB, DIM)

    full = build("dmesr")
    weights = {w.path: np_(w) for w in full.weights}
    named = {
        "dmesr-no-align": ("aligner",),
        "dmesr-no-fusion": ("fuser", "token_projection", "semantic_projection"),
        "dmesr-no-text-tokens": ("fuser", "tokens", "token_mask", "token_mean", "reduction_token",
                                 "semantic_projection", "groups", "aligner", "fused_coarse"),
        "dmesr-no-generated-view": ("coarse", "coarse_mask", "adapter", "groups", "aligner", "fuser",
                                    "semantic_projection", "fused_coarse"),
        "dmesr-no-semantic-init": ("id_encoder",),
    }
    expected_parts = {
        "dmesr-no-align": {"alignment"}, "dmesr-no-fusion": {"fusion"},
        "dmesr-no-text-tokens": {"fusion", "text_tokens"}, "dmesr-no-generated-view": {"generated"},
        "dmesr-no-semantic-init": set(),
    }
    for name, parts in named.items():
        variant = build(name)
        assert set(full.active_parts()) - set(variant.active_parts()) == expected_parts[name], name
        paths = {w.path for w in variant.weights}
        # Weights the variant lacks or adds belong to the named parts only.
        for path in paths.symmetric_difference(weights):
            assert any(p in path for p in parts), (name, path)
        for w in variant.non_trainable_weights:  # the frozen features outside the named parts are identical
            if w.path in weights and not any(p in w.path for p in parts):
                np.testing.assert_array_equal(np_(w), weights[w.path], err_msg=f"{name}: {w.path}")
    no_init = build("dmesr-no-semantic-init")
    assert not np.allclose(np_(no_init.id_encoder.all_items()), np_(full.id_encoder.all_items()))
    # The full model's ID table is the content PCA, at the ID initialiser's std.
    assert np_(full.id_encoder.all_items()).std() == pytest.approx(0.02, rel=0.1)
    assert np_(build("dmesr-no-align").id_encoder.all_items()) == pytest.approx(np_(full.id_encoder.all_items()))


# ------------------------------------------------------------------------- builder and config
def test_builder_reduces_tables_and_renumbers_attributes():
    tables = random_tables()
    encoder = build_dmesr_item_encoder(DMESRConfig(**SMALL), tables, VOCAB, DIM)
    config = encoder.get_config()
    assert config["shapes"] == {"coarse": [2, 12], "tokens": [2, 6], "attributes": [3], "num_attributes": 4}
    attributes = np_(encoder.attribute_table)  # {7, 40, 41, 900} -> 1..4
    assert set(np.unique(attributes)) <= {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(attributes[NUM_RESERVED:] > 0, tables.attribute_ids[NUM_RESERVED:] > 0)
    coarse_mask = np_(encoder.coarse_mask_table) > 0  # (vocab, views)
    assert not coarse_mask[:NUM_RESERVED].any()
    np.testing.assert_array_equal(coarse_mask[NUM_RESERVED:], tables.view_mask.T[NUM_RESERVED:])
    token_mask = np_(encoder.token_mask_table) > 0
    has_tokens = tables.token_mask[:, :4].any(axis=1)
    np.testing.assert_array_equal(token_mask[NUM_RESERVED:, 0], has_tokens[NUM_RESERVED:])
    assert np.all(np_(encoder.token_table)[~token_mask] == 0)
    groups = np_(encoder.group_table)
    assert groups.shape == (VOCAB, 3) and (groups[:, 2] > 0).sum() < VOCAB  # shared attribute sets share a group


def test_token_clusters_average_contiguous_real_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 5, 4)).astype("float16")
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    clusters, cmask = token_clusters(tokens, mask, 2)
    t = tokens.astype(np.float32)
    np.testing.assert_allclose(clusters[0], [t[0, :3].mean(0), t[0, 3:].mean(0)], atol=1e-6)
    np.testing.assert_allclose(clusters[1], [t[1, 0], t[1, 1]], atol=1e-6)
    assert cmask.tolist() == [[True, True], [True, True], [False, False]] and np.all(clusters[2] == 0)
    one, one_mask = token_clusters(tokens, mask, 5)  # more clusters than tokens: the rest masked
    assert one_mask[1].tolist() == [True, False, True, False, False]


def test_pca_is_deterministic_and_exact_on_low_rank_data():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 10)) + 5.0
    mean, components = fit_pca(rows, 3)
    np.testing.assert_allclose(components.T @ components, np.eye(3), atol=1e-5)
    reduced = reduce_rows(rows, np.ones(300, bool), 3)
    np.testing.assert_allclose(reduced @ components.T + mean, rows, atol=1e-3)  # rank 3: nothing lost
    np.testing.assert_array_equal(reduce_rows(rows, np.ones(300, bool), 3), reduced)
    masked = reduce_rows(rows, np.arange(300) % 2 == 0, 3)
    assert np.all(masked[1::2] == 0)


def test_variants_and_config_types():
    assert set(DMESR_VARIANTS) == {"dmesr", "dmesr-no-align", "dmesr-no-fusion", "dmesr-no-text-tokens",
                                   "dmesr-no-generated-view", "dmesr-no-semantic-init"}
    with pytest.raises(ValueError, match="unknown DMESR variant 'dmesr-x'"):
        DMESRConfig.variant("dmesr-x")
    # The dataclass loads through the project's YAML config machinery (as `dmesr:`).
    config = _build(DMESRConfig, {"align_pairs": ["title:attributes"], "view_pca_dim": None,
                                  "alignment_weight": 1, "combine": "add"}, "dmesr.")
    assert config.align_pairs == ("title:attributes",) and config.alignment_weight == 1.0
    encoder = build_dmesr_item_encoder(dataclasses.replace(config, **SMALL), random_tables(), VOCAB, DIM)
    assert encoder.aligner.pairs == [(0, 2)] and encoder.config.combine == "add"


@pytest.mark.parametrize("config, tables, match", [
    (dict(align_pairs=("title:image",)), {}, "align_pairs entry 'title:image'"),
    (dict(combine="mean"), {}, "dmesr.combine must be one of"),
    (dict(token_clusters=-1), {}, "token_clusters must be >= 0"),
    ({}, dict(attribute_ids=None), "use_attributes is true"),
    ({}, dict(view_embeddings=np.zeros((2, VOCAB + 3, 4))), "view_embeddings has 33 item rows, expected 30"),
    ({}, dict(view_names=("title",)), "must name each of the 2 views"),
    (dict(semantic_init_view="mllm_image"), {}, "semantic_init needs the pooled view 'mllm_image'"),
])
def test_builder_errors(config, tables, match):
    with pytest.raises(ValueError, match=match):
        build_dmesr_item_encoder(DMESRConfig(**{**SMALL, **config}), dataclasses.replace(random_tables(), **tables),
                                 VOCAB, DIM)


def test_builder_degrades_without_tokens():
    """Sports/Toys: only the generated text view (no tokens): fusion off, said by active_parts()."""
    tables = dataclasses.replace(random_tables(), token_states=None, token_mask=None)
    messages = []
    encoder = build_dmesr_item_encoder(DMESRConfig(**SMALL), tables, VOCAB, DIM, log=messages.append)
    assert "fusion" not in encoder.active_parts() and "text_tokens" not in encoder.active_parts()
    assert "generated text view" in messages[0] and "not MLLM" in messages[0]


# ------------------------------------------------------------------------- semantic store
def test_load_tables_from_semantic_store(tmp_path):
    from tfrec.semantics import store as store_mod
    vocab = Vocabulary([f"i{k}" for k in range(VOCAB - NUM_RESERVED)])
    t = random_tables()
    views = []
    for v, name in enumerate(("title", "generated")):
        mask = t.view_mask[v].copy()
        mask[:NUM_RESERVED] = False
        pooled = t.view_embeddings[v] * mask[:, None]
        tokens = token_mask = None
        if name == "title":  # the store keeps token states in the pooled dim (12)
            token_mask = t.token_mask.copy()
            token_mask[:NUM_RESERVED] = False
            tokens = np.pad(t.token_states, ((0, 0), (0, 0), (0, 2))) * token_mask[..., None]
            tokens = tokens.astype(np.float16)
        views.append(store_mod.SemanticView(name, pooled.astype(np.float32), mask, tokens, token_mask))
    attributes = (t.attribute_ids > 0).astype(np.int32) * 2
    store = store_mod.SemanticStore(vocab, views, attributes=attributes, attribute_vocab=Vocabulary(["a"]))
    path = store_mod.save_version(tmp_path / "store", store)

    tables = load_dmesr_tables(tmp_path / "store", DMESRConfig(), item_vocab=vocab)
    assert tables.view_names == ("title", "generated")
    assert tables.view_embeddings.shape == (2, VOCAB, 12) and tables.token_states.shape == (VOCAB, 5, 12)
    np.testing.assert_array_equal(tables.view_mask[1], views[1].mask)
    encoder = build_dmesr_item_encoder(DMESRConfig(**SMALL), tables, VOCAB, DIM)
    assert np_(encoder.all_items()).shape == (VOCAB, DIM)

    only_text = load_dmesr_tables(str(path), DMESRConfig(views=("generated",), use_tokens=False, use_attributes=False))
    assert only_text.view_names == ("generated",) and only_text.token_states is None and only_text.attribute_ids is None
    assert tables.store_version == str(path)
    no_generated = build_dmesr_item_encoder(DMESRConfig(**SMALL, use_generated_view=False), tables, VOCAB, DIM)
    assert no_generated.view_names == ("title",)
    with pytest.raises(KeyError, match="no view 'mllm_image'"):
        load_dmesr_tables(store, DMESRConfig(views=("mllm_image",)))
    assert load_dmesr_tables(store, DMESRConfig(token_view="generated")).token_states is None  # degrades
    with pytest.raises(store_mod.VocabularyMismatchError):
        load_dmesr_tables(store, DMESRConfig(), item_vocab=Vocabulary(["x", "y"]))
    with pytest.raises(FileNotFoundError):
        load_dmesr_tables(tmp_path / "nowhere", DMESRConfig())
    with pytest.raises(ValueError, match="dmesr.store_path"):
        load_dmesr_tables(None, DMESRConfig())


# ------------------------------------------------------------------------- train_sequential
def test_train_sequential_with_dmesr_item_encoder(tmp_path):
    """`model.item_encoder=dmesr` trains through `tfrec train`'s path, saves, reloads and scores alike."""
    from tfrec.config import load_config
    from tfrec.semantics import store as store_mod
    from tfrec.semantics.store import VocabularyMismatchError
    from tfrec.training import load_trained_model, prepare_split, train_sequential

    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(u + t) % 20}", t) for u in range(40) for t in range(int(rng.integers(5, 9)))]
    interactions = tmp_path / "interactions.tsv"
    interactions.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    overrides = [
        f"data.interactions_path={interactions}", f"output_dir={tmp_path / 'runs'}", "name=dmesr",
        "model.max_length=6", "model.embedding_dim=8", "model.num_layers=1", "model.num_heads=1",
        "train.epochs=2", "train.batch_size=8", "eval.protocols=[full]",
        "model.item_encoder=dmesr", "dmesr.token_pca_dim=6", "dmesr.max_tokens=4",
    ]
    with pytest.raises(ValueError, match="dmesr.store_path"):
        train_sequential(load_config(None, overrides), verbose=0, save=False)

    data, _ = prepare_split(load_config(None, overrides))
    size = data.item_vocab.size
    pooled = rng.normal(size=(size, 12)).astype(np.float32)
    mask = np.arange(size) >= NUM_RESERVED
    tokens = (rng.normal(size=(size, 5, 12)) * mask[:, None, None]).astype(np.float16)
    token_mask = np.broadcast_to(mask[:, None], (size, 5)).copy()
    view = store_mod.SemanticView("title", pooled * mask[:, None], mask, tokens, token_mask)
    mllm = rng.normal(size=(size, 12)).astype(np.float32) * mask[:, None]
    mllm_view = store_mod.SemanticView("generated", mllm, mask)  # a second view, so alignment has a pair
    store_mod.save_version(tmp_path / "store", store_mod.SemanticStore(data.item_vocab, [view, mllm_view]))
    config = load_config(None, overrides + [f"dmesr.store_path={tmp_path / 'store'}", "dmesr.use_attributes=false"])

    results, model, _ = train_sequential(config, verbose=0, save=True)
    assert isinstance(model.item_encoder, DMESRItemEncoder)
    assert results["config"]["model"]["item_encoder"] == "dmesr" and results["epochs"] == 2
    assert np.isfinite(results["loss_curve"]).all() and 0.0 <= results["splits"]["test"]["full"]["ndcg@10"] <= 1.0
    restored, _ = load_trained_model(config)
    history = np.array([[2, 3, 4, 0, 0, 0]])
    np.testing.assert_allclose(np_(restored.score_items(history)), np_(model.score_items(history)), atol=1e-5)

    other = Vocabulary([f"x{k}" for k in range(size - NUM_RESERVED)])
    store_mod.save_version(tmp_path / "other", store_mod.SemanticStore(other, [view, mllm_view]))
    with pytest.raises(VocabularyMismatchError):
        train_sequential(load_config(None, overrides + [f"dmesr.store_path={tmp_path / 'other'}",
                                                         "dmesr.use_attributes=false"]), verbose=0, save=False)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_item_table_copy_and_export_serve_the_model_scores(trained, name, tmp_path):
    """`with_item_table()` drops the semantic inputs but keeps every score; the exported
    SavedModel of a DMESR model answers like `score_items`."""
    import tensorflow as tf

    from export.saved_model import export_sequential
    from tfrec.data.vocab import Vocabulary

    model, _ = trained[name]
    copy = model.with_item_table()
    assert copy is not model and type(copy.item_encoder).__name__ == "IdItemEncoder"
    histories = np.array([[2, 3, 4, 0], [11, 12, 13, 14], [5, 0, 0, 0]])
    want = np_(model.score_items(histories))
    np.testing.assert_allclose(np_(copy.score_items(histories)), want, rtol=1e-4, atol=1e-4)
    vocab = Vocabulary([f"i{k}" for k in range(NUM_ITEMS)])
    path = export_sequential(model, vocab, tmp_path / "recommender", k=3)
    loaded = tf.saved_model.load(str(path))
    tokens = np.array([[f"i{k - NUM_RESERVED}" if k else "" for k in row] for row in histories])
    out = loaded.signatures["recommend"](history=tf.constant(tokens), exclude_history=tf.constant([False] * 3))
    top = np.argsort(-want[:, NUM_RESERVED:], axis=1, kind="stable")[:, :3]
    got = np.array([[int(t.decode()[1:]) for t in row] for row in out["item_ids"].numpy()])
    np.testing.assert_array_equal(got, top)
    # The semantic tables (token states) stay out of the SavedModel: only the (vocab, dim) table.
    shapes = [tuple(shape) for _, shape in tf.train.list_variables(str(path / "variables" / "variables"))]
    assert (VOCAB, DIM) in shapes and tuple(model.item_encoder.coarse_table.shape) not in shapes


def test_new_items_reduced_with_the_saved_reductions_get_their_table_rows(tmp_path):
    """Issue 22's new items without retraining: raw store rows, reduced with the PCA, token
    clusters and attribute map fitted at build time (kept in the saved encoder), then
    `encode_features`, give an existing item exactly its materialised semantic part."""
    keras.utils.set_random_seed(0)
    tables = random_tables()
    encoder = build_dmesr_item_encoder(DMESRConfig(**SMALL, view_pca_dim=8, combine="add"), tables, VOCAB, DIM)
    assert sorted(encoder.reductions) == ["attribute_ids", "token_components", "token_mean", "view_components",
                                          "view_mean"]
    path = tmp_path / "enc.keras"
    ids = np.array([[2, 3, 4]])
    model = keras.Sequential([keras.Input((3,), dtype="int32"), encoder])
    model.save(path)
    loaded = next(layer for layer in keras.saving.load_model(path).layers if isinstance(layer, DMESRItemEncoder))
    np.testing.assert_allclose(np_(loaded(ids)), np_(encoder(ids)), atol=1e-5)
    rows = np.arange(NUM_RESERVED, VOCAB)
    raw = DMESRTables(view_embeddings=tables.view_embeddings[::-1, rows], view_mask=tables.view_mask[::-1, rows],
                      view_names=tables.view_names[::-1],  # another order: matched by name
                      token_states=tables.token_states[rows], token_mask=tables.token_mask[rows],
                      attribute_ids=tables.attribute_ids[rows])
    for enc in (encoder, loaded):
        got = enc.encode_features(reduce_new_items(enc, raw))
        np.testing.assert_allclose(got, enc.materialize()[rows] - np_(enc.id_encoder(rows)), atol=1e-5)
    # An attribute id unseen at build time is dropped (no trained embedding); other views required.
    unseen = dataclasses.replace(raw, attribute_ids=np.where(raw.attribute_ids == 40, 12345, raw.attribute_ids))
    mapped = reduce_new_items(loaded, unseen)["attributes"]
    assert np.all(mapped[raw.attribute_ids == 40] == 0) and np.all(mapped[raw.attribute_ids == 7] > 0)
    with pytest.raises(ValueError, match="lack the view"):
        reduce_new_items(loaded, dataclasses.replace(raw, view_names=("title", "mllm")))
    with pytest.raises(ValueError, match="width"):
        reduce_new_items(loaded, dataclasses.replace(raw, view_embeddings=raw.view_embeddings[..., :5]))
