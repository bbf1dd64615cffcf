"""The checkpoint policy a user writes, as keyword arguments or YAML.

One `CheckpointPolicy` drives the Lightning, Keras and Paddle adapters alike.
Every invalid input becomes a `PolicyError` whose message names the field, the
value received and the fix (and, for YAML, the file and line).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["min", "max"]
Format = Literal["weights", "model", "training_state"]
FORMATS: tuple[str, ...] = ("weights", "model", "training_state")

# Tokens of a metric name that say which way is better, for mode="auto".
_MAX_TOKENS = frozenset(
    {"acc", "accuracy", "auc", "auroc", "f1", "precision", "recall", "iou", "miou", "map", "score", "dice", "r2", "bleu"}
)
_MIN_TOKENS = frozenset(
    {"loss", "error", "err", "mae", "mse", "rmse", "mape", "perplexity", "ppl", "wer", "cer", "nll"}
)


class PolicyError(ValueError):
    """An invalid policy or argument: the message names the field, the value and the fix."""


def metric_direction(name: str) -> Mode | None:
    """Which way a metric name says is better: "max", "min", or None when the name does not tell."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    tokens = {t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t}
    wants_max = bool(tokens & _MAX_TOKENS)
    wants_min = bool(tokens & _MIN_TOKENS)
    if wants_max and not wants_min:
        return "max"
    if wants_min and not wants_max:
        return "min"
    return None


def template_fields(template: str) -> list[tuple[str, str]]:
    """The (name, format spec) of each placeholder in a filename template; raises ValueError on bad syntax."""
    fields = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "":
            raise ValueError("a placeholder has no name ('{}'); write e.g. '{epoch}'")
        if conversion:
            raise ValueError(f"conversions such as '!{conversion}' are not supported in '{{{name}!{conversion}}}'")
        fields.append((name, spec or ""))
    return fields


class _PolicyMeta(type(BaseModel)):  # type: ignore[misc]
    """Construction from keyword arguments raises PolicyError, never pydantic's ValidationError."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise PolicyError(describe_validation_error(exc, cls)) from None


class SnapshotPolicy(BaseModel, metaclass=_PolicyMeta):
    """Periodic epoch snapshots, kept outside the top-k rotation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    every_n_epochs: int | None = Field(
        default=None, ge=1, description="Save a snapshot after every N-th epoch (epochs N, 2N, ...); null disables snapshots."
    )
    keep: int | None = Field(default=None, ge=1, description="Keep the newest N snapshots; null keeps every snapshot.")
    keep_every_n_hours: float | None = Field(
        default=None,
        gt=0,
        description="Also keep, forever, the first checkpoint of every N hours of training (counted from the run's first checkpoint), whatever the other rules drop; tagged milestone.",
    )


