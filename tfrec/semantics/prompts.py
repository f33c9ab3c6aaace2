"""What the MLLM enrichment job asks: prompt templates (one per view) and item inputs.

DMESR asks a multimodal LLM to describe every item three times: from its image
only (`image`), from its text only (`text`) and from both (`both`). A template is
plain text; `{text}` marks where the item's text goes. The `image` template must
not contain `{text}` (it is the image-only view); `text` and `both` must.

Every template has a `prompt_version`: the first 12 hex digits of the SHA-256 of
the template text. The enrichment output records it on every line, so outputs of
different templates are never mixed up.

Item inputs (`load_item_inputs`): an item table (`item_id` + text columns, read
with `tfrec.data.readers.read_items`, or a bundled dataset via `dataset_items`)
gives each item its text (one field as is, several as `field: value` lines) and,
optionally, an image: a column of paths, or `<item_id>.<jpg|jpeg|png|webp|gif>`
in an image folder. Images are read lazily as bytes (`ItemImage`).

Example:

>>> templates = PromptTemplates()
>>> templates.render("text", "OPI Nail Lacquer, Red").startswith("Product information:")
True
>>> len(templates.version("image"))
12
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd

from tfrec.data.readers import DATASETS, DEFAULT_DATA_ROOT, read_items

VIEWS = ("image", "text", "both")
TEXT_PLACEHOLDER = "{text}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # preference order in an image folder
# Text columns of the bundled item tables (ids such as `asin` are not text).
DATASET_TEXT_FIELDS = {"amazon-beauty": ("title",), "movielens-1m-subset": ("title", "genres"),
                       "movielens-100k": ("movie_title", "release_year", "class")}

DEFAULT_TEMPLATES = {
    "image": (
        "Describe the product shown in this image: what kind of product it is, its "
        "appearance (colour, shape, packaging, material) and what it is used for. "
        "Answer in one short paragraph."
    ),
    "text": (
        "Product information:\n{text}\n\nDescribe this product from its information: "
        "what kind of product it is, its key attributes and what it is used for. "
        "Answer in one short paragraph."
    ),
    "both": (
        "Product information:\n{text}\n\nDescribe this product using both its image and "
        "its information: what kind of product it is, its appearance, its key attributes "
        "and what it is used for. Answer in one short paragraph."
    ),
}


def prompt_version(template: str) -> str:
    """First 12 hex digits of the SHA-256 of `template` (UTF-8)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The three prompt templates, validated.

    Args:
        image: str. Image-only prompt; must not contain `{text}`.
        text: str. Text-only prompt; must contain `{text}`.
        both: str. Image + text prompt; must contain `{text}`.
    """

    image: str = DEFAULT_TEMPLATES["image"]
    text: str = DEFAULT_TEMPLATES["text"]
    both: str = DEFAULT_TEMPLATES["both"]

    def __post_init__(self):
        for view in VIEWS:
            template = getattr(self, view)
            if not isinstance(template, str) or not template.strip():
                raise ValueError(f"prompt template {view!r} must be a non-empty string, got {template!r}")
            has_text = TEXT_PLACEHOLDER in template
            if view == "image" and has_text:
                raise ValueError(f"the 'image' prompt template must not contain {TEXT_PLACEHOLDER} "
                                 f"(it is the image-only view): {template!r}")
            if view != "image" and not has_text:
                raise ValueError(f"the {view!r} prompt template must contain {TEXT_PLACEHOLDER} "
                                 f"where the item text goes: {template!r}")

    @classmethod
    def from_mapping(cls, templates: Mapping[str, str], source: str = "templates") -> "PromptTemplates":
        """Build from `{view: template}`; missing views keep their defaults."""
        if not isinstance(templates, Mapping):
            raise ValueError(f"{source}: expected a mapping of view -> template, "
                             f"got {type(templates).__name__}")
        unknown = sorted(set(templates) - set(VIEWS))
        if unknown:
            raise ValueError(f"{source}: unknown view(s) {unknown}; expected some of {list(VIEWS)}")
        return cls(**dict(templates))

    @classmethod
    def from_file(cls, path) -> "PromptTemplates":
        """Read `{view: template}` from a YAML or JSON file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt template file {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML/JSON ({err})") from None
        return cls.from_mapping(data or {}, str(path))

    def template(self, view: str) -> str:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; expected one of {list(VIEWS)}")
        return getattr(self, view)

    def version(self, view: str) -> str:
        """`prompt_version` of the template of `view`."""
        return prompt_version(self.template(view))

    def render(self, view: str, text: Optional[str] = None) -> str:
        """The prompt of `view` for an item whose text is `text` (ignored for `image`)."""
        template = self.template(view)
        if view == "image":
            return template
        if not text:
            raise ValueError(f"view {view!r} needs the item text, got {text!r}")
        return template.replace(TEXT_PLACEHOLDER, text)

    def to_dict(self) -> dict:
        """`{view: {"template": ..., "prompt_version": ...}}` (for manifests)."""
        return {view: {"template": self.template(view), "prompt_version": self.version(view)}
                for view in VIEWS}


# -------------------------------------------------------------------- item inputs

_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                     (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


@dataclasses.dataclass(frozen=True)
class ItemImage:
    """An item image on disk, read lazily (only when a backend sends it)."""

    path: Path

    def read(self) -> tuple[bytes, str]:
        """`(bytes, mime type)`; the type is sniffed from the file's magic bytes."""
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"item image {self.path} not found") from None
        for signature, mime in _IMAGE_SIGNATURES:
            if data.startswith(signature):
                return data, mime
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return data, "image/webp"
        raise ValueError(f"item image {self.path}: not a PNG, JPEG, GIF or WebP file "
                         f"(starts with {data[:8]!r})")

    def data_url(self) -> str:
        data, mime = self.read()
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclasses.dataclass
class ItemInputs:
    """Per item (table order): id, text ("" = none) and image (None = none)."""

    item_ids: list
    texts: list
    images: list
    text_fields: list
    source: str


def load_item_inputs(items, *, text_fields=None, image_column=None, image_dir=None,
                     max_items=None) -> ItemInputs:
    """Item ids, texts and images of an item table.

    Args:
        items: DataFrame with `item_id` and text columns, or a path read with
            `tfrec.data.readers.read_items`.
        text_fields: columns forming the text; None = every column but `item_id`
            and `image_column`.
        image_column: str or None. Column of image paths (relative ones resolve in
            `image_dir`); an empty value means no image, a missing file is an error.
        image_dir: str, Path or None. Without `image_column`: images named
            `<item_id>.<jpg|jpeg|png|webp|gif>`.
        max_items: int or None. Only the first `max_items` items.
    """
    frame, source = _items_frame(items)
    if max_items is not None:
        frame = frame.iloc[:max_items]
    texts, text_fields = _texts(frame, text_fields, image_column)
    return ItemInputs(frame["item_id"].tolist(), texts, _images(frame, image_column, image_dir),
                      text_fields, source)


def dataset_items(name, data_root=None) -> tuple[pd.DataFrame, tuple, str]:
    """`(items, text_fields, source path)` of a bundled dataset's item table."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if not spec.items:
        raise ValueError(f"dataset {name!r} has no item table (no item text); pass --items FILE")
    path = Path(DEFAULT_DATA_ROOT if data_root is None else data_root) / name / spec.items
    return read_items(path, encoding=spec.encoding), DATASET_TEXT_FIELDS.get(name), str(path)


def _items_frame(items) -> tuple[pd.DataFrame, str]:
    if isinstance(items, pd.DataFrame):
        if "item_id" not in items.columns:
            raise ValueError(f"items need an 'item_id' column; found {list(items.columns)}")
        frame = items.reset_index(drop=True).copy()
        frame["item_id"] = frame["item_id"].astype(str).str.strip()
        duplicated = frame["item_id"].duplicated()
        if duplicated.any():
            raise ValueError(f"duplicate item_id {frame['item_id'][duplicated].iloc[0]!r} in items")
        return frame, "<DataFrame>"
    return read_items(items), str(items)


def _images(frame, image_column, image_dir) -> list:
    """One `ItemImage` or None per row; a named but missing file is an error."""
    image_dir = None if image_dir is None else Path(image_dir)
    if image_dir is not None and not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found")
    if image_column is not None:
        if image_column not in frame.columns:
            raise ValueError(f"image column {image_column!r} not in the items; found {list(frame.columns)}")
        paths = [None if pd.isna(v) or not str(v).strip() else Path(str(v).strip())
                 for v in frame[image_column]]
        paths = [p if p is None or p.is_absolute() or image_dir is None else image_dir / p for p in paths]
        missing = [(i, p) for i, p in zip(frame["item_id"], paths) if p is not None and not p.is_file()]
        if missing:
            shown = ", ".join(f"item {i!r}: {p}" for i, p in missing[:5])
            raise FileNotFoundError(f"{len(missing)} image file(s) named in column {image_column!r} "
                                    f"not found ({shown})")
        return [None if p is None else ItemImage(p) for p in paths]
    if image_dir is None:
        return [None] * len(frame)
    found = {}  # item_id -> (suffix rank, path)
    for path in image_dir.iterdir():
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES and path.is_file():
            rank = IMAGE_SUFFIXES.index(suffix)
            if path.stem not in found or rank < found[path.stem][0]:
                found[path.stem] = (rank, path)
    return [ItemImage(found[i][1]) if i in found else None for i in frame["item_id"]]


def _texts(frame, text_fields, image_column) -> tuple[list[str], list[str]]:
    """(item text per row, fields used): one field as is, several as `field: value`
    lines, empty values left out."""
    if text_fields is None:
        text_fields = [c for c in frame.columns if c not in ("item_id", image_column)]
    text_fields = list(text_fields)
    unknown = [f for f in text_fields if f not in frame.columns]
    if unknown or not text_fields:
        raise ValueError(f"text field(s) {unknown or text_fields} not usable; "
                         f"item columns: {list(frame.columns)}")
    columns = [frame[f].fillna("").astype(str).str.strip().tolist() for f in text_fields]
    if len(text_fields) == 1:
        return columns[0], text_fields
    return ["\n".join(f"{f.replace('_', ' ')}: {v}" for f, v in zip(text_fields, values) if v)
            for values in zip(*columns)], text_fields


