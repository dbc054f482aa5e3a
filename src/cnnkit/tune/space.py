"""The search space of ``cnnkit tune`` (its YAML format: see cnnkit.tune): reading and
checking a space file, the settings of one trial, and the best trial as a recipe."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config import Config, apply_overrides, flatten, load_config, resolve_key

SPACES = Path(__file__).resolve().parents[1] / "recipes" / "spaces"
DEFAULT_SPACE = SPACES / "seed-exercise.yaml"
# Set by tune itself for every trial: a space may not choose them.
_OWN_KEYS = ("run.runs_dir", "run.name", "run.experiment")
# {name} or {name*K}: names and whole multiples are all a layer spec needs (conv{width*2}).
# A regex rather than str.format (attribute and index lookups, no arithmetic) or a template
# engine (a dependency for one line).
_TEMPLATE = re.compile(r"\{([A-Za-z_][\w.]*)(?:\*(\d+))?\}")


@dataclass(frozen=True)
class Param:
    """One searched name: a setting (``key`` its dotted name) or a template parameter."""

    name: str
    key: str | None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(
                self.name, self.low, self.high, step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> tuple:
        """The extreme values, enough to check the settings they make."""
        return (self.choices[0], self.choices[-1]) if self.choices else (self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    fixed: dict[str, Any]  # dotted key -> value (a string may hold {templates})
    source: str = "<space>"

    def settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """The settings of one trial: ``fixed`` rendered with ``values``, then the searched
        settings."""
        out = {k: render(v, values) for k, v in self.fixed.items()}
        out.update({p.key: values[p.name] for p in self.params.values() if p.key})
        return out

    def without(self, keys: set[str]) -> tuple[SearchSpace, list[str]]:
        """The space with the settings in ``keys`` (fixed by the user) taken out, and the
        template parameters no longer used; and a note for each name taken out."""
        fixed = {k: v for k, v in self.fixed.items() if k not in keys}
        used = _template_names(fixed)
        params = {
            n: p
            for n, p in self.params.items()
            if (p.key and p.key not in keys) or (not p.key and n in used)
        }
        notes = [
            f"{n} is fixed by your settings: not searched"
            if p.key
            else f"{n} is not searched: the setting that used it is fixed by your settings"
            for n, p in self.params.items()
            if n not in params
        ]
        notes += [f"{k} is fixed by your settings: not searched" for k in self.fixed if k in keys]
        return SearchSpace(params, fixed, self.source), notes


def render(value: Any, values: dict[str, Any]) -> Any:
    """A fixed value with {name} and {name*K} replaced by the trial's values."""
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        v = values[m[1]]
        return _format(v * int(m[2]) if m[2] else v)

    return _TEMPLATE.sub(substitute, value)