class CheckpointPolicy(BaseModel, metaclass=_PolicyMeta):
    """What to save, when, and what to keep. Shared by every framework adapter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dirpath: str = Field(default="checkpoints", description="Directory for checkpoints: a local path or an fsspec URL (s3://bucket/run).")
    monitor: str | None = Field(default=None, description="Logged metric to rank checkpoints by, e.g. val_loss; null ranks by recency.")
    mode: Literal["min", "max", "auto"] = Field(
        default="auto",
        description="min or max: which direction of the monitored value is better; auto picks max for names like acc, auc, f1, precision, recall, iou, map, score and min otherwise.",
    )
    min_delta: float = Field(default=0.0, ge=0.0, description="An improvement smaller than this does not count as one.")
    save_best_only: bool = Field(default=False, description="Save only when the monitored value improves on the best so far.")
    top_k: int = Field(default=1, description="Best checkpoints kept: -1 keeps all, 0 none, k the k best (the k newest without a monitor).")
    format: Format | None = Field(
        default=None,
        description="weights, model or training_state; null takes the framework's native default (Lightning and Paddle: training_state, Keras: model).",
    )
    filename: str | None = Field(
        default=None,
        description="File name template without extension; placeholders {epoch}, {step} and any logged metric, with format specs, e.g. 'epoch={epoch:03d}-{val_loss:.4f}'. null picks one from the monitor.",
    )
    snapshots: SnapshotPolicy = Field(default_factory=SnapshotPolicy, description="Periodic epoch snapshots outside the top-k rotation.")
    every_n_steps: int | None = Field(
        default=None,
        ge=1,
        description="Also save a training_state every N optimizer steps, mid-epoch (tagged last); null disables it.",
    )
    every_n_minutes: float | None = Field(
        default=None,
        gt=0,
        description="Also save a training_state when N minutes of wall time passed since the last save; null disables it.",
    )
    save_on_preemption: bool = Field(
        default=True,
        description="On SIGTERM (schedulers, spot instances) or an exception escaping fit(), save a training_state tagged preempted before the process ends.",
    )
    last: bool = Field(default=True, description="Keep a rolling training_state checkpoint of the newest epoch, used to resume.")
    resume: str = Field(default="auto", description="auto resumes from the newest verified training_state in dirpath; never starts fresh; or a checkpoint path to resume from.")
    async_save: bool = Field(
        default=False,
        description="Write, hash, commit and prune in a background worker, one save in flight at most: training waits only for a copy of the state in host memory (Paddle model exports and Keras legacy .h5 files are still written by the training thread).",
    )
    verify: bool = Field(default=True, description="Record a checksum for every file and verify it before resuming from it.")
    on_save_error: Literal["raise", "warn"] = Field(
        default="raise", description="When a save fails (disk full, permissions): raise stops training, warn logs and trains on."
    )
    verbose: bool = Field(default=False, description="Log every save, prune and resume at INFO instead of DEBUG.")

    # -- validation -----------------------------------------------------------------

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if value < -1:
            raise ValueError(f"top_k must be -1 (keep all), 0 (keep none) or a positive count. Received: top_k={value}")
        return value

    @field_validator("dirpath")
    @classmethod
    def _dirpath_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("dirpath must name a directory, e.g. dirpath='checkpoints/run1'. Received: dirpath=''")
        return value

    @field_validator("monitor")
    @classmethod
    def _monitor_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("monitor must be a logged metric name such as 'val_loss', or null. Received: monitor=''")
        return value

    @field_validator("resume")
    @classmethod
    def _resume_value(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("resume must be 'auto', 'never' or a checkpoint path. Received: resume=''")
        return value

    @field_validator("filename")
    @classmethod
    def _filename_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "/" in value or "\\" in value:
            raise ValueError(
                f"filename is a file name, not a path; put directories in dirpath. Received: filename={value!r}"
            )
        try:
            fields = template_fields(value)
        except ValueError as exc:
            raise ValueError(f"filename template is not valid ({exc}). Received: filename={value!r}") from None
        for name, spec in fields:
            sample: Any = 1 if name in ("epoch", "step") else 0.5
            try:
                format(sample, spec)
            except ValueError:
                raise ValueError(
                    f"format spec ':{spec}' of placeholder '{{{name}}}' does not fit a number. "
                    f"Received: filename={value!r}"
                ) from None
        if not value.strip() or not any(c.isalnum() for c in value):
            raise ValueError(f"filename must produce a non-empty name. Received: filename={value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointPolicy:
        if self.monitor is None:
            if self.save_best_only:
                raise ValueError(
                    "save_best_only=True needs a monitor to decide what is best; set monitor='val_loss' (for example) "
                    "or save_best_only=False"
                )
            if self.top_k not in (-1, 0, 1):
                raise ValueError(
                    f"top_k={self.top_k} needs a monitor to rank checkpoints; set monitor='val_loss' (for example), "
                    "or top_k=1 to keep the newest, or top_k=-1 to keep all"
                )
        if self.save_best_only and self.top_k == 0:
            raise ValueError("save_best_only=True with top_k=0 would save checkpoints only to delete them; set top_k >= 1 or -1")
        if self.monitor is not None and self.mode != "auto":
            implied = metric_direction(self.monitor)
            if implied is not None and implied != self.mode:
                raise ValueError(
                    f"mode={self.mode!r} contradicts monitor={self.monitor!r}, which is better when {'higher' if implied == 'max' else 'lower'}; "
                    f"set mode={implied!r} or mode='auto'"
                )
        return self

    # -- derived values -------------------------------------------------------------

    @property
    def resolved_mode(self) -> Mode:
        """The effective direction: mode itself, or what mode='auto' infers from the monitor's name."""
        if self.mode != "auto":
            return self.mode
        if self.monitor is not None and metric_direction(self.monitor) == "max":
            return "max"
        return "min"

    @property
    def filename_template(self) -> str:
        """The filename template in force (the default one derives from the monitor)."""
        if self.filename is not None:
            return self.filename
        if self.monitor is None:
            return "epoch={epoch:03d}-step={step}"
        return "epoch={epoch:03d}-" + self.monitor + "={" + self.monitor + ":.4f}"

    # -- YAML -----------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> CheckpointPolicy:
        """Read a policy from a YAML file; errors name the file and the line."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {str(path)!r}: {exc.strerror or exc}") from None
        return cls.from_yaml_text(text, source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<string>") -> CheckpointPolicy:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(exc, "problem", None) or str(exc)
            raise PolicyError(f"{where}: not valid YAML ({problem}); fix the syntax at that line") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyError(f"{source}:1: a policy must be a mapping of fields (dirpath: ..., monitor: ...). Received: {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(describe_validation_error(exc, cls, source=source, node=node)) from None

    def to_yaml(self) -> str:
        """The policy as YAML; `from_yaml_text(p.to_yaml()) == p`."""
        text: str = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        return text

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_policy(
    source: CheckpointPolicy | Mapping[str, Any] | str | os.PathLike[str] | None = None, **overrides: Any
) -> CheckpointPolicy:
    """A policy from a policy object, a mapping, or a YAML file path, with keyword overrides applied on top."""
    if source is None:
        base: dict[str, Any] = {}
    elif isinstance(source, CheckpointPolicy):
        base = source.model_dump()
    elif isinstance(source, Mapping):
        base = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        base = CheckpointPolicy.from_yaml(os.fspath(source)).model_dump()
    else:
        raise PolicyError(
            f"policy must be a CheckpointPolicy, a dict or a YAML file path. Received: {type(source).__name__}"
        )
    if overrides:
        base.update(overrides)
    if not overrides and isinstance(source, CheckpointPolicy):
        return source
    try:
        return CheckpointPolicy.model_validate(base)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc, CheckpointPolicy)) from None


# -- error messages -----------------------------------------------------------------


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid field names at the place `loc` points to (for did-you-mean suggestions)."""
    current: type[BaseModel] = model
    for part in loc:
        field = current.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            break
    return list(current.model_fields)


