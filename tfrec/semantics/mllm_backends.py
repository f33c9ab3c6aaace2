"""MLLM backends of the enrichment job: one interface, three implementations.

`MLLMBackend.generate(requests) -> list[str | None]` answers a batch of
`MLLMRequest`s (item id, view, rendered prompt, optional image), in order.

- `KerasHubBackend` (`keras_hub`): a keras-hub `CausalLM` loaded from a *local*
  preset folder (never downloaded). Any causal LM answers text prompts; images are
  passed to vision-capable models whose prompt format is known here (Gemma3: the
  `<start_of_image>` marker before the prompt, images resized to the model's
  image size). One batch = one `generate()` call per group (with / without image).
- `OpenAIBackend` (`openai`): an OpenAI-compatible `POST {base_url}/chat/completions`
  endpoint (vLLM, Ollama, TGI serving e.g. Qwen2.5-VL), standard library only.
  Images go as `data:` URLs (base64). One HTTP call per request.
- `JsonlImportBackend` (`jsonl`): precomputed outputs, one JSON object per line
  with `item_id`, `view`, `text` (optional `model`, `prompt_version`); validated on
  load, bad lines reported with file and line number.

Errors: `BackendError` (a `ValueError`) is permanent (HTTP 4xx, malformed
response, bad import file); `TransientBackendError` (HTTP 408/429/5xx, timeouts,
connection errors) is retried by the job with exponential backoff.

Example:

>>> import json, tempfile
>>> path = Path(tempfile.mkdtemp()) / "outputs.jsonl"
>>> _ = path.write_text(json.dumps({"item_id": "1", "view": "text", "text": "A red nail polish."}))
>>> backend = JsonlImportBackend(path)
>>> backend.generate([MLLMRequest("1", "text", "Describe ...")])
['A red nail polish.']
"""

from __future__ import annotations

import abc
import dataclasses
import http.client
import json
import math
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar, Optional, Sequence

from tfrec.data.readers import DataFormatError
from tfrec.semantics.prompts import VIEWS, ItemImage

_TRANSIENT_HTTP = {408, 425, 429}
OUTPUT_KEYS = ("item_id", "view", "text", "backend", "model", "prompt_version")  # one output line


