"""MLLM enrichment (`tfrec enrich`): prompts, resumable JSONL output, the three backends, CLI."""

import base64
import hashlib
import http.server
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib

import pandas as pd
import pytest

from tfrec_cli import main
from tfrec.data.readers import DEFAULT_DATA_ROOT, DataFormatError
from tfrec.semantics.enrich import OutputLog, enrich_items
from tfrec.semantics.mllm_backends import (BackendError, ItemImage, JsonlImportBackend, KerasHubBackend,
                                           MLLMRequest, OpenAIBackend)
from tfrec.semantics.prompts import PromptTemplates

FAST_RETRY = {"max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05}


def png_bytes(width, height, rgb):
    """A valid RGB PNG of one colour."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture
def catalog(tmp_path):
    """Four items: 1 and 3 have images (in images/<id>.png), 4 has no text."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.png").write_bytes(png_bytes(4, 3, (255, 0, 0)))
    (images / "3.png").write_bytes(png_bytes(5, 5, (0, 0, 255)))
    (images / "notes.txt").write_text("not an image")
    items = tmp_path / "items.tsv"
    items.write_text("item_id\tasin\ttitle\n1\tA1\tRed nail polish\n2\tA2\tShampoo 300 ml\n"
                     "3\tA3\tBlue eye shadow\n4\tA4\t\n")
    return items, images


