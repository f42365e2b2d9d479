"""Loading a config: YAML file and dotted overrides onto the defaults, typed dataclass construction
(unknown keys and wrong types are errors that name the key), keys that moved (an error naming the
new key), and the config's plain views (`to_dict`, `flatten` for MLflow, `describe` for --help)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from treegrpo_ray import storage
from treegrpo_ray.config.checks import validate
from treegrpo_ray.config.schema import Config, ConfigError

# Keys renamed on 2026-12-07 (issue 37): a config that still uses one gets an error naming the new key.
MOVED = {**{f"learner.adv_{k}": f"advantage.{k}" for k in ("std", "stats", "buffer", "min_count", "eps", "clip")},
         "learner.cfg_grad": "learner.guidance_grad"}


BUNDLED = Path(__file__).parent.parent / "configs"  # the named configs, shipped in the package (`configs/` links here)


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """A YAML file by path, else by name among the shipped configs: `sd35m_hps`, `sd35m_hps.yaml`
    and `configs/sd35m_hps.yaml` all find it from any directory, in an editable or a plain install."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("configs")) and (BUNDLED / f"{name}.yaml").is_file():
        return BUNDLED / f"{name}.yaml"
    raise ConfigError(f"--config: {str(path)!r} does not exist, as a YAML file or as the name of a shipped config; pass an "
                      f"existing file or one of: {', '.join(bundled_names())}")


def bundled_file(path: str) -> str:
    """A relative `configs/...` data path (e.g. a config's prompt file) that is not in the cwd
    resolves to the shipped copy; anything else is returned unchanged."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and p.parts[:1] == ("configs",) and (BUNDLED.joinpath(*p.parts[1:])).exists():
        return str(BUNDLED.joinpath(*p.parts[1:]))
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides; then type-check and validate."""
    raw: dict = to_dict(Config())  # start from the defaults so list items can be overridden by index
    if path is not None:
        p = find_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        raw = _merge(raw, loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. tree.k=3")
        _set_dotted(raw, key.strip(), _parse_scalar(value.strip()))
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list version (YAML/JSON-serialisable)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


_SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential")


def flatten(cfg: Config, *, redact: bool = True) -> dict[str, str]:
    """`a.b.c -> str(value)` for MLflow params; values of secret-looking keys become '***', and
    credentials inside URIs (user:pass@host, ?secret_key=...) are masked (storage.redact)."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            key = prefix.rstrip(".")
            text = str(node)
            if redact:
                text = "***" if any(w in key.lower() for w in _SECRET_WORDS) else storage.redact(text)
            out[key] = text

    walk(to_dict(cfg), "")
    return out



def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per field: `key (type) = default  -- doc`, for --help."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}.*  -- {f.metadata.get('help', '')}")
            lines += describe(type(value), f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {to_dict(value)!r}  -- {f.metadata.get('help', '')}")
    return lines


def from_dict(raw: dict) -> Config:
    """Rebuild a Config from `to_dict` output (how actors receive it), re-validated."""
    return validate(_build(Config, raw, ""))


# ----------------------------------------------------------------------------- parsing

def _merge(base: dict, top: dict) -> dict:
    """Deep-merge mappings; anything else in `top` (lists included) replaces what is in `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if idx == len(node):
            node.append(value)
        else:
            node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not a valid list index (list has {len(node)} items)")
    if int(part) == len(node):
        node.append({})
    return int(part)


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [prefix + k for k in unknown if prefix + k in MOVED]
    if moved:
        raise ConfigError(f"config key {moved[0]!r} is now {MOVED[moved[0]]!r}; rename it in your YAML or override")
    if unknown:
        near = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {near}")
    kwargs = {}
    for name in raw:
        kwargs[name] = _coerce(hints[name], raw[name], prefix + name)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r} (quote it in YAML)")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}.{i}") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file
