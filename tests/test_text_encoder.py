"""TextEncoder: all-MiniLM-L6-v2 through keras-hub, pooled + token outputs."""

import numpy as np
import pytest

from tfrec.semantics.text_encoder import (
    TextEncoder, clean_text, encoder_identity, shared_text_encoder)

MAX_TOKENS, BATCH = 16, 8  # same settings as tests/test_semantic_store.py: one model load


@pytest.fixture(scope="module")
def encoder():
    return shared_text_encoder(None, MAX_TOKENS, BATCH)


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_matches_published_sentence_transformers_similarities(encoder):
    # sbert.net quickstart, all-MiniLM-L6-v2: similarities 0.6660, 0.1046, 0.1411
    out = encoder.encode(["The weather is lovely today.", "It's so sunny outside!",
                          "He drove to the stadium."])
    sims = out.pooled @ out.pooled.T
    np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose([sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411], atol=2e-3)


def test_related_titles_are_closer_than_unrelated(encoder):
    polish_a, polish_b, dryer, shoes_a, shoes_b = encoder.encode([
        "OPI Nail Lacquer, Big Apple Red, 0.5 fl oz",
        "Essie Nail Polish, Ballet Slippers pink",
        "Conair 1875 Watt Ionic Hair Dryer",
        "Women's running shoes, size 8",
        "Running shoes for women, size 8"]).pooled
    assert cos(polish_a, polish_b) > cos(polish_a, dryer) + 0.2
    assert cos(polish_b, polish_a) > cos(polish_b, dryer) + 0.2
    assert cos(shoes_a, shoes_b) > 0.7  # paraphrase


def test_shapes_masks_and_mean_pooling_over_cls_and_sep(encoder):
    texts = ["red lipstick", "a b c d e f g h i j k l m n o p q r s t"]  # second is truncated
    out = encoder.encode(texts)
    assert out.pooled.shape == (2, 384) and out.pooled.dtype == np.float32
    assert out.tokens.shape == (2, MAX_TOKENS, 384) and out.tokens.dtype == np.float16
    assert out.token_mask.dtype == bool and out.valid.tolist() == [True, True]
    pieces = encoder.num_wordpieces(texts)
    assert pieces.tolist() == [2, 20]  # "red", "lipstick"; one piece per letter
    assert out.token_mask.sum(axis=1).tolist() == [2 + 2, MAX_TOKENS]  # [CLS] ... [SEP]
    ids, mask = encoder.tokenize(texts)
    cls_id, sep_id = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    assert (ids[:, 0] == cls_id).all()
    assert ids[0, 3] == sep_id and ids[1, MAX_TOKENS - 1] == sep_id  # [SEP] kept when truncating
    np.testing.assert_array_equal(mask, out.token_mask)
    assert not out.tokens[0, 4:].any()  # padding positions are zeros
    mean = out.tokens[0, :4].astype(np.float32).mean(axis=0)  # mean incl. [CLS] and [SEP]
    np.testing.assert_allclose(mean / np.linalg.norm(mean), out.pooled[0], atol=2e-3)


def test_empty_text_is_masked_with_zero_vectors(encoder):
    out = encoder.encode(["", "   ", None, "Conair hair dryer"])
    assert out.valid.tolist() == [False, False, False, True]
    assert not out.pooled[:3].any() and not out.tokens[:3].any() and not out.token_mask[:3].any()
    alone = encoder.encode(["Conair hair dryer"])
    np.testing.assert_allclose(out.pooled[3], alone.pooled[0], atol=1e-6)
    none = encoder.encode([])
    assert none.pooled.shape == (0, 384) and none.tokens.shape == (0, MAX_TOKENS, 384)


def test_deterministic_and_independent_of_batching(encoder):
    texts = [f"Nail polish shade number {k}" for k in range(11)]
    first, second = encoder.encode(texts), encoder.encode(texts)
    np.testing.assert_array_equal(first.pooled, second.pooled)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    shifted = encoder.encode(["Hair dryer"] + texts)  # other batch composition
    np.testing.assert_allclose(shifted.pooled[1:], first.pooled, atol=1e-5)
    pooled_only = encoder.encode(texts, return_tokens=False)
    assert pooled_only.tokens is None and pooled_only.token_mask is None
    np.testing.assert_array_equal(pooled_only.pooled, first.pooled)


def test_html_entities_and_accents_are_normalised(encoder):
    assert clean_text("Cr&egrave;me  hand\tlotion ") == "Crème hand lotion"
    ids, _ = encoder.tokenize(["Cr&egrave;me hand lotion", "creme HAND lotion"])
    np.testing.assert_array_equal(ids[0], ids[1])  # lower-cased, accents stripped (as HF BERT)


def test_num_encoded_counts_model_inputs(encoder):
    before = encoder.num_encoded
    encoder.encode(["a", "", "b"])
    assert encoder.num_encoded == before + 2


def test_bad_arguments_raise_clear_errors(encoder, tmp_path):
    with pytest.raises(ValueError, match="max_tokens must be >= 3"):
        TextEncoder(max_tokens=2)
    with pytest.raises(ValueError, match="max_tokens=600 exceeds the model's 512 positions"):
        TextEncoder(max_tokens=600)
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(batch_size=0)
    with pytest.raises(FileNotFoundError, match="preset folder not found"):
        TextEncoder(preset=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(preset=str(tmp_path))
    with pytest.raises(ValueError, match="single string"):
        encoder.encode("just one string")
    with pytest.raises(ValueError, match=r"texts\[1\].*int"):
        encoder.encode(["ok", 3])


def test_identity_names_what_changes_the_output(encoder):
    identity = encoder.identity()
    assert identity == encoder_identity(None, MAX_TOKENS)
    assert identity["name"] == "all-MiniLM-L6-v2" and identity["max_tokens"] == MAX_TOKENS
    assert len(identity["weights_sha256"]) == 64
    assert encoder_identity(None, 32) != identity