class ChatServer(http.server.ThreadingHTTPServer):
    """A local OpenAI-compatible endpoint: records requests, answers by echoing the
    prompt, injects scripted failures (`script`) or permanent 400s after `fail_after`."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.requests, self.answered, self.script, self.fail_after = [], [], [], None
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass  # e.g. writing to a client that timed out
    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            step = server.script.pop(0) if server.script else None
            if step is None and server.fail_after is not None and len(server.answered) >= server.fail_after:
                step = (400, {"error": {"message": "quota exceeded"}})
        if step and step[0] == "sleep":
            time.sleep(step[1])
            step = None
        parts = body["messages"][-1]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
        if step is None:
            with server.lock:
                server.answered.append((text, image))
            step = (200, {"choices": [{"message": {"role": "assistant",
                                                   "content": f" about: {text}{' +image' if image else ''} "}}]})
        status, answer = step[:2]
        self.send_response(status)
        for name, value in (step[2] if len(step) > 2 else {}).items():
            self.send_header(name, value)
        data = json.dumps(answer).encode() if not isinstance(answer, bytes) else answer
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_pair(records):
    return {(r["item_id"], r["view"]): r for r in records}


# ----------------------------------------------------------------------- prompts

def test_prompt_templates_validate_and_version(tmp_path):
    templates = PromptTemplates()
    assert "Red nail polish" in templates.render("both", "Red nail polish")
    assert "{text}" not in templates.render("image")
    assert len({templates.version(v) for v in ("image", "text", "both")}) == 3
    changed = PromptTemplates(text="Describe: {text}")
    assert changed.version("text") != templates.version("text")
    assert changed.version("image") == templates.version("image")
    with pytest.raises(ValueError, match="'image' prompt template must not contain"):
        PromptTemplates(image="Look at {text}")
    with pytest.raises(ValueError, match="'both' prompt template must contain"):
        PromptTemplates(both="Describe the product")
    bad = tmp_path / "prompts.yaml"
    bad.write_text("txt: 'Describe {text}'\n")
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['txt'\]"):
        PromptTemplates.from_file(bad)


# ------------------------------------------------------------- openai + the job

def test_openai_sends_prompts_images_and_key(catalog, server, tmp_path, monkeypatch):
    items, images = catalog
    monkeypatch.setenv("TEST_MLLM_KEY", "sk-test")
    backend = OpenAIBackend(server.base_url, "qwen-vl", api_key_env="TEST_MLLM_KEY", max_tokens=64)
    out = tmp_path / "out.jsonl"
    summary = enrich_items(items, out, backend, text_fields=["title"], image_dir=images, batch_size=2)

    # Image-less items 2 and 4 skip image and both (missing image counted first);
    # text-less item 4 also skips text.
    assert (summary.done, summary.missing_image, summary.missing_text, summary.resumed) == (7, 4, 1, 0)
    records = by_pair(read_records(out))
    assert set(records) == {("1", "image"), ("1", "text"), ("1", "both"), ("2", "text"),
                            ("3", "image"), ("3", "text"), ("3", "both")}
    versions = {v: PromptTemplates().version(v) for v in ("image", "text", "both")}
    for (item_id, view), record in records.items():
        assert record["backend"] == "openai" and record["model"] == "qwen-vl"
        assert record["prompt_version"] == versions[view]
        assert record["text"] == record["text"].strip()
    assert "Shampoo 300 ml" in records["2", "text"]["text"] and "+image" not in records["2", "text"]["text"]
    assert records["1", "both"]["text"].endswith("+image")

    assert len(server.requests) == 7
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sk-test"
        assert request["body"]["model"] == "qwen-vl" and request["body"]["max_tokens"] == 64
    sent = [url for _, url in server.answered if url]
    assert len(sent) == 4  # 2 items x (image, both)
    prefix = "data:image/png;base64,"
    assert all(url.startswith(prefix) for url in sent)
    decoded = {base64.b64decode(url[len(prefix):]) for url in sent}
    assert decoded == {(images / "1.png").read_bytes(), (images / "3.png").read_bytes()}
    image_only = [text for text, url in server.answered if url and "Product information" not in text]
    assert image_only == [PromptTemplates().render("image")] * 2  # the image view has no item text

    manifest = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert manifest["model"] == "qwen-vl" and manifest["text_fields"] == ["title"]
    assert manifest["prompts"]["text"]["prompt_version"] == versions["text"]


def test_resume_after_crash_generates_nothing_twice(catalog, server, tmp_path):
    items, images = catalog
    backend = OpenAIBackend(server.base_url, "m")
    out = tmp_path / "out.jsonl"
    server.fail_after = 3  # the endpoint answers 3 requests, then 400 (a permanent error)
    with pytest.raises(BackendError, match="HTTP 400.*quota exceeded"):
        enrich_items(items, out, backend, text_fields=["title"], image_dir=images, batch_size=2, **FAST_RETRY)
    assert len(read_records(out)) == 3  # answers before the failure are kept, even mid-batch

    server.fail_after = None
    summary = enrich_items(items, out, backend, text_fields=["title"], image_dir=images, batch_size=2,
                           **FAST_RETRY)
    assert (summary.resumed, summary.done) == (3, 4)
    assert len(server.answered) == 7 == len(set(server.answered))  # no (prompt, image) generated twice
    assert len(by_pair(read_records(out))) == 7

    again = enrich_items(items, out, backend, text_fields=["title"], image_dir=images, batch_size=2)
    assert (again.resumed, again.done) == (7, 0) and len(server.answered) == 7


def test_truncated_last_line_is_removed_and_resumed(catalog, server, tmp_path, caplog):
    items, _ = catalog
    backend = OpenAIBackend(server.base_url, "m")
    out = tmp_path / "out.jsonl"
    enrich_items(items, out, backend, views=["text"], text_fields=["title"], max_items=2)
    complete = out.read_bytes()
    out.write_bytes(complete + b'{"item_id": "3", "view": "te')  # crash mid-write
    with caplog.at_level(logging.WARNING, logger="tfrec.semantics.enrich"):
        summary = enrich_items(items, out, backend, views=["text"], text_fields=["title"])
    assert "partially written last line" in caplog.text
    assert (summary.resumed, summary.done, summary.missing_text) == (2, 1, 1)
    assert out.read_bytes().startswith(complete)
    assert [r["item_id"] for r in read_records(out)] == ["1", "2", "3"]
    assert len(server.answered) == 3

    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(DataFormatError, match="out.jsonl: line 2: not an enrichment output line: not valid JSON"):
        OutputLog(out)


def test_resume_refuses_outputs_of_other_prompts_or_models(catalog, server, tmp_path):
    items, _ = catalog
    out = tmp_path / "out.jsonl"
    enrich_items(items, out, OpenAIBackend(server.base_url, "m"), views=["text"], max_items=1)
    with pytest.raises(ValueError, match="already holds view 'text' of item '1'"):
        enrich_items(items, out, OpenAIBackend(server.base_url, "m"), views=["text"],
                     templates=PromptTemplates(text="Describe {text}"))
    with pytest.raises(ValueError, match="write to a new output file"):
        enrich_items(items, out, OpenAIBackend(server.base_url, "other-model"), views=["text"])
    assert len(server.answered) == 1


def test_http_backend_retries_transient_errors(server, tmp_path, caplog):
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["Soap", "Comb", "Brush"]})
    server.script = [(500, {"error": "overloaded"}), None, (429, {"error": "slow down"}, {"Retry-After": "0"}),
                     None, ("sleep", 0.6)]
    backend = OpenAIBackend(server.base_url, "m", timeout=0.3)
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="tfrec.semantics.enrich"):
        summary = enrich_items(items, out, backend, views=["text"], **FAST_RETRY)
    assert summary.done == 3
    assert {r["item_id"]: r["text"] for r in read_records(out)} == {
        "a": "about: " + PromptTemplates().render("text", "Soap"),
        "b": "about: " + PromptTemplates().render("text", "Comb"),
        "c": "about: " + PromptTemplates().render("text", "Brush")}
    assert "HTTP 500" in caplog.text and "HTTP 429" in caplog.text and "timed out" in caplog.text
    assert caplog.text.count("retry 1/3") == 3  # each failure retried once, then answered
    assert len(server.requests) == 6


@pytest.mark.parametrize("step, message", [
    ((400, {"error": {"message": "bad image"}}), r"HTTP 400 Bad Request: .*bad image"),
    ((200, {"id": "x", "object": "chat.completion"}), r"malformed chat-completions response"),
    ((200, b"<html>proxy</html>"), r"malformed chat-completions response"),
])
def test_http_backend_permanent_errors_are_clear(server, tmp_path, step, message):
    items = pd.DataFrame({"item_id": ["a"], "title": ["Soap"]})
    server.script = [step]
    with pytest.raises(BackendError, match=message) as err:
        enrich_items(items, tmp_path / "out.jsonl", OpenAIBackend(server.base_url, "m"), views=["text"],
                     **FAST_RETRY)
    assert "item 'a', view 'text'" in str(err.value) and server.base_url in str(err.value)
    assert len(server.requests) == 1  # permanent: never retried


def test_http_backend_gives_up_on_unreachable_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    items = pd.DataFrame({"item_id": ["a"], "title": ["Soap"]})
    with pytest.raises(BackendError, match=r"ConnectionRefusedError.*gave up after 4 attempts"):
        enrich_items(items, tmp_path / "out.jsonl", OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m"),
                     views=["text"], **FAST_RETRY)
    with pytest.raises(ValueError, match="base_url must start with http"):
        OpenAIBackend("localhost:8000", "m")


def test_on_error_skip_counts_failures_and_a_rerun_fills_them(server, tmp_path):
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["Soap", "Comb", "Brush"]})
    server.script = [None, (400, {"error": "content policy"})]
    out = tmp_path / "out.jsonl"
    summary = enrich_items(items, out, OpenAIBackend(server.base_url, "m"), views=["text"], batch_size=1,
                           on_error="skip")
    assert (summary.done, summary.failed) == (2, 1)
    rerun = enrich_items(items, out, OpenAIBackend(server.base_url, "m"), views=["text"])
    assert (rerun.resumed, rerun.done) == (2, 1)
    assert sorted(r["item_id"] for r in read_records(out)) == ["a", "b", "c"]


def test_concurrent_batches_write_every_pair_once(server, tmp_path):
    items = pd.DataFrame({"item_id": [f"i{n}" for n in range(12)], "title": [f"Item {n}" for n in range(12)]})
    out = tmp_path / "out.jsonl"
    summary = enrich_items(items, out, OpenAIBackend(server.base_url, "m"), views=["text"], batch_size=2,
                           concurrency=3)
    assert summary.done == 12
    records = read_records(out)
    assert sorted(r["item_id"] for r in records) == sorted(items["item_id"])
    assert all(r["text"].endswith(f"Item {r['item_id'][1:]}" + PromptTemplates().text.split("{text}")[1])
               for r in records)


def test_image_inputs_are_resolved_or_rejected(tmp_path, server):
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["Soap", "Comb"], "image": ["a.png", ""]})
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) named in column 'image' not found"):
        enrich_items(items, tmp_path / "out.jsonl", OpenAIBackend(server.base_url, "m"), image_column="image",
                     image_dir=tmp_path)
    (tmp_path / "a.png").write_bytes(b"GIF is not what this is")
    with pytest.raises(ValueError, match=r"a.png: not a PNG, JPEG, GIF or WebP"):
        enrich_items(items, tmp_path / "out.jsonl", OpenAIBackend(server.base_url, "m"), image_column="image",
                     image_dir=tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes(2, 2, (1, 2, 3)))
    summary = enrich_items(items, tmp_path / "out.jsonl", OpenAIBackend(server.base_url, "m"),
                           image_column="image", image_dir=tmp_path, views=["image"])
    assert (summary.done, summary.missing_image) == (1, 1)


# --------------------------------------------------------------------- keras-hub

@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Tiny randomly initialised keras-hub models saved as presets: a vision Gemma3
    (SentencePiece vocabulary trained here) and a text-only GPT-2."""
    import keras
    import sentencepiece as spm
    from keras_hub.layers import Gemma3ImageConverter
    from keras_hub.models import (Gemma3Backbone, Gemma3CausalLM, Gemma3CausalLMPreprocessor, Gemma3Tokenizer,
                                  Gemma3VisionEncoder, GPT2Backbone, GPT2CausalLM, GPT2CausalLMPreprocessor,
                                  GPT2Tokenizer)

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("presets")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["describe the product shown in this image", "red nail polish shampoo",
                                "product information blue eye shadow"]),
        model_writer=proto, vocab_size=32, hard_vocab_limit=False, model_type="WORD", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>", unk_piece="<unk>", minloglevel=2,
        user_defined_symbols=["<img>", "<start_of_image>", "<end_of_image>"])
    tokenizer = Gemma3Tokenizer(proto=proto.getvalue())
    vision = Gemma3VisionEncoder(image_size=16, patch_size=4, num_heads=2, hidden_dim=8, num_layers=1,
                                 intermediate_dim=16, output_dim=8, pool_size=2)
    backbone = Gemma3Backbone(vocabulary_size=tokenizer.vocabulary_size(), image_size=16, num_layers=1,
                              num_query_heads=2, num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
                              head_dim=4, vision_encoder=vision)
    preprocessor = Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, image_converter=Gemma3ImageConverter(image_size=(16, 16), scale=1 / 127.5,
                                                                  offset=-1.0),
        sequence_length=64, max_images_per_prompt=1, num_vision_tokens_per_image=4)
    Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(root / "tiny-gemma3"))

    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()[1]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(byte_chars)}, "de": 257, "Ġd": 258}
    gpt2_tokenizer = GPT2Tokenizer(vocabulary=vocab, merges=["d e", "Ġ d"])
    gpt2 = GPT2Backbone(vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                        max_sequence_length=64)
    GPT2CausalLM(backbone=gpt2, preprocessor=GPT2CausalLMPreprocessor(gpt2_tokenizer, sequence_length=32)
                 ).save_to_preset(str(root / "tiny-gpt2"))
    return root