def parse_output_line(raw, required=OUTPUT_KEYS[:3]) -> dict:
    """One JSONL line of enrichment outputs as a dict.

    Keys in `required` must be present; every key of `OUTPUT_KEYS` present must be
    a string; `item_id` non-empty, `view` one of `VIEWS`. Raises `ValueError`
    naming the problem (callers add file and line)."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in OUTPUT_KEYS:
        if key in required and key not in record:
            raise ValueError(f"{key!r} missing")
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{key!r} is not a string ({record[key]!r})")
    if not record["item_id"].strip():
        raise ValueError("empty item_id")
    if record["view"] not in VIEWS:
        raise ValueError(f"unknown view {record['view']!r}; expected one of {list(VIEWS)}")
    return record


class BackendError(ValueError):
    """A permanent backend failure (bad request, malformed answer, bad import file)."""


class TransientBackendError(BackendError):
    """A failure worth retrying (HTTP 408/429/5xx, timeout, connection error).

    Args:
        message: str.
        retry_after: float or None. Seconds the server asked to wait (`Retry-After`).
    """

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class MLLMRequest:
    """One (item, view) prompt.

    Args:
        item_id: str. Item token.
        view: str. `"image"`, `"text"` or `"both"`.
        prompt: str. The rendered prompt.
        image: ItemImage or None. Sent for the `image` and `both` views.
        prompt_version: str. Version of the template the prompt was rendered from.
    """

    item_id: str
    view: str
    prompt: str
    image: Optional[ItemImage] = None
    prompt_version: str = ""


class MLLMBackend(abc.ABC):
    """Interface of an enrichment backend.

    Class attributes tell the job how to drive it: `native_batch` (False: the job
    sends one request per `generate` call, retried on its own), `max_concurrency`
    (None: no limit), `supports_images`, and `precomputed` (True: outputs exist
    already, so views are not skipped for a missing local image or text).
    """

    name: ClassVar[str] = ""
    native_batch: ClassVar[bool] = True
    max_concurrency: ClassVar[Optional[int]] = None
    precomputed: ClassVar[bool] = False
    supports_images: bool = True
    model: str = ""

    @abc.abstractmethod
    def generate(self, requests: Sequence[MLLMRequest]) -> list[Optional[str]]:
        """One output per request, in order; None = no output for that request."""

    def available_item_ids(self) -> Optional[set]:
        """Item ids the backend holds outputs for (precomputed backends), else None."""
        return None


# ----------------------------------------------------------------------- keras-hub

# Vision-capable keras-hub preprocessors whose image prompt format is known:
# class name -> marker put before the prompt (one image per prompt).
_IMAGE_MARKERS = {"Gemma3CausalLMPreprocessor": "<start_of_image>"}


class KerasHubBackend(MLLMBackend):
    """A keras-hub `CausalLM` from a local preset folder.

    Args:
        preset: str or Path. Local folder written by `save_to_preset` (or a
            Hugging Face folder keras-hub converts); nothing is downloaded.
        max_length: int or None. Total sequence length (prompt + answer, including
            image tokens); None = the preprocessor's `sequence_length`.
        sampler: str. keras-hub sampler name; `"greedy"` (default) is deterministic.
        prompt_format: str. Wraps each prompt, e.g. a chat template
            `"<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n"`;
            must contain `{prompt}`. Default `"{prompt}"`.
        model_name: str or None. Name recorded in the output; default: the folder name.
    """

    name = "keras_hub"
    max_concurrency = 1  # one model, one generate() at a time

    def __init__(self, preset, *, max_length=None, sampler="greedy", prompt_format="{prompt}",
                 model_name=None):
        preset = Path(preset)
        if not preset.is_dir():
            raise FileNotFoundError(f"keras-hub preset folder {preset} not found (presets are "
                                    f"loaded from a local folder; nothing is downloaded)")
        if "{prompt}" not in prompt_format:
            raise ValueError(f"prompt_format must contain {{prompt}}, got {prompt_format!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
        import keras_hub

        try:
            self.lm = keras_hub.models.CausalLM.from_preset(str(preset))
        except Exception as err:  # keras-hub raises many types for unusable folders
            raise ValueError(f"cannot load a keras-hub CausalLM from {preset}: {err}") from None
        if self.lm.preprocessor is None:
            raise ValueError(f"the keras-hub model in {preset} has no preprocessor (tokenizer)")
        self.lm.compile(sampler=sampler)
        self.preset, self.max_length, self.prompt_format = preset, max_length, prompt_format
        self.model = model_name or preset.resolve().name
        preprocessor = self.lm.preprocessor
        self.image_marker = _IMAGE_MARKERS.get(type(preprocessor).__name__)
        self.supports_images = (self.image_marker is not None
                                and getattr(preprocessor, "image_converter", None) is not None
                                and not getattr(preprocessor, "text_only_model", False))

    def model_inputs(self, requests: Sequence[MLLMRequest]):
        """The `generate()` input of requests that all have an image (a dict of
        `prompts` and `images`) or none has (a list of prompts)."""
        with_image = {r.image is not None for r in requests}
        if len(with_image) != 1:
            raise ValueError("model_inputs takes requests that all have an image or none has")
        if not with_image.pop():
            return [self.prompt_format.replace("{prompt}", r.prompt) for r in requests]
        if not self.supports_images:
            raise BackendError(f"the keras-hub model {type(self.lm).__name__} in {self.preset} takes "
                               f"no images (item {requests[0].item_id!r}, view {requests[0].view!r}); "
                               f"image prompts are supported for {sorted(_IMAGE_MARKERS)}")
        import numpy as np
        import tensorflow as tf

        height, width = self.lm.preprocessor.image_converter.image_size
        images = []
        for request in requests:
            data, _ = request.image.read()
            pixels = tf.io.decode_image(data, channels=3, expand_animations=False)  # (h, w, 3)
            images.append(tf.image.resize(tf.cast(pixels, "float32"), (height, width)).numpy())
        prompts = [self.prompt_format.replace("{prompt}", self.image_marker + r.prompt) for r in requests]
        return {"prompts": prompts, "images": np.stack(images)[:, None]}  # (batch, 1, h, w, 3)

    def generate(self, requests):
        outputs = [None] * len(requests)
        for has_image in (False, True):
            positions = [i for i, r in enumerate(requests) if (r.image is not None) == has_image]
            if not positions:
                continue
            # Pad the group to a power of two (repeating its last request) so that
            # generate() is traced for a few batch shapes only; extra answers are dropped.
            group = [requests[i] for i in positions]
            group += group[-1:] * (2 ** math.ceil(math.log2(len(group))) - len(group))
            texts = self.lm.generate(self.model_inputs(group), max_length=self.max_length, strip_prompt=True)
            for i, text in zip(positions, texts):
                outputs[i] = (text.decode("utf-8") if isinstance(text, bytes) else str(text)).strip()
        return outputs


# -------------------------------------------------------------------------- openai

class OpenAIBackend(MLLMBackend):
    """An OpenAI-compatible chat-completions endpoint (standard library only).

    Args:
        base_url: str. E.g. `"http://localhost:8000/v1"`; requests go to
            `{base_url}/chat/completions`.
        model: str. Model name sent in every request and recorded in the output.
        api_key_env: str. Environment variable holding the API key, sent as
            `Authorization: Bearer ...` when set. Default `"OPENAI_API_KEY"`.
        timeout: float. Seconds per HTTP request. Default 60.
        max_tokens: int. Answer length limit. Default 256.
        temperature: float. Default 0.0 (as deterministic as the server allows).
        system_prompt: str or None. Optional system message.
    """

    name = "openai"
    native_batch = False

    def __init__(self, base_url, model, *, api_key_env="OPENAI_API_KEY", timeout=60.0, max_tokens=256,
                 temperature=0.0, system_prompt=None):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("the openai backend needs a model name (--model)")
        if timeout <= 0 or max_tokens < 1:
            raise ValueError(f"timeout must be > 0 and max_tokens >= 1, got {timeout}, {max_tokens}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_tokens, self.temperature, self.system_prompt = max_tokens, temperature, system_prompt

    def payload(self, request: MLLMRequest) -> dict:
        """The JSON body sent for `request` (image first, then text, as Qwen2.5-VL expects)."""
        content = []
        if request.image is not None:
            content.append({"type": "image_url", "image_url": {"url": request.image.data_url()}})
        content.append({"type": "text", "text": request.prompt})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def generate(self, requests):
        return [self._complete(request) for request in requests]

    def _complete(self, request: MLLMRequest) -> str:
        where = f"{self.url} (item {request.item_id!r}, view {request.view!r})"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = json.dumps(self.payload(request)).encode("utf-8")
        http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            message = f"{where}: HTTP {err.code} {err.reason}: {detail}"
            if err.code >= 500 or err.code in _TRANSIENT_HTTP:
                retry_after = _seconds(err.headers.get("Retry-After") if err.headers is not None else None)
                raise TransientBackendError(message, retry_after) from None
            raise BackendError(message) from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise TransientBackendError(f"{where}: {type(reason).__name__}: {reason}") from None
        return _completion_text(raw, where)


def _seconds(value) -> Optional[float]:
    """A `Retry-After` header in seconds (HTTP dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _completion_text(raw: bytes, where: str) -> str:
    """`choices[0].message.content` of a chat-completions answer (str or text parts)."""
    try:
        answer = json.loads(raw)
        content = answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BackendError(f"{where}: malformed chat-completions response (expected "
                           f"choices[0].message.content): {raw[:300]!r}") from None
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise BackendError(f"{where}: message content is {type(content).__name__}, expected text")
    return content.strip()


# --------------------------------------------------------------------------- jsonl

class JsonlImportBackend(MLLMBackend):
    """Precomputed outputs from a JSONL file (e.g. produced elsewhere, or an old run).

    Each line: `{"item_id": str, "view": "image"|"text"|"both", "text": str}`, optionally
    `model` and `prompt_version` (lines of this job's own output qualify). Invalid
    JSON, missing or non-string fields, unknown views and duplicate (item, view)
    pairs raise one `DataFormatError` listing every bad line. A line's
    `prompt_version`, when given, must match the template of this run.

    Args:
        path: str or Path. The file to import.
        model: str or None. Model name recorded in the output; default: the
            `model` named in the file (all lines must agree), else `"imported"`.
    """

    name = "jsonl"
    precomputed = True

    def __init__(self, path, *, model=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"import file {self.path} not found")
        self.outputs = {}  # (item_id, view) -> (text, prompt_version or None, line)
        problems, models = [], {}
        with self.path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                problem = self._parse(raw, line_no, models)
                if problem:
                    problems.append(f"line {line_no}: {problem}")
        if problems:
            more = f"; ... ({len(problems)} bad lines)" if len(problems) > 10 else ""
            raise DataFormatError(self.path, "; ".join(problems[:10]) + more)
        if not self.outputs:
            raise DataFormatError(self.path, "no outputs (empty file)")
        if model is None and len(models) > 1:
            named = ", ".join(f"{name!r} (line {line})" for name, line in models.items())
            raise DataFormatError(self.path, f"lines name several models: {named}; import one model "
                                             f"per file or pass model=")
        self.model = model or next(iter(models), "imported")

    def _parse(self, raw: bytes, line_no: int, models: dict) -> Optional[str]:
        try:
            record = parse_output_line(raw)
        except ValueError as err:
            return str(err)
        item_id, view = record["item_id"].strip(), record["view"]
        if (item_id, view) in self.outputs:
            first = self.outputs[item_id, view][2]
            return f"duplicate (item {item_id!r}, view {view!r}), first at line {first}"
        if "model" in record:
            models.setdefault(record["model"], line_no)
        self.outputs[item_id, view] = (record["text"].strip(), record.get("prompt_version"), line_no)
        return None

    def available_item_ids(self):
        return {item_id for item_id, _ in self.outputs}

    def generate(self, requests):
        outputs = []
        for request in requests:
            found = self.outputs.get((request.item_id, request.view))
            if found and found[1] is not None and request.prompt_version and found[1] != request.prompt_version:
                raise BackendError(f"{self.path}: line {found[2]}: prompt_version {found[1]!r} differs from "
                                   f"this run's {request.prompt_version!r} for view {request.view!r}; pass "
                                   f"the templates the outputs were made with")
            outputs.append(found[0] if found else None)
        return outputs


BACKENDS = {cls.name: cls for cls in (KerasHubBackend, OpenAIBackend, JsonlImportBackend)}
