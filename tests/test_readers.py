"""Tests for tfrec.data.readers: bundled datasets, round trips, error contract."""

import functools
import gzip
import pickle

import numpy as np
import pandas as pd
import pytest

from tfrec.data.readers import (DATASETS, DEFAULT_DATA_ROOT, DataFormatError, load_dataset,
                                read_interactions, read_item_attributes, read_items)

needs_data = pytest.mark.skipif(not DEFAULT_DATA_ROOT.is_dir(),
                                reason=f"bundled data not found at {DEFAULT_DATA_ROOT}")

HEADER = b"user_id\titem_id\ttimestamp\n"


@functools.lru_cache(maxsize=None)
def _load(name):
    return load_dataset(name)


# ------------------------------------------------------------ bundled datasets

# name -> (interactions, users, items) from /work/shared/data/README.md
COUNTS = {
    "amazon-beauty": (198_502, 22_363, 12_101),
    "amazon-sports": (296_337, 35_598, 18_357),
    "amazon-toys": (167_597, 19_412, 11_924),
    "movielens-1m-subset": (487_515, 2_998, 3_615),
    "movielens-100k": (100_000, 943, 1_682),
}


def test_registry_names():
    assert set(DATASETS) == set(COUNTS)


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_bundled_counts_and_dtypes(name):
    ds = _load(name)
    inter = ds.interactions
    rows, users, items = COUNTS[name]
    assert ds.name == name
    assert len(inter) == rows
    assert (inter["user_id"].nunique(), inter["item_id"].nunique()) == (users, items)
    expected = {"user_id": object, "item_id": object, "timestamp": np.int64}
    if name.startswith("movielens"):
        expected["rating"] = np.float64
    if name == "movielens-1m-subset":
        expected["label"] = np.float64
    assert list(inter.columns) == list(expected)
    assert {c: inter[c].dtype for c in inter} == {c: np.dtype(t) for c, t in expected.items()}
    assert isinstance(inter["user_id"].iloc[0], str)
    assert isinstance(inter.index, pd.RangeIndex)
    assert ds.source_files and all(f.startswith("/") for f in ds.source_files)


@needs_data
@pytest.mark.parametrize("name", ["amazon-beauty", "amazon-sports", "amazon-toys"])
def test_bundled_tsv_matches_file_order(name):
    raw = pd.read_csv(DEFAULT_DATA_ROOT / name / "interactions.tsv", sep="\t", dtype=str)
    inter = _load(name).interactions
    assert inter["user_id"].tolist() == raw["user_id"].tolist()
    assert inter["item_id"].tolist() == raw["item_id"].tolist()
    assert inter["timestamp"].tolist() == raw.iloc[:, 2].astype("int64").tolist()


@needs_data
def test_beauty_first_rows_and_side_tables():
    ds = _load("amazon-beauty")
    lines = (DEFAULT_DATA_ROOT / "amazon-beauty" / "interactions.tsv").read_text().splitlines()
    first = [tuple(line.split("\t")) for line in lines[1:6]]
    got = [(u, i, str(t)) for u, i, t in ds.interactions.head(5).itertuples(index=False)]
    assert got == first
    assert list(ds.items.columns) == ["item_id", "asin", "title"]
    assert len(ds.items) == 12_101 and (ds.items["title"] == "").sum() == 7
    assert len(ds.item_attributes) == 12_101
    assert len({a for attrs in ds.item_attributes.values() for a in attrs}) == 637
    assert all(isinstance(a, str) for a in ds.item_attributes["4"])