def _yaml_line(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (the key itself for the last part), if it can be found."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == str(part):
                line = key.start_mark.line + 1
                node = value
                break
        else:
            break
    return line


def _fix_for(error: Mapping[str, Any], field: str) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"use one of {ctx.get('expected', '')}"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        return f"use a value >= {bound}" if kind == "greater_than_equal" else f"use a value > {bound}"
    if kind.startswith("int_"):
        return "use a whole number"
    if kind.startswith("float_"):
        return "use a number"
    if kind.startswith("bool"):
        return "use true or false"
    if kind.startswith("string"):
        return "use a string"
    if kind == "model_type" or kind == "dict_type":
        return "use a mapping of its fields"
    return "see `checkpoint-hooks policy schema` for the expected type"


def describe_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str | None = None, node: Any = None
) -> str:
    """One readable line per problem: where, which field, what was received, and the fix."""
    lines = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        field = ".".join(str(p) for p in loc)
        where = ""
        if source is not None:
            line = _yaml_line(node, loc) if node is not None else None
            where = f"{source}:{line}: " if line else f"{source}: "
        kind = error.get("type", "")
        received = error.get("input")
        if kind == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            known = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            lines.append(f"{where}unknown field {name!r}; {hint}")
            continue
        if kind == "value_error":
            message = str(error.get("msg", "")).removeprefix("Value error, ")
            lines.append(f"{where}{message}" if not field or message.startswith(field) else f"{where}{field}: {message}")
            continue
        shown = received
        if isinstance(received, float) and not math.isfinite(received):
            shown = str(received)
        lines.append(f"{where}{field}: {error.get('msg')}; {_fix_for(error, field)}. Received: {field}={shown!r}")
    return "\n".join(lines) if lines else str(exc)


def _type_name(annotation: Any) -> str:
    """A type as a reader says it: 'str or null', 'min, max or auto'."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        names = [str(a) for a in args]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    if args:
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """The policy reference, generated from the model's fields and their descriptions (docs/policy.md)."""
    lines = [
        "# Policy reference",
        "",
        "Generated from `CheckpointPolicy` by `checkpoint-hooks policy reference`; a test keeps this page",
        "and the model in agreement. Every field can be given as a keyword argument or in YAML.",
        "",
        "| field | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]

    def rows(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                lines.append(f"| `{prefix}{name}` | mapping | | {field.description} |")
                rows(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            shown = "null" if default is None else json_default(default)
            lines.append(f"| `{prefix}{name}` | {_type_name(annotation)} | `{shown}` | {field.description} |")

    rows(CheckpointPolicy, "")
    return "\n".join(lines) + "\n"


def json_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