def _format(value: Any) -> str:
    """A value as text in a name: floats rounded to 6 significant digits, so a stepped
    0.15000000000000002 reads 0.15 and a layer spec gets drop0.15 (0.0 gives drop0)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _template_names(fixed: dict[str, Any]) -> set[str]:
    return {m[1] for v in fixed.values() if isinstance(v, str) for m in _TEMPLATE.finditer(v)}


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read a search-space YAML file (default: the shipped seed-exercise space)."""
    path = Path(path) if path is not None else DEFAULT_SPACE
    if not path.exists() and (SPACES / f"{path}.yaml").exists():
        path = SPACES / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in SPACES.glob("*.yaml")))
        raise FileNotFoundError(f"search space not found: {path} (shipped: {shipped})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    return parse_space(data, str(path))


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """A SearchSpace from the YAML's mapping; one-line ValueErrors name the key and the fix."""
    if not isinstance(data, dict) or "params" not in data:
        raise ValueError(f"{source}: a search space is a mapping with 'params:' (and 'fixed:')")
    unknown = set(data) - {"params", "fixed"}
    if unknown:
        raise ValueError(f"{source}: unknown section {sorted(unknown)}; use params and fixed")
    raw_params, raw_fixed = data["params"] or {}, data.get("fixed") or {}
    if not isinstance(raw_params, dict) or not raw_params:
        raise ValueError(f"{source}: params must map names to ranges or lists of choices")
    if not isinstance(raw_fixed, dict):
        raise ValueError(f"{source}: fixed must map settings to values")
    params = {}
    for name, spec in raw_params.items():
        param = _parse_param(str(name), spec, source)
        if param.name in params:
            raise ValueError(f"{source}: params.{name} names {param.name} twice; keep one")
        params[param.name] = param
    fixed = {}
    for key, value in flatten(raw_fixed).items():
        fixed[_setting_key(key, source, "fixed")] = value
    used = _template_names(fixed)
    for name in sorted(used - set(params)):
        raise ValueError(f"{source}: fixed uses {{{name}}}, which params does not define; add it")
    for p in params.values():
        if p.key is None and p.name not in used:
            raise ValueError(
                f"{source}: params.{p.name} is neither a setting nor used in fixed as "
                f"{{{p.name}}}; use it in a fixed value, or remove it"
            )
    return SearchSpace(params, fixed, source)


def _setting_key(key: str, source: str, section: str) -> str:
    try:
        resolved = resolve_key(key)
    except KeyError:
        raise ValueError(
            f"{source}: {section}.{key} is not a setting; see 'cnnkit train --help'"
        ) from None
    if resolved in _OWN_KEYS:
        raise ValueError(f"{source}: {section}.{key} is set by cnnkit tune itself; remove it")
    return resolved


def _parse_param(name: str, spec: Any, source: str) -> Param:
    where = f"{source}: params.{name}"
    try:
        key = resolve_key(name)
    except KeyError:
        if "." in name:  # a dotted name means a setting: a typo, not a template parameter
            raise ValueError(f"{where} is not a setting; see 'cnnkit train --help'") from None
        key = None  # a template parameter
    if key in _OWN_KEYS:
        raise ValueError(f"{where} is set by cnnkit tune itself; remove it")
    label = key or name
    if isinstance(spec, list):
        if not spec or not all(v is None or isinstance(v, bool | int | float | str) for v in spec):
            raise ValueError(f"{where}: choices must be a non-empty list of plain values")
        return Param(label, key, choices=tuple(spec))
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
        raise ValueError(f"{where}: give a list of choices or {{low: ..., high: ...}}")
    extra = set(spec) - {"low", "high", "step", "log"}
    if extra:
        raise ValueError(f"{where}: unknown field(s) {sorted(extra)}; use low, high, step, log")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log"))
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise ValueError(f"{where}: low, high and step must be numbers (1.0e-4, not 1e-4 text)")
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{where}: low, high and step must be finite")
    if low >= high:
        raise ValueError(f"{where}: low {low} >= high {high}; give low < high")
    if log and step is not None:
        raise ValueError(f"{where}: use step or log, not both")
    if log and low <= 0:
        raise ValueError(f"{where}: log needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise ValueError(f"{where}: step must be positive, got {step}")
    return Param(label, key, low=low, high=high, step=step, log=log)


def check_space(space: SearchSpace, base: Config) -> None:
    """Build the Config of the space's corners (all lows, all highs), and check a layer
    spec they make, so a bad bound is an error now, not in trial 7."""
    from cnnkit.models.spec import looks_like_spec, tokenize

    for i in (0, 1):
        values = {n: p.corners()[i] for n, p in space.params.items()}
        settings = space.settings(values)
        try:
            cfg = apply_overrides(base, settings)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{space.source}: the settings {settings} fail: {e}") from None
        name = cfg.model.name
        if "model.name" in space.fixed and looks_like_spec(name):
            bad = [t for t in tokenize(name) if t.kind is None or t.problem]
            if bad:
                problem = bad[0].problem or "is not a layer-spec token"
                raise ValueError(
                    f"{space.source}: fixed model.name gives '{name}': '{bad[0].text}' "
                    f"{problem} (see 'cnnkit models --spec-help')"
                )


# ---- the best trial as a recipe ------------------------------------------------------


def write_best_recipe(trial, space: SearchSpace, base: Config, path: Path) -> None:
    """The best trial as a recipe for ``cnnkit train --config``: its run's settings that
    differ from the defaults, plus every searched setting. From the run's config.yaml;
    where that is on another machine, from this worker's settings and the trial's values."""
    run_dir = Path(trial.user_attrs["run_dir"])
    if (run_dir / "config.yaml").is_file():
        settings = load_config(run_dir / "config.yaml")
    else:
        settings = flatten(apply_overrides(base, space.settings(trial.params)).to_dict())
    defaults = flatten(Config().to_dict())
    searched = {p.key for p in space.params.values() if p.key} | set(space.fixed)
    keep = {
        k: v
        for k, v in settings.items()
        if k not in _OWN_KEYS and (v != defaults.get(k) or k in searched)
    }
    nested: dict[str, dict] = {}
    for k, v in keep.items():
        section, name = k.split(".")
        nested.setdefault(section, {})[name] = v
    params = " ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
    header = (
        f"# The best trial ({trial.number}, val acc {trial.value:.4f}) of cnnkit tune; its run "
        f"is {run_dir}.\n# Searched: {params}\n# Train it: cnnkit train --config {path}\n"
    )
    _write_atomic(path, (header + yaml.safe_dump(nested, sort_keys=False)).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file: several workers may finish at the same moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
