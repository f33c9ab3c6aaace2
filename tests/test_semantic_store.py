"""SemanticStore (versioned on-disk item semantics) and the Beam encoding job."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tfrec_cli import main
from tfrec.data.preprocess import prepare, save_prepared
from tfrec.data.readers import DEFAULT_DATA_ROOT, DataFormatError, read_items
from tfrec.data.vocab import Vocabulary
from tfrec.semantics.encode import encode_items, item_texts, read_generated_texts, read_mllm_outputs
from tfrec.semantics.store import (
    LATEST_FILE, SemanticStore, SemanticStoreError, SemanticView, UnknownViewError,
    VocabularyMismatchError, list_versions, save_version)
from tfrec.semantics.text_encoder import clean_text, shared_text_encoder

MAX_TOKENS, BATCH = 16, 8  # same settings as tests/test_text_encoder.py: one model load
TITLES = {
    "i01": "OPI Nail Lacquer, Big Apple Red", "i02": "Essie Nail Polish, Ballet Slippers",
    "i03": "Conair 1875 Watt Ionic Hair Dryer", "i04": "",  # empty title
    "i05": "Burt's Bees Hand Cr&egrave;me, 2 Ounces", "i06": "Maybelline Great Lash Mascara",
    "i07": "Neutrogena Oil-Free Acne Wash", "i08": "Revlon Hot Air Brush",
    "i09": "CeraVe Moisturizing Cream, 16 oz", "i10": "L'Oreal Paris Voluminous Mascara",
    "i11": "Sally Hansen Hard as Nails", "i12": "Remington Flat Iron 1 inch",
    "i13": "Olay Regenerist Micro-Sculpting Cream", "i14": "Dove Beauty Bar, 4 bars",
    "i15": "Clinique Dramatically Different Lotion", "i16": "Bioderma Micellar Water",
    "i17": "Tweezerman Slant Tweezer", "i18": "Aveeno Daily Moisturizing Lotion",
    # i19 and i20 are interacted with but have no row in the item table
}
ITEMS = sorted(TITLES) + ["i19", "i20"]
ATTRIBUTES = {"i01": ["7", "3"], "i02": ["7"], "i03": ["9", "3", "4"], "i99": ["5"]}
MLLM = [{"item_id": "i01", "view": "image", "text": "a bottle of red nail polish"},
        {"item_id": "i01", "view": "both", "text": "red nail lacquer in a glass bottle"},
        {"item_id": "i03", "view": "text", "text": "a hair dryer for home styling"},
        {"item_id": "i04", "view": "text", "text": ""},
        {"item_id": "unknown", "view": "text", "text": "not in the vocabulary"}]


def write_items(path, titles):
    rows = [f"{item}\tASIN{k}\t{title}" for k, (item, title) in enumerate(titles.items())]
    path.write_text("item_id\tasin\ttitle\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rows = [(f"u{u}", item, 100 * u + k) for u in range(6) for k, item in enumerate(ITEMS[u::2])]
    data = prepare(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    save_prepared(data, root / "prepared")
    (root / "attributes.json").write_text(json.dumps(ATTRIBUTES))
    (root / "mllm.jsonl").write_text("\n".join(json.dumps(r) for r in MLLM) + "\n\n")
    return {"prepared": root / "prepared", "items": write_items(root / "items.tsv", TITLES),
            "attributes": root / "attributes.json", "mllm": root / "mllm.jsonl",
            "vocab": data.item_vocab, "root": root}


def run(inputs, out, items=None, log=None, **kwargs):
    return encode_items(inputs["prepared"], items or inputs["items"], out, max_tokens=MAX_TOKENS,
                        batch_size=BATCH, attributes_path=inputs["attributes"],
                        mllm_outputs=inputs["mllm"], progress_every=1,
                        log=log.append if log is not None else (lambda *_: None), **kwargs)


@pytest.fixture(scope="module")
def encoder():
    return shared_text_encoder(None, MAX_TOKENS, BATCH)


@pytest.fixture(scope="module")
def built(inputs, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    log = []
    store = run(inputs, out, log=log)
    return store, out, log


def test_beam_job_equals_in_memory_encoding(built, inputs, encoder):
    store, out, _ = built
    vocab = inputs["vocab"]
    assert store.path == out / "v1" and (out / LATEST_FILE).read_text().strip() == "v1"
    assert store.views == ["title", "mllm_image", "mllm_text", "mllm_both"]
    store.check_vocabulary(vocab)
    texts = [TITLES.get(item, "") for item in vocab.tokens]
    expected = encoder.encode(texts)
    title = store.view("title")
    np.testing.assert_allclose(title.pooled[2:], expected.pooled, atol=1e-5)
    np.testing.assert_allclose(title.tokens[2:].astype(np.float32), expected.tokens.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(title.token_mask[2:], expected.token_mask)
    np.testing.assert_array_equal(title.mask[2:], [bool(t) for t in texts])
    for item in ("i04", "i19", "i20"):  # empty title / no row in the item table
        row = int(vocab.lookup(item))
        assert not title.mask[row] and not title.pooled[row].any() and not title.tokens[row].any()
    for view in (title, *(store.view(n) for n in ("mllm_image", "mllm_text", "mllm_both"))):
        assert not view.mask[:2].any() and not np.asarray(view.pooled[:2]).any()  # padding, OOV


def test_mllm_views_and_attributes_follow_the_vocabulary(built, inputs, encoder):
    store, vocab = built[0], inputs["vocab"]
    for name, item, text in (("mllm_image", "i01", MLLM[0]["text"]), ("mllm_both", "i01", MLLM[1]["text"]),
                             ("mllm_text", "i03", MLLM[2]["text"])):
        view = store.view(name)
        assert not view.has_tokens and view.text_fields == [f"mllm:{name[5:]}"]
        assert np.flatnonzero(view.mask).tolist() == [int(vocab.lookup(item))]  # i04: empty text
        np.testing.assert_allclose(view.pooled[vocab.lookup(item)], encoder.encode([text]).pooled[0], atol=1e-5)
    assert store.attributes.shape == (vocab.size, 3) and store.attributes.dtype == np.int32
    for item in ITEMS:
        ids = [a for a in store.attributes[vocab.lookup(item)] if a]
        assert store.attribute_vocab.to_tokens(ids) == ATTRIBUTES.get(item, [])
    assert store.attribute_vocab.tokens == ["3", "7", "4", "9"]  # count desc, token asc; "5" not in vocab


def test_metadata_records_provenance(built, inputs):
    store, out, log = built
    meta = json.loads((store.path / "metadata.json").read_text())
    assert meta["format_version"] == 1 and meta["fingerprint"] == store.fingerprint
    assert meta["encoder"]["name"] == "all-MiniLM-L6-v2" and meta["max_tokens"] == MAX_TOKENS
    assert meta["item_vocab"]["size"] == inputs["vocab"].size
    assert meta["views"]["title"]["text_fields"] == ["title"] and meta["views"]["title"]["items"] == 17
    assert meta["arrays"]["views/title/tokens.npy"]["shape"] == [inputs["vocab"].size, MAX_TOKENS, 384]
    assert meta["extra"]["texts_encoded"] == 17 + 3  # 17 titles + 3 non-empty MLLM outputs
    assert any("batches" in line for line in log)
    assert any("1 item id(s)" in line and "'unknown'" in line for line in log)  # MLLM id not in vocab


def test_round_trip_with_and_without_mmap(built, tmp_path):
    store = built[0]
    copy = store.save(tmp_path / "copy")
    for mmap in (True, False):
        loaded = SemanticStore.load(copy, mmap=mmap)
        assert loaded.views == store.views and loaded.fingerprint == store.fingerprint
        assert isinstance(loaded.view("title").tokens, np.memmap) == mmap
        for name in store.views:
            for key, array in store.view(name).arrays().items():
                np.testing.assert_array_equal(getattr(loaded.view(name), key), array)
        np.testing.assert_array_equal(loaded.attributes, store.attributes)
        assert loaded.attribute_vocab == store.attribute_vocab and loaded.metadata == store.metadata
    with pytest.raises(SemanticStoreError, match="already exists"):
        store.save(copy)


def test_unchanged_inputs_reuse_the_store_without_encoding(built, inputs, encoder, capsys):
    store, out, _ = built
    before = encoder.num_encoded
    log = []
    again = run(inputs, out, log=log)
    assert encoder.num_encoded == before  # the model saw nothing
    assert again.path == out / "v1" and again.fingerprint == store.fingerprint
    assert "reused" in log[-1] and [p.name for p in list_versions(out)] == ["v1"]
    rc = main(["encode", "--prepared", str(inputs["prepared"]), "--items", str(inputs["items"]),
               "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--batch-size", str(BATCH),
               "--attributes", str(inputs["attributes"]), "--mllm-outputs", str(inputs["mllm"])])
    printed = capsys.readouterr().out
    assert rc == 0 and "reused" in printed and "title 17" in printed
    assert encoder.num_encoded == before


def test_changed_input_writes_a_new_version_and_keeps_the_old(built, inputs, encoder, tmp_path, capsys):
    _, built_out, _ = built
    out = tmp_path / "store"
    shutil.copytree(built_out, out)
    changed = write_items(tmp_path / "items.tsv", {**TITLES, "i02": "Essie Nail Polish, Mint Candy Apple"})
    before = encoder.num_encoded
    new = run(inputs, out, items=changed)
    assert encoder.num_encoded > before
    assert "tfrec encode: 6/6 batches" in capsys.readouterr().out  # 3 title + 3 MLLM batches
    assert new.path == out / "v2" and (out / LATEST_FILE).read_text().strip() == "v2"
    old = SemanticStore.load(out / "v1")
    assert old.fingerprint != new.fingerprint
    row = int(inputs["vocab"].lookup("i02"))
    assert cos_rows(old.view("title").pooled, new.view("title").pooled, row) < 0.99
    other = int(inputs["vocab"].lookup("i01"))
    np.testing.assert_allclose(new.view("title").pooled[other], old.view("title").pooled[other], atol=1e-5)
    back = run(inputs, out)  # the original inputs again: v1 is reused and becomes LATEST
    assert back.path == out / "v1" and SemanticStore.load(out).path == out / "v1"
    assert len(list_versions(out)) == 2


def cos_rows(a, b, row):
    return float(np.dot(a[row], b[row]))


def test_load_errors(built, inputs, tmp_path):
    store, out, _ = built
    with pytest.raises(FileNotFoundError, match="not found"):
        SemanticStore.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a semantic store"):
        SemanticStore.load(tmp_path)
    other = Vocabulary(list(reversed(inputs["vocab"].tokens)))
    with pytest.raises(VocabularyMismatchError, match="another item vocabulary.*id 2"):
        SemanticStore.load(out, item_vocab=other)
    with pytest.raises(VocabularyMismatchError, match="rows vs a vocabulary of size"):
        store.check_vocabulary(Vocabulary(["x"]))
    with pytest.raises(UnknownViewError, match="no view 'caption'; available: \\['title'"):
        store.view("caption")
    assert isinstance(UnknownViewError("x"), KeyError)

    def corrupt(name, damage):
        copy = tmp_path / name
        shutil.copytree(store.path, copy)
        damage(copy)
        return copy

    bad_json = corrupt("bad_json", lambda p: (p / "metadata.json").write_text("{not json"))
    with pytest.raises(SemanticStoreError, match="metadata.json is not valid JSON"):
        SemanticStore.load(bad_json)
    truncated = corrupt("truncated", lambda p: (p / "views/title/tokens.npy").write_bytes(
        (p / "views/title/tokens.npy").read_bytes()[:1000]))
    with pytest.raises(SemanticStoreError, match="cannot read views/title/tokens.npy"):
        SemanticStore.load(truncated)
    missing = corrupt("missing", lambda p: (p / "views/mllm_text/mask.npy").unlink())
    with pytest.raises(SemanticStoreError, match="views/mllm_text/mask.npy is missing"):
        SemanticStore.load(missing)
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / LATEST_FILE).write_text("v7\n")
    with pytest.raises(FileNotFoundError, match="points to v7"):
        SemanticStore.load(tmp_path / "dangling")


def test_views_are_validated(inputs, tmp_path):
    vocab = inputs["vocab"]
    size = vocab.size
    good = SemanticView("title", np.zeros((size, 4), np.float32), np.zeros(size, bool))
    with pytest.raises(SemanticStoreError, match="unknown view name 'caption'"):
        SemanticStore(vocab, [SemanticView("caption", good.pooled, good.mask)])
    with pytest.raises(SemanticStoreError, match=f"pooled must be float32 of shape \\({size}, 4\\)"):
        SemanticStore(vocab, [SemanticView("title", np.zeros((size - 1, 4), np.float32), good.mask)])
    padding_on = good.mask.copy()
    padding_on[0] = True
    with pytest.raises(SemanticStoreError, match="rows 0 \\(padding\\) and 1 \\(OOV\\)"):
        SemanticStore(vocab, [SemanticView("title", good.pooled, padding_on)])
    first = save_version(tmp_path, SemanticStore(vocab, [good], input_fingerprint="a"))
    second = save_version(tmp_path, SemanticStore(vocab, [good], input_fingerprint="b"))
    assert (first.name, second.name) == ("v1", "v2") and SemanticStore.load(tmp_path).path == second


def test_bad_mllm_lines_name_file_and_line(inputs, tmp_path):
    cases = {
        '{"item_id": "i01", "view": "image", "text": "ok"}\n{"item_id": "i02", "view": "image", "text": }\n':
            "line 2: not valid JSON",
        '{"item_id": "i01", "view": "caption", "text": "x"}\n': "line 1: unknown view 'caption'",
        '\n{"item_id": "i01", "text": "x"}\n': "line 2: 'view' missing",
        '{"item_id": "i01", "view": "text", "text": 5}\n': "line 1: 'text' is not a string",
        b'{"item_id": "i01", "view": "text", "text": "\xff"}\n': "line 1: not valid JSON",
        '{"item_id": "i01", "view": "text", "text": "a"}\n{"item_id": "i01", "view": "text", "text": "b"}\n':
            "line 2: duplicate output for item_id 'i01', view 'text' \\(first at line 1\\)",
    }
    for k, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataFormatError, match=f"bad{k}.jsonl: {message}"):
            read_mllm_outputs(path)
    assert read_mllm_outputs(inputs["mllm"])["mllm_image"] == {"i01": MLLM[0]["text"]}


def test_cli_errors_exit_2_with_one_line(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "i01", "view": "text", "text": "a"}\n[1, 2]\n')
    common = ["--items", str(inputs["items"]), "--out", str(tmp_path / "out")]
    assert main(["encode", "--prepared", str(inputs["prepared"]), "--mllm-outputs", str(bad), *common]) == 2
    assert "bad.jsonl: line 2: expected a JSON object" in capsys.readouterr().err
    assert main(["encode", "--prepared", str(tmp_path / "nothing"), *common]) == 2
    assert "item_vocab.txt" in capsys.readouterr().err
    assert main(["encode", "--prepared", str(inputs["prepared"]), "--text-fields", "name", *common]) == 2
    assert "items.tsv: no column(s) ['name']" in capsys.readouterr().err
    assert main(["encode", "--prepared", str(inputs["prepared"]), "--max-tokens", "2", *common]) == 2
    assert "max_tokens must be >= 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list_versions(tmp_path / "out")


def test_item_text_layouts():
    movies = pd.DataFrame({"item_id": ["1", "2"], "title": ["Toy Story (1995)", "Heat (1995)"],
                           "genres": ["Animation|Children's|Comedy", ""]})
    texts, fields = item_texts(movies)
    assert texts.tolist() == ["Toy Story (1995). Genres: Animation, Children's, Comedy", "Heat (1995)"]
    assert fields == ["title", "genres"]
    ml100k = pd.DataFrame({"item_id": ["1"], "movie_title": ["Toy Story"], "release_year": ["1995"],
                           "class": ["Animation Children's Comedy"]})
    assert item_texts(ml100k)[0].tolist() == ["Toy Story (1995). Genres: Animation, Children's, Comedy"]
    custom = pd.DataFrame({"item_id": ["a"], "title": ["Mascara"], "brand": ["Maybelline"]})
    assert item_texts(custom, ["title", "brand"])[0].tolist() == ["Mascara. Maybelline"]
    assert clean_text(item_texts(pd.DataFrame({"item_id": ["a"], "title": [" x &amp; y "]}))[0]["a"]) == "x & y"
    movies_dat = DEFAULT_DATA_ROOT / "movielens-1m-subset" / "movies.dat"
    if movies_dat.exists():  # the bundled file, read as `tfrec encode --dataset` reads it
        first = item_texts(read_items(movies_dat, encoding="latin-1"))[0]
        assert first["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"


# ------------------------------------------------------------------ generated text view
GENERATED = {"i01": "red nail lacquer", "i03": "ionic hair dryer", "i04": "", "i05": "  hand  cream &amp; balm "}


def write_generated(path, rows):
    path.write_text("item_id\tasin\tgenerated_text\n" + "".join(f"{i}\tA{k}\t{t}\n" for k, (i, t) in enumerate(rows)))
    return path


def test_generated_view_loader(inputs, tmp_path):
    vocab = inputs["vocab"]
    path = write_generated(tmp_path / "gen.tsv", GENERATED.items())
    assert read_generated_texts(path, vocab) == {"i01": "red nail lacquer", "i03": "ionic hair dryer",
                                                 "i05": "hand cream & balm"}  # empty text: no view
    bad = write_generated(tmp_path / "unknown.tsv", [("i01", "a"), ("i77", "b")])
    with pytest.raises(DataFormatError, match="unknown.tsv: line 3: unknown item_id 'i77'"):
        read_generated_texts(bad, vocab)
    dup = write_generated(tmp_path / "dup.tsv", [("i01", "a"), ("i01", "b")])
    with pytest.raises(DataFormatError, match="dup.tsv: line 3: duplicate item_id 'i01' \\(first at line 2\\)"):
        read_generated_texts(dup, vocab)
    short = tmp_path / "short.tsv"
    short.write_text("item_id\tasin\tgenerated_text\ni01\tA1\n")
    with pytest.raises(DataFormatError, match="short.tsv: line 2: expected 3 tab-separated columns, got 2"):
        read_generated_texts(short, vocab)
    header = tmp_path / "header.tsv"
    header.write_text("id\ttext\ni01\tx\n")
    with pytest.raises(DataFormatError, match="header.tsv: line 1: expected a header"):
        read_generated_texts(header, vocab)
    with pytest.raises(DataFormatError, match="file not found"):
        read_generated_texts(tmp_path / "none.tsv", vocab)


def test_generated_view_is_encoded_into_the_store(inputs, encoder, tmp_path):
    """Only generated text (as Amazon Sports/Toys): a store with the pooled `generated` view."""
    path = write_generated(tmp_path / "gen.tsv", GENERATED.items())
    log = []
    store = encode_items(inputs["prepared"], None, tmp_path / "store", max_tokens=MAX_TOKENS, batch_size=BATCH,
                         generated_path=path, progress_every=1, log=log.append)
    assert store.views == ["generated"]
    view = store.view("generated")
    assert not view.has_tokens and view.text_fields == ["generated_text"]
    vocab = inputs["vocab"]
    texts = [clean_text(GENERATED.get(item, "")) for item in vocab.tokens]
    np.testing.assert_array_equal(view.mask[2:], [bool(t) for t in texts])
    rows = [k for k, t in enumerate(texts) if t]
    want = encoder.encode([texts[k] for k in rows], return_tokens=False).pooled
    np.testing.assert_allclose(view.pooled[2:][rows], want, atol=1e-5)
    assert any("generated text view (language-model output, not MLLM)" in line for line in log)
    assert store.metadata["extra"]["sources"]["generated"] == str(path)
