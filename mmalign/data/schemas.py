"""Sample schemas: what one sample of each kind holds inside a shard, how it is built and how it is checked.

A sample is the group of tar members sharing one key (`KEY.json`, `KEY.0.jpg`, ...). webdataset splits a member
name at the first dot, so keys never contain dots; the rest of the name (`0.jpg`) is the member's *suffix*.

| schema | version | members |
|---|---|---|
| `pair` | 1 | `json`, `0.<img>`, `1.<img>` |
| `ranked` | 1 | `json`, `0.<img>` ... `<K-1>.<img>` (K >= 2) |
| `video_pair` | 1 | `json`, `a.mp4`, `b.mp4` |
| `vlm_pair` | 1 | `json`, `0.<img>` ... (>= 1), optional `rejected.0.<img>` ... |
| `music_pair` | 1 | `json`, `chosen.npy`, `rejected.npy`, optional `chosen.<audio>`, `rejected.<audio>` |
| `music_ranked` | 1 | `json`, `0.npy` ... `<N-1>.npy` (N >= 2 code arrays [K, T] of one prompt, one score each) |
| `step_pair` | 1 | `json`, `x_t.npy`, `x_w.npy`, `x_l.npy` |

`<img>` is the real format of the stored bytes (`jpg`, `png`, `webp`, ...), found from the bytes, never re-encoded.
The field-by-field description lives in `docs/data.md`; the pydantic models below are its executable form.
Nothing here decodes pixels: `check_sample` parses JSON and member names; decoding media is the reader's and the
validator's job (`decode_media`). The one exception is `step_pair`, whose three small float32 latents are loaded
here (`allow_pickle=False`), because one shared shape and finite values are part of that schema.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)

SCHEMA_VERSIONS: dict[str, int] = {
    "pair": 1, "ranked": 1, "video_pair": 1, "vlm_pair": 1, "music_pair": 1, "step_pair": 1,
    "music_ranked": 1,
}

# PIL format name -> member extension. MPO is the multi-picture JPEG some cameras write.
IMAGE_FORMATS: dict[str, str] = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
}
IMAGE_EXTS: tuple[str, ...] = ("jpg", "png", "webp", "gif", "bmp", "tiff")
AUDIO_EXTS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")
VIDEO_DIMENSIONS: tuple[str, ...] = ("VQ", "MQ", "TA")
# step_pair members: the shared noisy latent x_t and the preferred / rejected next latents sampled from it.
STEP_LATENTS: tuple[str, ...] = ("x_t", "x_w", "x_l")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_KEY_LEN = 200


class SampleError(ValueError):
    """One sample does not match its schema. `reason` says what is wrong and what would be valid."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# keys


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key: 1-200 characters from [A-Za-z0-9_-] (no dots, no slashes)."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_KEY_LEN:
        raise SampleError(
            f"invalid sample key {key!r}: keys are 1-{MAX_KEY_LEN} characters from [A-Za-z0-9_-] "
            "(no dots: webdataset splits member names at the first dot); use sanitize_key()"
        )
    return key


def sanitize_key(text: str, max_len: int = 80) -> str:
    """Map any text to a key fragment: characters outside [A-Za-z0-9_] become `_`, cut to `max_len`.

    `-` is mapped too, so that `-` can serve as a separator that sorts before every other key character:
    `f"{sanitize_key(a)}-{i:09d}"` then sorts like `(a, i)`.
    """
    out = re.sub(r"[^A-Za-z0-9_]", "_", str(text))[:max_len]
    return out or "_"


def split_member(name: str) -> tuple[str | None, str | None]:
    """`"abc.0.jpg"` -> `("abc", "0.jpg")`, split at the first dot as webdataset does; `(None, None)` if no dot."""
    base, dot, suffix = name.partition(".")
    if not dot or not base or not suffix:
        return None, None
    return base, suffix.lower()


# --------------------------------------------------------------------------------------------------------------
# media helpers


