"""The pipeline's configuration: one dataclass tree, loaded from YAML, overridden with
``--set section.field=value``, and validated with errors that name the field and what
it allows."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ..select import PatternError, check_patterns

METHODS = ("magnitude", "wanda", "ria", "sparsegpt")  # pruning.METHODS (kept import-free)
ALLOCATIONS = ("uniform", "owl")  # pruning.ALLOCATIONS
GRANULARITIES = ("row", "layer")
DTYPES = ("bfloat16", "float32")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")  # sparamx.cpu.COMPUTE_DTYPES
KV_METHODS = ("none", "magnitude", "wanda")
CALIB_SOURCES = ("wikipedia", "c4")
# sparamx.format.PACK_STORAGES (kept import-free: the format module loads torch)
STORAGES = ("auto", "auto-int8", "bitmap-bf16", "dense-bf16", "bitmap-int8", "dense-int8")
STREAMING = ("auto", "true", "false")
RANDOM_PRESETS = (
    "none",
    "llama3-8b",
    "tiny-llama",
)  # sparamx.tools.random_model.PRESETS (kept import-free)


class ConfigError(ValueError):
    """A configuration field that is unknown, mistyped or out of range."""


@dataclass
class RandomModelConfig:
    # A random-weight model at a real architecture's shapes (speed work without the hub):
    # written to model.source on first use (sparamx.tools.random_model). "none": a real model.
    preset: str = "none"
    num_layers: int | None = None  # fewer decoder layers than the preset; null = all
    seed: int = 0


@dataclass
class ModelConfig:
    source: str = "smollm2-135m"  # hub id, local HF dir, .gguf file, or a built-in name
    revision: str | None = None  # hub revision (commit, tag) for reproducibility
    # Precision the weights are loaded in (bf16: the values that get packed); the dense
    # model is then cast to compute_dtype for calibration, evaluation and the stock bench.
    dtype: str = "bfloat16"
    # Arithmetic dtype of calibration, dense/pruned/packed evaluation and the stock
    # baseline (sparamx.cpu.resolve_compute_dtype). auto: float32 where the CPU has no
    # fast bf16 matmul (no AVX-512-BF16 / AMX-BF16: ~6x slower than fp32 on a Zen 3) or
    # model.dtype is float32; bfloat16 otherwise. Packed weights stay bf16 either way.
    compute_dtype: str = "auto"
    # Prune + pack one decoder layer at a time from the safetensors shards (sparamx.
    # streaming) instead of in memory. auto: stream when 3x the weights (the in-memory
    # stages hold a dense and a pruned copy plus temporaries) exceed the available RAM.
    streaming: str = "auto"
    random: RandomModelConfig = field(default_factory=RandomModelConfig)


@dataclass
class CalibrationConfig:
    source: str = "wikipedia"  # offline Wikipedia text (gensim test data), or "c4" (hub)
    samples: int = 32  # Wanda is insensitive to calibration size (paper, Fig. 4)
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8  # samples per layer call: bounds activation memory


@dataclass
class OwlConfig:
    # OWL (pruning.owl): layer sparsities within sparsity +/- lambda, more outliers (Wanda
    # scores above m x the layer mean) = sparser never; the paper's values. YAML key
    # "lambda" (a Python keyword, hence the attribute name).
    lambda_: float = field(default=0.08, metadata={"key": "lambda"})
    m: float = 5.0


@dataclass
class SparseGPTConfig:
    percdamp: float = 0.01  # damping of diag(X^T X), as a fraction of its mean (paper)
    block_size: int = 128  # columns per lazy-update block (paper)


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    granularity: str = "row"  # Wanda's per-output-row comparison group
    # uniform: every decoder layer at `sparsity`; owl: per-layer sparsities from outlier
    # ratios with the same overall sparsity (needs calibration for any method)
    allocation: str = "uniform"
    owl: OwlConfig = field(default_factory=OwlConfig)
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    # Which linears are pruned: include minus skip, as module patterns (exact name,
    # dotted suffix, glob, or "re:" regex; sparamx/select.py), the language pack.* uses.
    include: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class KVConfig:
    # sparse KV cache (sparamx.kv): none | magnitude | wanda (|k_j|·‖q_j‖ from prefill)
    method: str = "none"
    k_sparsity: float = 0.0  # share of head_dim pruned per key token (after RoPE)
    v_sparsity: float = 0.0  # per value token (wanda: |v_j|·‖o_proj columns of j‖)
    recent_window: int = 64  # newest tokens kept dense
    sink_tokens: int = 32  # first tokens kept dense (attention sinks)
    mask_tokens: int = 16  # tokens sharing one pruning mask: 16 or 1 (see README)
    k_fill: str = "mean"  # shared masks: pruned key entries read as the group mean, or zero


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["lee_news_ppl", "word_analogy_mc"])
    limit: int | None = None  # documents per task (per subtask of a group); None = all
    batch_size: int = 8


@dataclass
class PackConfig:
    include: list[str] = field(default_factory=lambda: ["*"])  # glob patterns of linears
    # lm_head stays unpruned (prune.skip) but runs on our dense-layout kernel, which
    # streams it ~2.7x faster than torch at M=1 (bench/linear.py, 49152x576); a tied
    # input embedding then reads the same packed copy.
    exclude: list[str] = field(default_factory=list)
    # auto: bitmap-bf16, or dense-bf16 below 5% sparsity (where a bitmap costs more bytes);
    # auto-int8: the same choice between bitmap-int8 and dense-int8 (weight-only int8 per
    # row and 128 columns: 0.66 bytes per weight at 50% against 1.13 for bitmap-bf16).
    storage: str = "auto"
    max_shard_gb: float = 2.0


@dataclass
class BenchConfig:
    prompts: list[str] = field(
        default_factory=lambda: [
            "The history of the printing press begins",
            "Explain in simple words why the sky is blue.",
        ]
    )
    new_tokens: int = 64
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 3  # median over repeats; one warm-up generation is not timed
    # Decode loop for the packed model: "lean" = sparamx.generate (static cache, compiled
    # step), "hf" = model.generate. The stock baseline always runs model.generate.
    engine: str = "lean"
    # Long prompts (tokens of real text) at which the packed model is timed as well,
    # weights only and, with a kv setting, weights + sparse KV cache; [] = short only.
    contexts: list[int] = field(default_factory=list)
    enabled: bool = True


@dataclass
class Config:
    name: str = "run"  # run directory: <output_dir>/<name>
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return as_dict(self)


def as_dict(obj) -> dict:
    """``dataclasses.asdict`` with the YAML keys (``owl.lambda``, not ``lambda_``)."""
    return {
        f.metadata.get("key", f.name): _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
    }


def prune_recipe(prune: PruneConfig) -> dict:
    """The prune section without the settings its method and allocation ignore (OWL's
    with a uniform allocation, SparseGPT's with another method): what identifies a
    pruned model, so a change to an unused setting re-runs nothing (and hashes from
    before those settings existed stay valid)."""
    d = as_dict(prune)
    if d["allocation"] == "uniform":
        del d["allocation"], d["owl"]
    if d["method"] != "sparsegpt":
        del d["sparsegpt"]
    return d


def needs_calibration(prune: PruneConfig) -> bool:
    """Every method but magnitude reads calibration inputs, and so does OWL."""
    return prune.method != "magnitude" or prune.allocation != "uniform"


def _plain(value):
    if dataclasses.is_dataclass(value):
        return as_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


CHOICES = {
    "model.dtype": DTYPES,
    "model.compute_dtype": COMPUTE_DTYPES,
    "model.streaming": STREAMING,
    "model.random.preset": RANDOM_PRESETS,
    "prune.method": METHODS,
    "prune.granularity": GRANULARITIES,
    "prune.allocation": ALLOCATIONS,
    "prune.calibration.source": CALIB_SOURCES,
    "kv.method": KV_METHODS,
    "pack.storage": STORAGES,
    "bench.engine": ("lean", "lean-fast", "hf"),
}


# String fields whose allowed values include true/false (auto|true|false).
BOOL_STRINGS = {"model.streaming"}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp`` (with light coercion from strings)."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is list:
        if isinstance(value, str):  # --set bench.threads=1,2
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), path)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) and path in BOOL_STRINGS:  # YAML reads `true` as a bool
            return str(value).lower()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def _build(cls, data: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    attr = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(attr) - set(attr.values()))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown field {prefix + '.' if prefix else ''}{unknown[0]} "
            f"({where} allows: {', '.join(attr)})"
        )
    kwargs = {}
    for k, v in data.items():
        name = attr.get(k, k)
        key = next(key for key, a in attr.items() if a == name)
        kwargs[name] = _coerce(v, hints[name], f"{prefix + '.' if prefix else ''}{key}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    for path, allowed in CHOICES.items():
        value = _get(cfg, path)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(allowed)}")

    def need(ok: bool, path: str, what: str):
        if not ok:
            raise ConfigError(f"{path}: {_get(cfg, path)!r} is invalid; {what}")

    need(0.0 <= cfg.prune.sparsity < 1.0, "prune.sparsity", "allowed: 0 <= sparsity < 1")
    _validate_allocation(cfg, need)
    need(cfg.prune.sparsegpt.percdamp >= 0, "prune.sparsegpt.percdamp", "must be >= 0")
    need(cfg.prune.sparsegpt.block_size > 0, "prune.sparsegpt.block_size", "must be > 0")
    need(cfg.prune.calibration.samples > 0, "prune.calibration.samples", "must be > 0")
    need(cfg.prune.calibration.seqlen > 0, "prune.calibration.seqlen", "must be > 0")
    need(cfg.prune.calibration.batch_size > 0, "prune.calibration.batch_size", "must be > 0")
    for f in ("k_sparsity", "v_sparsity"):
        need(0.0 <= getattr(cfg.kv, f) < 1.0, f"kv.{f}", "allowed: 0 <= sparsity < 1")
    need(cfg.kv.recent_window >= 0, "kv.recent_window", "must be >= 0")
    need(cfg.kv.sink_tokens >= 0, "kv.sink_tokens", "must be >= 0")
    need(cfg.kv.mask_tokens in (1, 16), "kv.mask_tokens", "allowed: 1 or 16")
    need(cfg.kv.k_fill in ("mean", "zero"), "kv.k_fill", "allowed: mean or zero")
    need(cfg.eval.limit is None or cfg.eval.limit > 0, "eval.limit", "must be > 0 or null")
    need(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    need(cfg.pack.max_shard_gb > 0, "pack.max_shard_gb", "must be > 0")
    need(
        cfg.model.random.num_layers is None or cfg.model.random.num_layers > 0,
        "model.random.num_layers",
        "must be > 0 or null",
    )
    need(
        cfg.model.random.preset == "none" or not _looks_remote(cfg.model.source),
        "model.source",
        "with model.random.preset set, model.source is the local directory the random "
        "model is written to",
    )
    for path in ("prune.include", "prune.skip", "pack.include", "pack.exclude"):
        try:
            check_patterns(_get(cfg, path), path)
        except PatternError as e:
            raise ConfigError(str(e)) from None
    need(bool(cfg.prune.include), "prune.include", "at least one pattern ('*' = all)")
    need(bool(cfg.pack.include), "pack.include", "at least one pattern ('*' = all)")
    need(cfg.bench.new_tokens > 1, "bench.new_tokens", "must be > 1")
    need(cfg.bench.repeats > 0, "bench.repeats", "must be > 0")
    need(
        bool(cfg.bench.threads) and all(t > 0 for t in cfg.bench.threads),
        "bench.threads",
        "a non-empty list of positive thread counts",
    )
    need(
        all(c > 1 for c in cfg.bench.contexts),
        "bench.contexts",
        "a list of prompt lengths in tokens, each > 1",
    )
    need(
        bool(cfg.bench.prompts) and all(p.strip() for p in cfg.bench.prompts),
        "bench.prompts",
        "a non-empty list of non-empty prompts",
    )
    need(
        bool(re.fullmatch(r"[\w.-]+", cfg.name)),
        "name",
        "use letters, digits, '.', '_' or '-' (it names the run directory)",
    )
    return cfg


def _validate_allocation(cfg: Config, need) -> None:
    owl = cfg.prune.owl
    need(0.0 <= owl.lambda_ < 1.0, "prune.owl.lambda", "allowed: 0 <= lambda < 1")
    need(owl.m > 0, "prune.owl.m", "must be > 0")
    if cfg.prune.allocation == "owl":
        s = cfg.prune.sparsity
        need(
            0.0 <= s - owl.lambda_ and s + owl.lambda_ < 1.0,
            "prune.owl.lambda",
            f"with allocation owl, sparsity {s} +/- lambda must stay in [0, 1)",
        )


def _looks_remote(source: str) -> bool:
    """A hub id (owner/name) rather than a local path."""
    return (
        not source.startswith((".", "/", "~"))
        and source.count("/") == 1
        and not Path(source).exists()
    )


def _get(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        keys = {f.metadata.get("key"): f.name for f in dataclasses.fields(obj)}
        obj = getattr(obj, keys.get(part, part))
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. prune.sparsity=0.7)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception]) -> dict:
    """The YAML mapping in ``path``; ``error`` (naming ``what`` and the file) when the
    file is missing, is not YAML, or is not a mapping at the top level."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {p}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data = read_yaml_mapping(path, "config file", ConfigError) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(_build(Config, data))
