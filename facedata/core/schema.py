"""What a sample's record holds, declared once: its statuses and its columns.

Every row that enters a shard leaves it with a `status`: `ok`, or the first reason a step dropped
it. `Status` names each reason with the step that gives it and what it means (the dataset card
fills `{a.b}` from the run config). `COLUMNS` names each column a built-in step writes, with its
Arrow type and what it holds; the steps' Arrow schemas, the dataset card's field list and the
README's status list come from here (tests/test_schema.py checks the README and the published
features against it). A user's step (facedata/core/step.py) declares its own reasons and columns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pyarrow as pa

from facedata.attributes.vocabulary import ATTRIBUTES

STEPS = ("input", "download", "image", "faces", "identity", "captions")


class Status(str, enum.Enum):
    """A sample's status: the value is what records hold; `step` gives it, `description` says why."""

    step: str
    description: str

    def __new__(cls, value: str, step: str, description: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.step = step
        member.description = description
        return member

    OK = "ok", "", "kept by every step"
    # Found while reading the input.
    MISSING_URL = "missing_url", "input", "no URL in the input row"
    INVALID_URL = "invalid_url", "input", "URL not parseable, or not http(s)"
    DUPLICATE_URL = "duplicate_url", "input", "URL already seen earlier in the input"
    FILE_NOT_FOUND = "file_not_found", "input", "the local file the input names is missing"
    # Found while downloading. HTTP errors are "http_<code>" (records.http_status).
    TIMEOUT = "timeout", "download", "no answer within {download.timeout} s (download.retries = {download.retries})"
    CONNECTION_ERROR = "connection_error", "download", "could not connect to the server"
    TOO_MANY_REDIRECTS = "too_many_redirects", "download", "more than {download.max_redirects} redirects"
    TOO_LARGE = "too_large", "download", "body over {download.max_bytes} bytes"
    TRUNCATED = "truncated", "download", "body shorter than its Content-Length"
    NOT_IMAGE = "not_image", "download", "content type or magic bytes say it is not an image"
    OPTED_OUT = "opted_out", "download", "the site opted out of AI training (X-Robots-Tag: noai / noimageai)"
    # Found while decoding and filtering the image.
    DECODE_ERROR = "decode_error", "image", "the image could not be decoded"
    DECOMPRESSION_BOMB = "decompression_bomb", "image", "over {image.max_pixels} pixels"
    TOO_SMALL = "too_small", "image", "shorter side under {image.min_side} px"
    BAD_ASPECT = "bad_aspect", "image", "aspect ratio over {image.max_aspect}"
    # Found by the face step in images that passed every step before it.
    NO_FACE = "no_face", "faces", "no face scored at least {faces.filter.min_score}"
    TOO_FEW_FACES = "too_few_faces", "faces", "fewer than {faces.filter.min_faces} faces"
    TOO_MANY_FACES = "too_many_faces", "faces", "more than {faces.filter.max_faces} faces"
    FACE_TOO_SMALL = "face_too_small", "faces", "primary face's shorter side under {faces.filter.min_face_side} px"
    FACE_RATIO_TOO_SMALL = ("face_ratio_too_small", "faces",
                            "primary face under {faces.filter.min_area_ratio} of the image's area")
    FACE_POSE = "face_pose", "faces", "primary face turned more than {faces.filter.max_abs_yaw} degrees (|yaw|)"
    # Found by the identity step across all shards.
    OPTOUT_MATCH = ("optout_match", "identity",
                    "a face matched the opt-out gallery (cosine similarity at least {identity.optout_threshold})")
    NEAR_DUPLICATE = ("near_duplicate", "identity",
                      "another image of the same face (cosine at least {identity.near_duplicate_threshold}) was kept "
                      "instead: better resolution, then sharpness, then detector score")
    IDENTITY_OUTLIER = ("identity_outlier", "identity",
                        "primary face far from its identity's centre (similarity under {identity.outlier_threshold})")
    IDENTITY_CAP = ("identity_cap", "identity",
                    "over {identity.max_images_per_identity} images of its identity (the best were kept)")
    SINGLETON_IDENTITY = "singleton_identity", "identity", "the only image of its identity"
    # Found by the caption step.
    TOO_FEW_ATTRIBUTES = ("too_few_attributes", "captions",
                          "primary face had fewer than {attributes.min_valid_labels} confident attribute labels")
    LOW_RELEVANCE = ("low_relevance", "captions",
                     "image and text scored under {relevance.min_score} under the FLIP checkpoint (CLIP score)")


# ------------------------------------------------------------------------------------------- columns

FACE_TYPE = pa.struct([
    ("bbox", pa.list_(pa.float32())),  # x1, y1, x2, y2 in the stored image's pixels
    ("kps", pa.list_(pa.float32())),  # 5 points flattened: x, y of eyes, nose, mouth corners
    ("score", pa.float32()),
    ("side", pa.float32()),
    ("area_ratio", pa.float32()),
    ("yaw", pa.float32()),
    ("pitch", pa.float32()),
    ("roll", pa.float32()),
    ("sharpness", pa.float32()),  # on the aligned crop (the embedded one, for embedded faces)
    ("primary", pa.bool_()),
    ("embedding_index", pa.int64()),  # row in NNNNN.embeddings.npy; null for a face not embedded
])
_ARROW_KIND = {"number": pa.float32(), "bool": pa.bool_(), "category": pa.string()}
VALUES_TYPE = pa.struct([(name, _ARROW_KIND[spec.kind]) for name, spec in ATTRIBUTES.items()])
CONFIDENCES_TYPE = pa.struct([(name, pa.float32()) for name in ATTRIBUTES])
FACE_ATTRIBUTES_TYPE = pa.struct([
    ("face", pa.int32()),  # index into the record's `faces`
    ("values", VALUES_TYPE),  # null where the attribute was not confident (or not asked for)
    ("confidences", CONFIDENCES_TYPE),
])


@dataclass(frozen=True)
class Column:
    name: str
    step: str  # the step that writes it
    type: pa.DataType
    description: str


COLUMNS: tuple[Column, ...] = (
    Column("key", "input", pa.string(), "stable sample id (input order)"),
    Column("url", "input", pa.string(), "where the image was downloaded from"),
    Column("caption", "input", pa.string(),
           "the web caption (alt text) as found next to the image: unedited, may name people"),
    Column("path", "input", pa.string(), "local file the input named (local inputs only)"),
    Column("status", "download", pa.string(),
           "`ok` for every published sample (the first reason a sample was dropped otherwise)"),
    Column("error", "download", pa.string(), "detail of a drop reason (null for published samples)"),
    Column("http_status", "download", pa.int64(), "HTTP status of the download"),
    Column("attempts", "download", pa.int64(), "download attempts made"),
    Column("download_seconds", "download", pa.float64(), "seconds the download took"),
    Column("content_type", "download", pa.string(), "Content-Type the server sent"),
    Column("bytes_downloaded", "download", pa.int64(), "bytes downloaded"),
    Column("sha256", "download", pa.string(), "SHA-256 of the published image bytes"),
    Column("orig_width", "download", pa.int64(), "width as downloaded, before any resize"),
    Column("orig_height", "download", pa.int64(), "height as downloaded, before any resize"),
    Column("width", "download", pa.int64(), "stored image width in pixels"),
    Column("height", "download", pa.int64(), "stored image height in pixels"),
    Column("ext", "download", pa.string(), "image file type (jpg, png, webp)"),
    Column("face_status", "faces", pa.string(), "status after the face step: ok or the reason it dropped the image"),
    Column("n_faces", "faces", pa.int32(), "faces detected (scoring at least faces.filter.min_score)"),
    Column("faces", "faces", pa.list_(FACE_TYPE),
           "per face: bbox, 5 landmarks, detector score, size, yaw/pitch/roll, sharpness, primary flag, embedding row"),
    Column("primary_face", "faces", pa.int32(), "index in `faces` of the primary (largest, most central) face"),
    Column("face_detector", "faces", pa.string(), "face detector that found the faces"),
    Column("face_embedder", "faces", pa.string(), "face embedding model used for identity clustering"),
    Column("identity_id", "identity", pa.int64(), "identity cluster of the primary face (a cluster number, not a name)"),
    Column("identity_size", "identity", pa.int64(), "images in the primary face's identity cluster"),
    Column("identity_centre_sim", "identity", pa.float32(), "cosine similarity of the primary face to its cluster's centre"),
    Column("identity_outlier", "identity", pa.bool_(), "whether the primary face is far from its identity's centre"),
    Column("face_identity_ids", "identity", pa.list_(pa.int64()), "identity cluster of each embedded face"),
    Column("split", "identity", pa.string(), "train / validation / test, identity-disjoint by the primary face's cluster"),
    Column("identity_status", "identity", pa.string(), "status after the identity step"),
    Column("face_caption", "captions", pa.string(),
           "English caption composed from the confident attributes of the image's faces; never names anyone"),
    Column("clip_score", "captions", pa.float32(), "image-text cosine under relevance.checkpoint (null when off)"),
    Column("face_attributes", "captions", pa.list_(FACE_ATTRIBUTES_TYPE),
           "per described face (primary first): attribute values (null where the model was not confident "
           "enough) and the model confidences"),
    Column("n_valid_labels", "captions", pa.int32(), "confident attribute labels of the primary face"),
    Column("caption_rewritten", "captions", pa.bool_(), "whether a language model rewrote the composed face caption"),
)

# Columns only a published dataset has, or has in another shape than the run's records.
PUBLISHED_DESCRIPTIONS = {
    "image": "the stored image (JPEG/PNG/WebP bytes as downloaded, or resized/re-encoded per the config)",
    "faces": "per face: bbox (x1, y1, x2, y2 in image pixels), 5 landmarks (eyes, nose, mouth corners; image "
             "left/right), detector score, yaw/pitch/roll, identity cluster, primary flag and, for described "
             "faces, attribute values (null where not confident) with their confidences",
    "source_url": "the URL the image was downloaded from",
    "license": "the image's licence as the input listed it (null when the input had none)",
    "source_sha256": "SHA-256 of the bytes as downloaded (before any resize or re-encode)",
    "embedding": "the primary face's identity embedding",
    "expected_status": "status the demo corpus expects (demo runs only)",
}


def step_columns(step: str) -> dict[str, pa.DataType]:
    """The columns `step` adds to the records, in order, with their Arrow types."""
    return {c.name: c.type for c in COLUMNS if c.step == step}


def field_descriptions() -> dict[str, str]:
    """What each column of the run's records or of a published dataset holds (the card's field list)."""
    return {**{c.name: c.description for c in COLUMNS}, **PUBLISHED_DESCRIPTIONS}


def reasons(*steps: str) -> dict[str, str]:
    """Drop reason -> what it means ({a.b} filled from the run config by the dataset card), of the
    given steps (default: all)."""
    return {s.value: s.description for s in Status if s is not Status.OK and (not steps or s.step in steps)}


def status_list() -> str:
    """The statuses by step, as the README lists them (tests/test_schema.py keeps the two equal)."""
    groups = []
    for step in STEPS:
        names = [f"`{s.value}`" for s in Status if s.step == step]
        if step == "download":
            names.insert(0, "`http_<code>`")
        groups.append(f"{', '.join(names)} ({step})")
    return "`ok`, or the first reason it was dropped: " + ", ".join(groups) + "."