@needs_data
def test_movielens_specifics():
    ml1m = _load("movielens-1m-subset")
    inter = ml1m.interactions
    assert inter.head(2).to_dict("list") == {
        "user_id": ["1", "1"], "item_id": ["1193", "661"], "timestamp": [978300760, 978302109],
        "rating": [5.0, 3.0], "label": [1.0, 0.0]}
    assert (inter["label"] == (inter["rating"] >= 4)).all()
    assert len(ml1m.items) == 3_883 and list(ml1m.items.columns) == ["item_id", "title", "genres"]
    assert ml1m.items.iloc[0].tolist() == ["1", "Toy Story (1995)", "Animation|Children's|Comedy"]
    ml100k = _load("movielens-100k")
    assert list(ml100k.items.columns) == ["item_id", "movie_title", "release_year", "class"]
    assert len(ml100k.items) == 1_682 and ml100k.item_attributes is None
    assert _load("amazon-toys").interactions["timestamp"].iloc[:3].tolist() == [0, 1, 2]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="amazon-beauty"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="TFREC_DATA_ROOT") as info:
        load_dataset("amazon-beauty", data_root=tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------ round trips

FRAME = pd.DataFrame({
    "user_id": ["u1", "007", "NA", "u1"],
    "item_id": ["i 9", "i2", "null", "0"],
    "timestamp": np.array([3, 1, 2_000_000_000_000, 1], dtype="int64"),
    "rating": [4.5, 1.0, 0.0, 3.0],
    "label": [1.0, 0.0, 0.0, 1.0],
})


def _write(frame, path):
    if path.name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif ".csv" in path.name:
        frame.to_csv(path, index=False)
    else:
        frame.to_csv(path, sep="\t", index=False)


@pytest.mark.parametrize("name", ["x.tsv", "x.txt", "x.csv", "x.parquet", "x.tsv.gz", "x.csv.gz"])
def test_round_trip(tmp_path, name):
    _write(FRAME, tmp_path / name)
    pd.testing.assert_frame_equal(read_interactions(tmp_path / name), FRAME)


def test_recbole_and_dat_formats(tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     " 7 \t42\t3\t881250949.0\n8\t43\t5\t881250950\n")
    got = read_interactions(inter)
    assert got.to_dict("list") == {"user_id": ["7", "8"], "item_id": ["42", "43"],
                                   "timestamp": [881250949, 881250950], "rating": [3.0, 5.0]}
    dat = tmp_path / "r.dat.gz"
    dat.write_bytes(gzip.compress("1::10::4::100\n\n2::20::2::99\n".encode("latin-1")))
    assert read_interactions(dat).to_dict("list") == {
        "user_id": ["1", "2"], "item_id": ["10", "20"], "timestamp": [100, 99],
        "rating": [4.0, 2.0]}
    movies = tmp_path / "movies.dat"
    movies.write_bytes("1::Caf\xe9 (1995)::Drama|War\n2::Blank::\n".encode("latin-1"))
    assert read_items(movies, encoding="latin-1").values.tolist() == [
        ["1", "Café (1995)", "Drama|War"], ["2", "Blank", ""]]


def test_explicit_fmt_and_sep(tmp_path):
    path = tmp_path / "data.log"
    path.write_text("user_id;item_id;timestamp\nu;i;5\n")
    assert read_interactions(path, fmt="csv", sep=";").to_dict("list") == {
        "user_id": ["u"], "item_id": ["i"], "timestamp": [5]}


@pytest.mark.parametrize("mapping, header", [
    ({"position": "timestamp"}, "user_id\titem_id\tposition"),
    ({"uid": "user_id", "iid": "item_id", "ts": "timestamp"}, "uid\tiid\tts"),
])
def test_columns_mapping(tmp_path, mapping, header):
    path = tmp_path / "x.tsv"
    path.write_text(f"{header}\nu1\ti1\t0\nu1\ti2\t1\n")
    got = read_interactions(path, columns=mapping)
    assert got.to_dict("list") == {"user_id": ["u1", "u1"], "item_id": ["i1", "i2"],
                                   "timestamp": [0, 1]}


# --------------------------------------------------------------- error contract

# (file name, content or None for "missing", expected line or None, words in the message)
INTERACTION_ERRORS = [
    ("missing.tsv", None, None, ["not found"]),
    ("empty.tsv", b"", None, ["empty"]),
    ("blank.tsv", b"\n\n", None, ["empty"]),
    ("header_only.tsv", HEADER, None, ["no data rows"]),
    ("no_item.tsv", b"user_id\titem\ttimestamp\nu\ti\t1\n", None, ["missing", "item_id", "'item'"]),
    ("ts_text.tsv", HEADER + b"u\ti\t1\nu\ti\tabc\n", 3, ["non-numeric", "timestamp", "'abc'"]),
    ("ts_missing.tsv", HEADER + b"u\ti\t1\n\nu\ti\t\n", 4, ["missing timestamp"]),
    ("ts_float.inter", b"user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1.5\n", 2,
     ["non-integral", "'1.5'"]),
    ("ts_inf.csv", b"user_id,item_id,timestamp\nu,i,1\nu,i,inf\n", 3, ["non-integral"]),
    ("ts_huge.tsv", HEADER + b"u\ti\t99999999999999999999\n", 2, ["out-of-range"]),
    ("empty_user.tsv", HEADER + b"u\ti\t1\n  \ti\t2\n", 3, ["empty user_id"]),
    ("empty_item.csv", b"user_id,item_id,timestamp\nu,,2\n", 2, ["empty item_id"]),
    ("encoding.tsv", HEADER + b"u1\ti1\t1\n\xff\xfe\ti2\t2\n", 3, ["encoding", "0xff"]),
    ("too_many.tsv", HEADER + b"u\ti\t1\n\nu\ti\t2\tx\n", 4, ["number of fields", "found 4"]),
    ("too_few.tsv", HEADER + b"u\ti\t1\nu\ti\n", 3, ["number of fields", "found 2"]),
    ("first_row_long.csv", b"user_id,item_id,timestamp\nu,i,1,9\n", 2, ["number of fields"]),
    ("quoted.csv", b'user_id,item_id,timestamp\n"u,1",i,1\nu,i,2,9\n', 3, ["number of fields"]),
    ("bad_rating.tsv", b"user_id\titem_id\ttimestamp\trating\nu\ti\t1\tfive\n", 2,
     ["non-numeric rating"]),
    ("short.dat", b"1::2::3::4\n1::2::3\n", 2, ["number of fields", "expected 4"]),
    ("bad.tsv.gz", b"not gzip at all", None, ["gzip"]),
    ("bad.parquet", b"PAR1 not really", None, ["parquet"]),
]


def _make(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


def _check(info, path, line, words):
    message = str(info.value)
    assert path.name in message and info.value.path == str(path)
    assert info.value.line == line
    if line is not None:
        assert f"line {line}:" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("name, content, line, words", INTERACTION_ERRORS,
                         ids=[case[0] for case in INTERACTION_ERRORS])
def test_interaction_errors(tmp_path, name, content, line, words):
    path = _make(tmp_path, name, content)
    with pytest.raises(DataFormatError) as info:
        read_interactions(path)
    _check(info, path, line, words)


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "x.parquet"
    frame = pd.DataFrame({"user_id": ["a", None], "item_id": ["i", "j"], "timestamp": [1, 2]})
    frame.to_parquet(path)
    with pytest.raises(DataFormatError, match=r"x\.parquet: empty user_id \(data row 2\)"):
        read_interactions(path)
    pd.DataFrame({"user_id": ["a"], "item_id": ["i"], "timestamp": [1.25]}).to_parquet(path)
    with pytest.raises(DataFormatError, match="non-integral or out-of-range timestamp 1.25"):
        read_interactions(path)


ITEM_ERRORS = [
    ("dup.tsv", b"item_id\ttitle\n1\ta\n2\tb\n1\tc\n", 4, ["duplicate item_id", "'1'"]),
    ("noid.tsv", b"id\ttitle\n1\ta\n", None, ["missing", "item_id"]),
    ("empty_id.item", b"item_id:token\ttitle:token_seq\n\tx\n", 2, ["empty item_id"]),
    ("movies.dat", b"1::A::B\n2::C\n", 2, ["number of fields"]),
    ("enc.tsv", b"item_id\ttitle\n1\tok\n2\t\xe9t\xe9\n", 3, ["encoding"]),
]


@pytest.mark.parametrize("name, content, line, words", ITEM_ERRORS,
                         ids=[case[0] for case in ITEM_ERRORS])
def test_item_errors(tmp_path, name, content, line, words):
    path = _make(tmp_path, name, content)
    with pytest.raises(DataFormatError) as info:
        read_items(path)
    _check(info, path, line, words)


ATTRIBUTE_ERRORS = [
    ("missing.json", None, None, ["not found"]),
    ("bad.json", b'{"1": [1, 2],\n "2": [3,, 4]}', 2, ["invalid JSON", "column"]),
    ("list.json", b"[1, 2]", None, ["JSON object"]),
    ("value.json", b'{"1": 5}', None, ["'1'", "list"]),
]


@pytest.mark.parametrize("name, content, line, words", ATTRIBUTE_ERRORS,
                         ids=[case[0] for case in ATTRIBUTE_ERRORS])
def test_attribute_errors(tmp_path, name, content, line, words):
    path = _make(tmp_path, name, content)
    with pytest.raises(DataFormatError) as info:
        read_item_attributes(path)
    _check(info, path, line, words)


def test_item_attributes_are_strings(tmp_path):
    path = _make(tmp_path, "a.json", b'{"4": [1, 2], "x": []}')
    assert read_item_attributes(path) == {"4": ["1", "2"], "x": []}


def test_error_is_value_error_and_picklable():
    err = DataFormatError("/d/f.tsv", "empty user_id", line=7)
    assert isinstance(err, ValueError)
    assert str(err) == "/d/f.tsv: line 7: empty user_id"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.line, copy.problem, str(copy)) == (err.path, 7, err.problem, str(err))


# ------------------------------------------------------------ token length limit (issue 21)

def test_overlong_token_is_rejected_naming_the_line(tmp_path):
    from tfrec.data.readers import MAX_TOKEN_CHARS

    path = tmp_path / "log.tsv"
    long_item = "x" * (MAX_TOKEN_CHARS + 1)
    path.write_bytes(HEADER + b"u1\ti1\t1\nu1\t" + long_item.encode() + b"\t2\nu2\ti1\t3\n")
    with pytest.raises(DataFormatError) as info:
        read_interactions(path)
    assert info.value.line == 3 and "longer than the limit of 1024" in str(info.value)
    ok = tmp_path / "ok.tsv"
    ok.write_bytes(HEADER + b"u1\t" + b"y" * MAX_TOKEN_CHARS + b"\t1\n")  # exactly the limit: fine
    assert read_interactions(ok)["item_id"].str.len().tolist() == [MAX_TOKEN_CHARS]