def test_keras_hub_vision_model_round_trip(presets, catalog, tmp_path):
    items, images = catalog
    backend = KerasHubBackend(presets / "tiny-gemma3", max_length=48)
    assert backend.supports_images and backend.model == "tiny-gemma3"
    out = tmp_path / "out.jsonl"
    summary = enrich_items(items, out, backend, text_fields=["title"], image_dir=images, batch_size=8)
    assert (summary.done, summary.missing_image, summary.missing_text) == (7, 4, 1)
    records = by_pair(read_records(out))
    assert {r["backend"] for r in records.values()} == {"keras_hub"}
    assert all(isinstance(r["text"], str) for r in records.values())

    # The image reaches the model: marker in the prompt, pixels resized to the model's size.
    request = MLLMRequest("1", "both", "Describe red nail polish", ItemImage(images / "1.png"))
    inputs = backend.model_inputs([request])
    assert inputs["prompts"] == ["<start_of_image>Describe red nail polish"]
    assert inputs["images"].shape == (1, 1, 16, 16, 3) and inputs["images"][0, 0, 8, 8].tolist() == pytest.approx([255, 0, 0])
    # Greedy decoding: a second run gives the same file.
    enrich_items(items, tmp_path / "again.jsonl", backend, text_fields=["title"], image_dir=images, batch_size=8)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_keras_hub_text_only_model(presets, catalog, tmp_path):
    items, images = catalog
    backend = KerasHubBackend(presets / "tiny-gpt2", max_length=32, model_name="gpt2-tiny")
    assert not backend.supports_images
    with pytest.raises(ValueError, match=r"takes no images.*views \['both', 'image'\]"):
        enrich_items(items, tmp_path / "out.jsonl", backend, image_dir=images)
    summary = enrich_items(items, tmp_path / "out.jsonl", backend, views=["text"], text_fields=["title"])
    assert summary.done == 3
    assert {r["model"] for r in read_records(tmp_path / "out.jsonl")} == {"gpt2-tiny"}
    with pytest.raises(FileNotFoundError, match="preset folder .* not found"):
        KerasHubBackend(tmp_path / "no-such-preset")
    with pytest.raises(ValueError, match="cannot load a keras-hub CausalLM"):
        KerasHubBackend(tmp_path)


