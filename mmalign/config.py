"""Typed configs: YAML files plus `key=value` command-line overrides, validated by pydantic.

Every config class derives from `StrictModel`, which forbids unknown keys. Errors are raised as `ConfigError`
with one line per problem naming the dotted key and where it came from (the YAML file or the command line), and
saying what would be valid.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`; every ML config writes `1e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and floats must be
    finite (`.inf` / `.nan` are refused: no setting of ours means anything when infinite)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)


class ConfigError(ValueError):
    """A config could not be loaded; the message names each bad key and its source."""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (line, column), without the quoted snippet."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start} is not UTF-8 text)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-5` -> (["optim", "lr"], 1e-05). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: value of override {key!r} is not valid YAML: {_yaml_problem(err)}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], set[str]]:
    """Returns a new dict with the overrides set, and the dotted keys they touched."""
    data = copy.deepcopy(data)
    touched: set[str] = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"command line: cannot set {'.'.join(parts)!r}: {where!r} is not a section")
            node = child
        node[parts[-1]] = value
        touched.add(".".join(parts))
    return data, touched


_MAX_GOT = 80  # characters of a bad value echoed back


def _format_errors(err: ValidationError, source: str, touched: set[str]) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        where = "command line" if key and any(key == t or key.startswith(t + ".") for t in touched) else source
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"{where}: unknown key {key!r}")
        elif kind == "missing":
            lines.append(f"{where}: missing required key {key!r}")
        elif kind in ("value_error", "assertion_error") and isinstance(item.get("input"), dict):
            # A validator over a section or the whole config: its message names the keys at fault; the input
            # is the section itself, which would only bury the message.
            msg = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            named = sorted(t for t in touched if t in msg or (key and t.startswith(key + ".")))
            if named:
                where = f"{source} with command line {', '.join(named)}"
            lines.append(f"{where}: key {key!r}: {msg}" if key else f"{where}: {msg}")
        else:
            got = repr(item.get("input"))
            if len(got) > _MAX_GOT:
                got = got[:_MAX_GOT - 3] + "..."
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: key {key!r}: {msg} (got {got})")
    return "\n".join(lines)


def validate_config(cls: type[T], data: dict[str, Any], source: str = "<config>",
                    touched: set[str] | None = None) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, touched or set())) from None


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> T:
    """Load `path` (or start from defaults when None), apply overrides, validate into `cls`."""
    data = load_yaml(path) if path is not None else {}
    data, touched = apply_overrides(data, overrides)
    return validate_config(cls, data, str(path) if path is not None else "<defaults>", touched)


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder, then rename: a reader never sees half a file.

    The file gets the mode a plain `open(path, "w")` would give it: an existing file's mode is kept, a new file
    gets 0o666 minus the umask (0o644 typically). The temporary file is created with `os.open(..., 0o666)`, so the
    kernel applies the umask, not `tempfile.mkstemp`'s private 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path.parent}: could not create a unique temporary file for {path.name}")
    try:
        with os.fdopen(fd, "w") as fh:
            if path.exists():
                os.fchmod(fh.fileno(), stat.S_IMODE(path.stat().st_mode))
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_resolved_config(cfg: BaseModel, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config (defaults filled in) as `config.yaml` in the run folder."""
    out = Path(run_dir) / "config.yaml"
    atomic_write_text(out, config_to_yaml(cfg))
    return out