def image_extension(data: bytes) -> str:
    """The member extension for encoded image bytes, found from the header (the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SampleError(f"not a readable image ({len(data)} bytes): {err}") from None
    ext = IMAGE_FORMATS.get(fmt or "")
    if ext is None:
        raise SampleError(f"unsupported image format {fmt!r}; supported: {sorted(IMAGE_FORMATS)}")
    return ext


def encode_image(image: Any) -> tuple[bytes, str]:
    """Bytes are kept as they are (format found from the header); a PIL image or a uint8 HxWx3 array is PNG-encoded
    losslessly. Returns `(bytes, extension)`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, image_extension(data)
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise SampleError(f"image arrays must be uint8 HxW or HxWxC, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def npy_bytes(array: Any) -> bytes:
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype.hasobject:  # also structured dtypes with an object field
        raise SampleError(f"object arrays cannot be stored (they would need pickle), got dtype {arr.dtype}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes):
    """Decode `.npy` bytes; pickled (object) arrays are refused."""
    import numpy as np

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise SampleError(f"npy: {err}") from None
    except Exception as err:  # truncated headers raise a variety of errors
        raise SampleError(f"npy: not a valid .npy array: {err}") from None


def is_mp4(data: bytes) -> bool:
    """ISO base media files (mp4/mov) carry an `ftyp` box at offset 4."""
    return len(data) >= 12 and data[4:8] == b"ftyp"


# --------------------------------------------------------------------------------------------------------------
# JSON metadata models


class _Meta(BaseModel):
    # Unknown fields are kept: users add their own (aesthetic scores, split names) without a schema change.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Provenance(_Meta):
    """Where a sample came from. Every field is optional except `origin` for `vlm_pair`."""

    dataset: str | None = None
    ids: dict[str, Any] = Field(default_factory=dict)
    generators: list[str | None] = Field(default_factory=list)
    origin: Literal["human", "ai", "self", "unknown"] | None = None
    generator: str | None = None
    corruption: str | None = None
    similarity: float | None = None


def _finite(values: list[float], what: str) -> list[float]:
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{what} must be finite numbers, got {v}")
    return values


class PairMeta(_Meta):
    caption: str
    label_0: float
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("label_0", mode="before")
    @classmethod
    def _label_is_a_number(cls, v: Any) -> Any:
        # Not "1", not true: a label written as text or a bool is a broken converter, not a preference.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"label_0 must be a JSON number (0, 0.5 or 1), got {type(v).__name__} {v!r}")
        return v

    @field_validator("label_0")
    @classmethod
    def _label(cls, v: float) -> float:
        if v not in (0.0, 0.5, 1.0):
            raise ValueError(f"label_0 must be 0 (image 1 preferred), 0.5 (tie) or 1 (image 0 preferred), got {v}")
        return float(v)


def _list_scores(v: list[float], what: str, n: str) -> list[float]:
    """The scores of a ranked list: at least 2, all finite."""
    if len(v) < 2:
        raise ValueError(f"{what} needs {n} >= 2 scores, got {len(v)}")
    return _finite(v, "scores")


class RankedMeta(_Meta):
    caption: str
    scores: list[float]
    scorers: list[str] = Field(default_factory=list)
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("scores")
    @classmethod
    def _scores(cls, v: list[float]) -> list[float]:
        return _list_scores(v, "a ranked sample", "K")


class VideoPairMeta(_Meta):
    prompt: str
    labels: dict[str, Literal["A", "B", "same"]]
    fps_a: float = Field(gt=0)
    fps_b: float = Field(gt=0)
    num_frames_a: int = Field(gt=0)
    num_frames_b: int = Field(gt=0)
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("labels")
    @classmethod
    def _dims(cls, v: dict[str, str]) -> dict[str, str]:
        missing = [d for d in VIDEO_DIMENSIONS if d not in v]
        if missing:
            raise ValueError(f"labels must give {list(VIDEO_DIMENSIONS)} (each A, B or same); missing {missing}")
        return v


class Turn(_Meta):
    role: str
    content: str | list[dict[str, Any]]


class VLMPairMeta(_Meta):
    prompt: list[Turn]
    chosen: str
    rejected: str
    provenance: Provenance

    @model_validator(mode="after")
    def _origin(self) -> "VLMPairMeta":
        if self.provenance.origin is None:
            raise ValueError("provenance.origin is required for vlm_pair: one of human, ai, self, unknown")
        if not self.prompt:
            raise ValueError("prompt must hold at least one chat turn")
        return self


class MusicPairMeta(_Meta):
    prompt: str
    codec: str | None = None
    frame_rate: float | None = None
    provenance: Provenance = Field(default_factory=Provenance)


class MusicRankedMeta(_Meta):
    prompt: str
    scores: list[float]
    scorers: list[str] = Field(default_factory=list)
    codec: str | None = None
    frame_rate: float | None = None
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("scores")
    @classmethod
    def _scores(cls, v: list[float]) -> list[float]:
        return _list_scores(v, "a music_ranked sample", "N")


class StepPairMeta(_Meta):
    """One kept denoising transition of a step-wise preference pool (SPO): x_w and x_l were both sampled from x_t
    at `timestep` with the same condition; the step-aware model scored x_w higher."""

    prompt: str
    timestep: int = Field(ge=0)
    prev_timestep: int = Field(ge=-1)  # -1: the final step (x_w / x_l are the clean latents)
    step_index: int = Field(ge=0)
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float
    eta: float = Field(ge=0)
    scores_w: float
    scores_l: float
    seed: int | None = None
    scheduler: str = Field(min_length=1)  # required, so that it is always written (meta_bytes drops defaults)
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("timestep", "prev_timestep", "step_index", "num_inference_steps", "seed", mode="before")
    @classmethod
    def _json_integer(cls, v: Any, info: ValidationInfo) -> Any:
        # Not 981.0, "981" or true: a timestep written as another type is a broken writer.
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{info.field_name} must be a JSON integer, got {type(v).__name__} {v!r}")
        return v

    @field_validator("guidance_scale", "eta", "scores_w", "scores_l", mode="before")
    @classmethod
    def _json_number(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{info.field_name} must be a JSON number, got {type(v).__name__} {v!r}")
        if isinstance(v, float) and not math.isfinite(v):  # Python's json reads NaN and Infinity
            raise ValueError(f"{info.field_name} must be finite, got {v}")
        return v

    @model_validator(mode="after")
    def _order(self) -> "StepPairMeta":
        if self.timestep <= self.prev_timestep:
            raise ValueError(f"timestep ({self.timestep}) must be greater than prev_timestep "
                             f"({self.prev_timestep}): x_w / x_l come after x_t in sampling")
        if self.step_index >= self.num_inference_steps:
            raise ValueError(f"step_index ({self.step_index}) must be below num_inference_steps "
                             f"({self.num_inference_steps})")
        if not self.scores_w > self.scores_l:
            raise ValueError(f"scores_w ({self.scores_w}) must be greater than scores_l ({self.scores_l}): x_w is "
                             "the candidate the step-aware model preferred")
        return self


META_MODELS: dict[str, type[_Meta]] = {
    "pair": PairMeta, "ranked": RankedMeta, "video_pair": VideoPairMeta, "vlm_pair": VLMPairMeta,
    "music_pair": MusicPairMeta, "step_pair": StepPairMeta, "music_ranked": MusicRankedMeta,
}


def parse_meta(schema: str, data: bytes | dict) -> _Meta:
    """Parse and check the `json` member of a sample; raises SampleError naming each bad field."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SampleError(f"json: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SampleError(f"json: must be an object, got {type(data).__name__}")
    try:
        return META_MODELS[schema].model_validate(data)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<object>"
            parts.append(f"{loc}: {e['msg']}")
        raise SampleError(f"json: {'; '.join(parts)}") from None


def meta_bytes(meta: _Meta) -> bytes:
    """Deterministic JSON: sorted keys, compact, UTF-8."""
    data = meta.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------------------------
# member layout


def _indexed(files: dict[str, Any], prefix: str, exts: tuple[str, ...]) -> dict[int, str]:
    """Suffixes like `prefix + "3.jpg"` -> {3: "3.jpg"}; a duplicate index (3.jpg and 3.png) is an error."""
    out: dict[int, str] = {}
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.([a-z0-9]+)$")
    for suffix in files:
        m = pat.match(suffix)
        if m and m.group(2) in exts:
            i = int(m.group(1))
            if m.group(1) != str(i):
                raise SampleError(f"member {suffix!r}: image indices are written without leading zeros")
            if i in out:
                raise SampleError(f"two members for image {prefix}{i}: {out[i]!r} and {suffix!r}")
            out[i] = suffix
    return out


def _contiguous(found: dict[int, str], what: str, prefix: str) -> list[str]:
    if sorted(found) != list(range(len(found))):
        raise SampleError(f"{what}: members must be numbered {prefix}0..{prefix}{len(found) - 1} without gaps, "
                          f"found {sorted(found.values())}")
    return [found[i] for i in range(len(found))]


def _one_of(files: dict[str, Any], stem: str, exts: tuple[str, ...], required: bool = True) -> str | None:
    hits = [f"{stem}.{e}" for e in exts if f"{stem}.{e}" in files]
    if len(hits) > 1:
        raise SampleError(f"more than one member for {stem}: {hits}")
    if not hits:
        if required:
            raise SampleError(f"missing member {stem}.<{'|'.join(exts)}>")
        return None
    return hits[0]


def layout(schema: str, files: dict[str, Any]) -> dict[str, Any]:
    """Which suffix holds what, for one sample's members (`files`: suffix -> bytes). Raises SampleError.

    Returns a dict with `json` and, per schema: `images` (list of suffixes), `rejected_images`, `a`/`b`,
    `chosen`/`rejected` (+ `chosen_audio`/`rejected_audio`), `x_t`/`x_w`/`x_l`, and `unexpected` (suffixes no
    schema field claims).
    """
    if schema not in SCHEMA_VERSIONS:
        raise SampleError(f"unknown schema {schema!r}; valid: {sorted(SCHEMA_VERSIONS)}")
    if "json" not in files:
        raise SampleError("missing member json (the sample's metadata)")
    out: dict[str, Any] = {"json": "json"}
    if schema in ("pair", "ranked", "vlm_pair"):
        found = _indexed(files, "", IMAGE_EXTS)
        if schema == "pair":
            missing = [i for i in (0, 1) if i not in found]
            if missing or len(found) != 2:
                what = f"missing member {missing[0]}.<{'|'.join(IMAGE_EXTS)}>" if missing else "extra images"
                raise SampleError(f"{what}: a pair holds exactly 0.<img> and 1.<img>, found "
                                  f"{sorted(found.values()) or 'no image'}")
        images = _contiguous(found, "images", "")
        if schema == "ranked":
            if len(images) < 2:
                raise SampleError(f"a ranked sample needs K >= 2 images 0.<img>..K-1.<img>, found {images or 'none'}")
        elif schema == "vlm_pair":
            if not images:
                raise SampleError(f"a vlm_pair needs at least one image 0.<img> (img: {'|'.join(IMAGE_EXTS)})")
            out["rejected_images"] = _contiguous(_indexed(files, "rejected.", IMAGE_EXTS), "rejected images",
                                                 "rejected.")
        out["images"] = images
    elif schema == "video_pair":
        for side in ("a", "b"):
            if f"{side}.mp4" not in files:
                raise SampleError(f"missing member {side}.mp4 (video {side.upper()})")
            out[side] = f"{side}.mp4"
    elif schema == "music_pair":
        for side in ("chosen", "rejected"):
            if f"{side}.npy" not in files:
                raise SampleError(f"missing member {side}.npy (the {side} codes, int array [K, T])")
            out[side] = f"{side}.npy"
            out[f"{side}_audio"] = _one_of(files, side, AUDIO_EXTS, required=False)
    elif schema == "music_ranked":
        items = _contiguous(_indexed(files, "", ("npy",)), "code arrays", "")
        if len(items) < 2:
            raise SampleError(f"a music_ranked sample needs N >= 2 code arrays 0.npy..N-1.npy, found {items or 'none'}")
        out["items"] = items
    elif schema == "step_pair":
        for name in STEP_LATENTS:
            if f"{name}.npy" not in files:
                raise SampleError(f"missing member {name}.npy (a step_pair holds float32 latents "
                                  f"{', '.join(n + '.npy' for n in STEP_LATENTS)} of one shape)")
            out[name] = f"{name}.npy"
    claimed = {"json"}
    for v in out.values():
        if isinstance(v, str):
            claimed.add(v)
        elif isinstance(v, list):
            claimed.update(v)
    out["unexpected"] = sorted(s for s in files if s not in claimed)
    return out


def check_latents(latents: dict[str, Any]) -> None:
    """The `step_pair` latents {x_t, x_w, x_l: ndarray}: float32, at least 1-d, not empty, one shared shape, every
    value finite. Raises SampleError naming the member."""
    import numpy as np

    for name, arr in latents.items():
        if arr.dtype != np.float32:  # also refuses a byte-swapped '>f4': torch reads native order only
            raise SampleError(f"{name}.npy: latents must be float32 (native byte order), got {arr.dtype}; convert "
                              "with .float() / .astype(np.float32)")
        if arr.ndim == 0 or arr.size == 0:
            raise SampleError(f"{name}.npy: latents must be a non-empty array of at least 1 dimension, got shape "
                              f"{arr.shape}")
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise SampleError(f"{name}.npy: {bad} of {arr.size} values are not finite (nan or inf)")
    shapes = {name: tuple(arr.shape) for name, arr in latents.items()}
    if len(set(shapes.values())) != 1:
        raise SampleError("latent shapes differ: " + ", ".join(f"{n}.npy {s}" for n, s in shapes.items())
                          + "; x_t, x_w and x_l of one transition share one shape")


def check_sample(schema: str, files: dict[str, bytes]) -> tuple[dict[str, Any], _Meta]:
    """Member layout + metadata checks that need no media decoding; cross-checks counts (ranked scores vs images).

    For `step_pair` the three latents are loaded and checked (`check_latents`) too, and returned as
    `lay["latents"]` {x_t, x_w, x_l: float32 ndarray} so that readers do not load them twice.
    """
    lay = layout(schema, files)
    meta = parse_meta(schema, files["json"])
    if schema == "ranked" and len(meta.scores) != len(lay["images"]):
        raise SampleError(f"json: scores has {len(meta.scores)} entries but the sample has {len(lay['images'])} "
                          "images; one score per image")
    if schema == "music_ranked" and len(meta.scores) != len(lay["items"]):
        raise SampleError(f"json: scores has {len(meta.scores)} entries but the sample has {len(lay['items'])} code "
                          "arrays; one score per code array")
    if schema == "step_pair":
        latents = {}
        for name in STEP_LATENTS:
            try:
                latents[name] = load_npy(files[lay[name]])
            except SampleError as err:
                raise SampleError(f"{lay[name]}: {err.reason}") from None
        check_latents(latents)
        lay["latents"] = latents
    return lay, meta


# --------------------------------------------------------------------------------------------------------------
# builders: what writers call


def _base(key: str) -> dict[str, Any]:
    return {"__key__": check_key(key)}


def _prov(provenance: dict | Provenance | None) -> dict:
    if provenance is None:
        return {}
    return provenance.model_dump(exclude_none=True) if isinstance(provenance, Provenance) else dict(provenance)


def _build(schema: str, meta: dict[str, Any]) -> bytes:
    return meta_bytes(parse_meta(schema, meta))


def pair_sample(key: str, image_0: Any, image_1: Any, *, caption: str, label_0: float,
                provenance: dict | Provenance | None = None, **extra: Any) -> dict[str, bytes]:
    """A `pair` sample. `label_0`: 1 = image 0 preferred, 0 = image 1 preferred, 0.5 = tie.

    Images given as bytes are stored as they are (never re-encoded); PIL images / uint8 arrays become PNG.
    """
    out = _base(key)
    for i, image in enumerate((image_0, image_1)):
        data, ext = encode_image(image)
        out[f"{i}.{ext}"] = data
    out["json"] = _build("pair", {"caption": caption, "label_0": label_0, "provenance": _prov(provenance), **extra})
    return out


def ranked_sample(key: str, images: list[Any], *, caption: str, scores: list[float], scorers: list[str] | None = None,
                  provenance: dict | Provenance | None = None, **extra: Any) -> dict[str, bytes]:
    """A `ranked` sample: K >= 2 images of one prompt, one score per image (higher is better)."""
    if len(images) != len(scores):
        raise SampleError(f"ranked sample {key}: {len(images)} images but {len(scores)} scores")
    out = _base(key)
    for i, image in enumerate(images):
        data, ext = encode_image(image)
        out[f"{i}.{ext}"] = data
    out["json"] = _build("ranked", {"caption": caption, "scores": list(scores), "scorers": list(scorers or []),
                                    "provenance": _prov(provenance), **extra})
    return out


def video_pair_sample(key: str, video_a: bytes, video_b: bytes, *, prompt: str, labels: dict[str, str],
                      fps_a: float, fps_b: float, num_frames_a: int, num_frames_b: int,
                      provenance: dict | Provenance | None = None, **extra: Any) -> dict[str, bytes]:
    """A `video_pair` sample: two mp4 files and per-dimension labels VQ/MQ/TA in {A, B, same}."""
    out = _base(key)
    for side, data in (("a", video_a), ("b", video_b)):
        data = bytes(data)
        if not is_mp4(data):
            raise SampleError(f"video {side.upper()} of {key} is not an mp4 file (no ftyp box)")
        out[f"{side}.mp4"] = data
    out["json"] = _build("video_pair", {
        "prompt": prompt, "labels": dict(labels), "fps_a": fps_a, "fps_b": fps_b, "num_frames_a": num_frames_a,
        "num_frames_b": num_frames_b, "provenance": _prov(provenance), **extra})
    return out


def vlm_pair_sample(key: str, images: list[Any], *, prompt: str | list[dict], chosen: str, rejected: str,
                    rejected_images: list[Any] | None = None, provenance: dict | Provenance | None = None,
                    **extra: Any) -> dict[str, bytes]:
    """A `vlm_pair` sample. `prompt` is a list of chat turns `{"role", "content"}` (a string becomes one user
    turn); `provenance.origin` (human / ai / self / unknown) is required."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    out = _base(key)
    for i, image in enumerate(images):
        data, ext = encode_image(image)
        out[f"{i}.{ext}"] = data
    for i, image in enumerate(rejected_images or []):
        data, ext = encode_image(image)
        out[f"rejected.{i}.{ext}"] = data
    out["json"] = _build("vlm_pair", {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                      "provenance": _prov(provenance), **extra})
    return out


def check_code_arrays(arrays: dict[str, Any], where: str = "") -> None:
    """The token-code arrays of one music sample (name -> array): each an integer array [K codebooks, T] (T may
    differ), all with the same K. Raises SampleError naming the array (prefixed by `where`)."""
    import numpy as np

    ks = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise SampleError(f"{where}{name} must be an integer array [K, T], got {arr.dtype} {arr.shape}")
        ks[name] = arr.shape[0]
    if len(set(ks.values())) > 1:
        raise SampleError(f"{where}the code arrays must have the same number of codebooks K, got {ks}")


def music_pair_sample(key: str, chosen_codes: Any, rejected_codes: Any, *, prompt: str,
                      chosen_audio: bytes | None = None, rejected_audio: bytes | None = None, audio_format: str = "wav",
                      provenance: dict | Provenance | None = None, **extra: Any) -> dict[str, bytes]:
    """A `music_pair` sample: chosen / rejected token codes as int arrays [K codebooks, T] (T may differ)."""
    import numpy as np

    out = _base(key)
    arrays = {"chosen codes": np.asarray(chosen_codes), "rejected codes": np.asarray(rejected_codes)}
    check_code_arrays(arrays, f"{key}: ")
    out["chosen.npy"], out["rejected.npy"] = (npy_bytes(a) for a in arrays.values())
    if audio_format not in AUDIO_EXTS:
        raise SampleError(f"audio_format must be one of {AUDIO_EXTS}, got {audio_format!r}")
    for side, audio in (("chosen", chosen_audio), ("rejected", rejected_audio)):
        if audio is not None:
            out[f"{side}.{audio_format}"] = bytes(audio)
    out["json"] = _build("music_pair", {"prompt": prompt, "provenance": _prov(provenance), **extra})
    return out


def music_ranked_sample(key: str, codes: list[Any], *, prompt: str, scores: list[float],
                        scorers: list[str] | None = None, provenance: dict | Provenance | None = None,
                        **extra: Any) -> dict[str, bytes]:
    """A `music_ranked` sample: N >= 2 code arrays [K codebooks, T] (T may differ, K may not) of one prompt, one
    score each (higher is better), as `0.npy` .. `<N-1>.npy`."""
    import numpy as np

    if len(codes) != len(scores):
        raise SampleError(f"music_ranked sample {key}: {len(codes)} code arrays but {len(scores)} scores")
    out = _base(key)
    arrays = {f"code array {i}": np.asarray(c) for i, c in enumerate(codes)}
    check_code_arrays(arrays, f"{key}: ")
    out.update({f"{i}.npy": npy_bytes(a) for i, a in enumerate(arrays.values())})
    out["json"] = _build("music_ranked", {"prompt": prompt, "scores": [float(x) for x in scores],
                                          "scorers": list(scorers or []), "provenance": _prov(provenance), **extra})
    return out


def _integer(value: Any, name: str) -> int:
    """Python / numpy ints and 0-d integer tensors (a scheduler's timestep) -> int; never a float or a bool."""
    import operator

    if isinstance(value, bool):
        raise SampleError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SampleError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _number(value: Any, name: str) -> float:
    """Python / numpy numbers and 0-d tensors -> float (exact for float32); never a string or a bool."""
    if isinstance(value, (bool, str, bytes)):
        raise SampleError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SampleError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None


def step_pair_sample(key: str, x_t: Any, x_w: Any, x_l: Any, *, prompt: str, timestep: int, prev_timestep: int,
                     step_index: int, num_inference_steps: int, guidance_scale: float, eta: float, scores_w: float,
                     scores_l: float, seed: int | None = None, scheduler: str = "DDIMScheduler",
                     provenance: dict | Provenance | None = None, **extra: Any) -> dict[str, bytes]:
    """A `step_pair` sample: one kept transition of a step-wise preference pool (SPO).

    `x_t`: the shared latent at scheduler timestep `timestep`; `x_w` / `x_l`: the preferred / rejected latents
    sampled from it, at `prev_timestep` (-1 after the final step). All three float32 of one shape, e.g. (4, 64, 64);
    numpy arrays or CPU tensors (a tensor is detached and copied to the CPU, never cast: convert bf16 / fp16 with
    `.float()`). Stored as `.npy` without pickle. `step_index` / `num_inference_steps`, `guidance_scale`, `eta`
    and `seed` describe the sampling run; `scores_w` > `scores_l` are the step-aware model's scores.
    """
    import numpy as np

    out = _base(key)
    latents = {}
    for name, value in (("x_t", x_t), ("x_w", x_w), ("x_l", x_l)):
        if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, on any device
            value = value.detach().cpu()
        try:
            latents[name] = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SampleError(f"step_pair sample {key!r}: {name} is not an array: {err}") from None
    try:
        check_latents(latents)
        meta = {
            "prompt": prompt, "timestep": _integer(timestep, "timestep"),
            "prev_timestep": _integer(prev_timestep, "prev_timestep"), "step_index": _integer(step_index, "step_index"),
            "num_inference_steps": _integer(num_inference_steps, "num_inference_steps"),
            "guidance_scale": _number(guidance_scale, "guidance_scale"), "eta": _number(eta, "eta"),
            "scores_w": _number(scores_w, "scores_w"), "scores_l": _number(scores_l, "scores_l"),
            "seed": None if seed is None else _integer(seed, "seed"), "scheduler": scheduler,
            "provenance": _prov(provenance), **extra,
        }
        out["json"] = _build("step_pair", meta)
    except SampleError as err:
        raise SampleError(f"step_pair sample {key!r}: {err.reason}") from None
    for name, arr in latents.items():
        out[f"{name}.npy"] = npy_bytes(arr)
    return out