# ------------------------------------------------------------------------- jsonl

def test_jsonl_import_normalises_and_reports(catalog, tmp_path):
    items, _ = catalog
    versions = {v: PromptTemplates().version(v) for v in ("image", "text", "both")}
    source = tmp_path / "precomputed.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in [
        {"item_id": "1", "view": "image", "text": "  A red bottle.  ", "model": "qwen-vl"},
        {"item_id": "1", "view": "text", "text": "Nail polish.", "prompt_version": versions["text"]},
        {"item_id": "4", "view": "both", "text": "Mystery item.", "model": "qwen-vl"},
        {"item_id": "99", "view": "text", "text": "Not in the catalog."},
    ]) + "\n\n")
    out = tmp_path / "out.jsonl"
    summary = enrich_items(items, out, JsonlImportBackend(source))
    assert (summary.done, summary.no_output, summary.missing_image, summary.unknown_item_ids) == (3, 9, 0, ["99"])
    records = by_pair(read_records(out))
    assert records["1", "image"] == {"item_id": "1", "view": "image", "text": "A red bottle.", "backend": "jsonl",
                                     "model": "qwen-vl", "prompt_version": versions["image"]}
    assert set(records) == {("1", "image"), ("1", "text"), ("4", "both")}

    stale = tmp_path / "stale.jsonl"
    stale.write_text(json.dumps({"item_id": "1", "view": "text", "text": "x", "prompt_version": "0123abcd0123"}))
    with pytest.raises(BackendError, match=r"stale.jsonl: line 1: prompt_version '0123abcd0123' differs"):
        enrich_items(items, tmp_path / "out2.jsonl", JsonlImportBackend(stale))


def test_jsonl_import_rejects_bad_lines_with_line_numbers(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join([
        json.dumps({"item_id": "1", "view": "text", "text": "ok"}),
        "{broken",
        json.dumps({"item_id": "2", "view": "caption", "text": "x"}),
        json.dumps({"item_id": "3", "view": "text"}),
        json.dumps({"item_id": "1", "view": "text", "text": "again"}),
        json.dumps(["not", "an", "object"]),
    ]) + "\n")
    with pytest.raises(DataFormatError) as err:
        JsonlImportBackend(source)
    message = str(err.value)
    for expected in ("line 2: not valid JSON", "line 3: unknown view 'caption'", "line 4: 'text' missing",
                     "line 5: duplicate (item '1', view 'text'), first at line 1", "line 6: expected a JSON object"):
        assert expected in message
    assert message.startswith(str(source))
    with pytest.raises(FileNotFoundError, match="import file .* not found"):
        JsonlImportBackend(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- CLI

def test_cli_enrich_import_and_errors(catalog, tmp_path, capsys):
    items, images = catalog
    source = tmp_path / "pre.jsonl"
    source.write_text(json.dumps({"item_id": "2", "view": "text", "text": "A shampoo."}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["enrich", "--items", str(items), "--out", str(out), "--backend", "jsonl",
                 "--import", str(source), "--views", "text"]) == 0
    assert "4 items, 4 (item, view) pairs: done 1" in capsys.readouterr().out
    assert read_records(out)[0]["text"] == "A shampoo."

    for argv, message in [
        (["--backend", "openai", "--items", str(items)], "--backend openai needs --base-url, --model"),
        (["--backend", "jsonl"], "pass exactly one of --items FILE or --dataset NAME"),
        (["--backend", "jsonl", "--dataset", "amazon-sports"], "has no item table"),
        (["--backend", "keras_hub", "--items", str(items), "--preset", str(tmp_path / "nope")], "not found"),
        (["--backend", "jsonl", "--items", str(items), "--import", str(source), "--text-fields", "color"],
         "text field(s) ['color'] not usable"),
    ]:
        assert main(["enrich", "--out", str(tmp_path / "x.jsonl"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.skipif(not (DEFAULT_DATA_ROOT / "amazon-beauty").is_dir(), reason="bundled amazon-beauty not available")
def test_cli_enrich_beauty_titles_over_http(server, tmp_path, capsys):
    out = tmp_path / "beauty.jsonl"
    assert main(["enrich", "--dataset", "amazon-beauty", "--max-items", "3", "--out", str(out), "--backend",
                 "openai", "--base-url", server.base_url, "--model", "m", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "3 items, 9 (item, view) pairs: done 3" in captured.out and "missing_image 6" in captured.out
    assert "enrich: 3/3 requests (100%)" in captured.err
    records = read_records(out)
    assert [r["item_id"] for r in records] == ["1", "2", "3"]
    assert "OPI Nail Lacquer, Simmer and Shimmer" in records[0]["text"]  # the title, not the ASIN
    assert "B004756YJA" not in records[0]["text"]
    digest = hashlib.sha256(PromptTemplates().text.encode()).hexdigest()[:12]
    assert {r["prompt_version"] for r in records} == {digest}
