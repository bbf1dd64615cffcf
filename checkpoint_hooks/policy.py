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
import reprlib
import string
from collections.abc import Mapping, Sized
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["min", "max"]
Format = Literal["weights", "model", "training_state", "sharded"]
FORMATS: tuple[str, ...] = ("weights", "model", "training_state", "sharded")

# Tokens of a metric name that say which way is better, for mode="auto".
_MAX_TOKENS = frozenset(
    {"acc", "accuracy", "auc", "auroc", "f1", "precision", "recall", "iou", "miou", "map", "score", "dice", "r2", "bleu"}
)
_MIN_TOKENS = frozenset(
    {"loss", "error", "err", "mae", "mse", "rmse", "mape", "perplexity", "ppl", "wer", "cer", "nll"}
)

# Bounds for policy input written by someone else: a policy is a few dozen short lines.
MAX_POLICY_BYTES = 1024 * 1024  # a larger file is not a policy (wrong path, or an attack)
MAX_NESTING = 32  # a policy nests two levels; deeper YAML would only exhaust the parser's recursion
MAX_INT_CHARS = 40  # no count needs more digits; long integers are slow or impossible to convert
MAX_SHOWN = 200  # characters of a received value an error message repeats
MAX_PROBLEMS = 5  # problems listed in one message; the rest are counted
MAX_SPEC_NUMBER = 64  # widths and precisions in a filename placeholder
MAX_NAME_BYTES = 200  # a rendered file name, leaving room for '-vN', the extension and '.meta.json' under 255


class PolicyError(ValueError):
    """An invalid policy or argument: the message names the field, the value and the fix."""


def _make_bounded_repr() -> reprlib.Repr:
    """A repr of bounded cost and length, whatever the size and depth of the value."""
    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = bounded.maxfrozenset = 6
    bounded.maxstring = bounded.maxlong = MAX_SHOWN
    bounded.maxother = 60
    return bounded


_bounded_repr = _make_bounded_repr()


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value as an error message repeats it: its repr, cut to about `limit` characters.

    Values in a policy can be hostile (a gigabyte list from YAML aliases, a 5000-digit integer whose
    str() raises): the repr of containers is computed with bounded depth and width, huge integers are
    described by their digit count, and a cut repr ends with an ellipsis and the total length.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > limit * 3:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = _bounded_repr.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "..."
    if "..." in text and isinstance(value, Sized):
        text += f" ({type(value).__name__} of {len(value)} items)"
    return text


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
        if any(int(number) > MAX_SPEC_NUMBER for number in re.findall(r"\d+", spec or "")):
            raise ValueError(
                f"format spec ':{spec}' of '{{{name}}}' asks for more than {MAX_SPEC_NUMBER} characters; "
                "use a width and precision of at most that"
            )
        fields.append((name, spec or ""))
    return fields


# (epoch or step, metric value) pairs a template is tried with
_SAMPLES: tuple[tuple[int, float], ...] = ((1, 0.5), (0, -0.5), (12345, 1234.5678), (1, math.nan))


def template_problem(template: str) -> str | None:
    """Why the filename template `template` cannot name checkpoints, or None when it can."""
    if "/" in template or "\\" in template:
        return "filename is a file name, not a path; put directories in dirpath"
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return f"filename template is not valid ({exc})"
    for name, spec in fields:
        try:
            format(1 if name in ("epoch", "step") else 0.5, spec)
        except ValueError:
            return f"format spec ':{spec}' of placeholder '{{{name}}}' does not fit a number"
    if not template.strip() or not any(c.isalnum() for c in template):
        return "filename must produce a non-empty name"
    return rendered_problem(template, [name for name, _spec in fields])


def rendered_problem(template: str, placeholders: list[str]) -> str | None:
    """Why the names `template` renders cannot name checkpoints, or None when they can.

    The template is rendered with sample epochs, steps and metric values, and each name must be one
    a checkpoint directory can hold: not too long, and not one of the directory's own files (see
    `checkpoint_hooks.core.naming.reserved_reason`).
    """
    from checkpoint_hooks.core.naming import render_name, reserved_reason  # core imports this module

    for count, metric in _SAMPLES:
        values = {name: count if name in ("epoch", "step") else metric for name in placeholders}
        try:
            rendered = render_name(template, values)
        except PolicyError:
            raise  # a placeholder without a value: a mistake here, not in the template
        except ValueError:
            continue  # a spec that fits only some values fails at the save that logs such a value
        size = len(rendered.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            return f"filename makes names of {size} bytes (more than {MAX_NAME_BYTES}); shorten it"
        reason = reserved_reason(rendered)
        if reason is not None:
            return f"filename makes a name like {short_repr(rendered)}, which {reason}; choose another name"
    return None


def _default_template_works(template: str, monitor: str) -> bool:
    """Whether the default template built from `monitor` has exactly its two placeholders and renders usable names."""
    try:
        fields = template_fields(template)
    except ValueError:
        return False
    return fields == [("epoch", "03d"), (monitor, ".4f")] and rendered_problem(template, ["epoch", monitor]) is None


class _PolicyMeta(type(BaseModel)):  # type: ignore[misc]
    """Construction from keyword arguments raises PolicyError, never pydantic's ValidationError."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise PolicyError(describe_validation_error(exc, cls)) from None


class SnapshotPolicy(BaseModel, metaclass=_PolicyMeta):
    """Periodic epoch snapshots, kept outside the top-k rotation."""

    # allow_inf_nan=False: every float here is a finite amount; inf or nan would pass here and fail at fit start.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

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

    # allow_inf_nan=False: every float here is a finite amount; inf or nan would pass here and fail at fit start.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

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
        description="weights, model, training_state, or sharded (plain PyTorch loops: a torch.distributed.checkpoint folder every rank writes its shards into); null takes the framework's native default (Lightning and Paddle: training_state, Keras: model).",
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
    fsync: bool = Field(
        default=True,
        description="Flush every checkpoint file and the index to the disk (fsync) before it counts as committed. false skips the flushes: saves stay safe against a killed process (files are still renamed into place only when complete) but not against a power loss or a kernel crash, which can leave a committed checkpoint empty; for network filesystems where one fsync takes seconds.",
    )
    trust_other_owners: bool = Field(
        default=False,
        description="Resume from a checkpoint file (or directory) that belongs to another user. Off: such a resume is refused, since loading a checkpoint can run code it holds (pickles); turn it on only for directories whose writers you trust.",
    )
    on_save_error: Literal["raise", "warn"] = Field(
        default="raise", description="When a save fails (disk full, permissions): raise stops training, warn logs and trains on."
    )
    verbose: bool = Field(default=False, description="Log every save, prune and resume at INFO instead of DEBUG.")

    # -- validation -----------------------------------------------------------------

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if value < -1:
            raise ValueError(
                f"top_k must be -1 (keep all), 0 (keep none) or a positive count. Received: top_k={short_repr(value)}"
            )
        return value

    @field_validator("dirpath")
    @classmethod
    def _dirpath_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"dirpath must name a directory, e.g. dirpath='checkpoints/run1'. Received: dirpath={short_repr(value)}")
        return value

    @field_validator("monitor")
    @classmethod
    def _monitor_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"monitor must be a logged metric name such as 'val_loss', or null. Received: monitor={short_repr(value)}")
        return value

    @field_validator("resume")
    @classmethod
    def _resume_value(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"resume must be 'auto', 'never' or a checkpoint path. Received: resume={short_repr(value)}")
        return value

    @field_validator("filename")
    @classmethod
    def _filename_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        problem = template_problem(value)
        if problem is not None:
            raise ValueError(f"{problem}. Received: filename={short_repr(value)}")
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
                    f"top_k={short_repr(self.top_k)} needs a monitor to rank checkpoints; set monitor='val_loss' (for example), "
                    "or top_k=1 to keep the newest, or top_k=-1 to keep all"
                )
        if self.save_best_only and self.top_k == 0:
            raise ValueError("save_best_only=True with top_k=0 would save checkpoints only to delete them; set top_k >= 1 or -1")
        if self.monitor is not None and self.mode != "auto":
            implied = metric_direction(self.monitor)
            if implied is not None and implied != self.mode:
                raise ValueError(
                    f"mode={self.mode!r} contradicts monitor={short_repr(self.monitor)}, which is better when {'higher' if implied == 'max' else 'lower'}; "
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
        """The filename template in force: `filename`, or a default that works for any monitor name.

        The default names the monitor and its value, 'epoch=003-val_loss=0.2310' ('/' in a name such
        as 'val/loss' or 'val_loss/dataloader_idx_0' becomes '_'). A monitor that cannot be a
        placeholder ('{', '}', ':', '!' and an unclosed '[' mean something in a template), or whose
        name would make an unusable file name (too long, reserved), gets the name used without a
        monitor, 'epoch=003-step=120': Lightning's default never names the monitor, so any metric
        Lightning can monitor is accepted here too, rather than refused or failing at the first save.
        """
        if self.filename is not None:
            return self.filename
        if self.monitor is not None:
            named = "epoch={epoch:03d}-" + self.monitor + "={" + self.monitor + ":.4f}"
            if _default_template_works(named, self.monitor):
                return named
        return "epoch={epoch:03d}-step={step}"

    # -- YAML -----------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> CheckpointPolicy:
        """Read a policy from a YAML file (UTF-8, at most 1 MiB); errors name the file and the line."""
        source = os.fspath(path)
        return cls.from_yaml_text(_decode_policy(_read_policy_file(source), source), source=source)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<string>") -> CheckpointPolicy:
        """A policy from YAML text; `source` names it in error messages."""
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(f"{source}: a policy of {len(text)} characters is too large (at most 1 MiB); check the input")
        node, data = _parse_policy_yaml(text, source)
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


# -- reading YAML written by someone else ----------------------------------------------


def _read_policy_file(source: str) -> bytes:
    """The bytes of a policy file, refusing files larger than MAX_POLICY_BYTES (reading no more than that)."""
    try:
        with open(source, "rb") as stream:
            raw = stream.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {short_repr(source)}: {exc.strerror or exc}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{source}: the policy file is larger than 1 MiB; a policy is a few dozen lines, check the path"
        )
    return raw


def _decode_policy(raw: bytes, source: str) -> str:
    """Policy text as strict UTF-8 (a UTF-8 BOM is accepted); UTF-16 and latin-1 files are refused by name."""
    fix = "save the file as UTF-8"
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise PolicyError(f"{source}:{line}: not UTF-8 text (it contains NUL bytes, as UTF-16 files do); {fix}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start]
        raise PolicyError(f"{source}:{line}: not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}); {fix}") from None


class _Refused(yaml.MarkedYAMLError):  # type: ignore[misc]
    """YAML that parses but that a policy file refuses (aliases, deep nesting, duplicate keys, huge integers)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class PolicyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """yaml.SafeLoader for policy files written by someone else: bounded work, no silent surprises.

    - Aliases (`*name`) are refused altogether. A policy is a dozen scalar fields, where an alias saves
      nothing, while aliases are what expands a few hundred bytes into gigabytes ("billion laughs").
      Counting alias uses would not bound the expansion (each use can double it), and a budget on the
      expanded size would be one more limit to explain; a clear refusal is simpler. Anchors alone
      (`&name`) are harmless and accepted.
    - Nesting deeper than MAX_NESTING is refused before the recursive composer exhausts the stack.
    - A key given twice in one mapping is refused, naming both lines (YAML would silently keep the last).
    - Integers longer than MAX_INT_CHARS are refused (Python's int conversion limit, and slow base-60).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"the alias '*{_clip(event.anchor, 40)}' repeats another value; policy files do not "
                "support aliases, write the value out",
                event.start_mark,
            )
        if self._depth >= MAX_NESTING:
            raise _Refused(f"values nest more than {MAX_NESTING} levels deep; a policy nests two", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first_line: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges defaults that the mapping's own keys override, by design
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if earlier is not None:
                lines = f"on line {line}" if earlier == line else f"on lines {earlier} and {line}"
                raise _Refused(
                    f"the key {short_repr(key, 60)} is given twice, {lines}; "
                    "keep one of them (YAML would silently use the last)",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        if len(node.value) > MAX_INT_CHARS:
            raise _Refused(
                f"an integer of {len(node.value)} characters is out of range; write at most {MAX_INT_CHARS} digits",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


PolicyLoader.add_constructor("tag:yaml.org,2002:int", PolicyLoader.construct_yaml_int)


def _parse_policy_yaml(text: str, source: str) -> tuple[Any, Any]:
    """The node tree (for line numbers) and the data of a policy document; any failure is a PolicyError."""
    loader = None
    try:
        loader = PolicyLoader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except _Refused as exc:
        raise PolicyError(f"{_where(source, exc.problem_mark)}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError(
            f"{_where(source, mark)}: not valid YAML ({_clip(problem)}); fix the syntax at that line"
        ) from None
    except (RecursionError, ValueError, OverflowError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError(f"{source}: a value cannot be read ({_clip(problem)}); simplify the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def _where(source: str, mark: Any) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _clip(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    if kind == "finite_number":
        return "use a finite number (inf and nan are not allowed)"
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
    """One readable line per problem (at most MAX_PROBLEMS): where, which field, what was received, the fix.

    Received values and unknown names are shortened (`short_repr`): the input may be hostile.
    """
    lines = []
    errors = exc.errors(include_url=False)
    for error in errors[:MAX_PROBLEMS]:
        loc = tuple(error.get("loc", ()))
        field = _clip(".".join(str(p) for p in loc), 80)
        where = ""
        if source is not None:
            line = _yaml_line(node, loc) if node is not None else None
            where = f"{source}:{line}: " if line else f"{source}: "
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            known = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if len(name) <= 80 else []
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            lines.append(f"{where}unknown field {short_repr(name, 80)}; {hint}")
            continue
        if kind == "value_error":
            message = _clip(str(error.get("msg", "")).removeprefix("Value error, "), 4 * MAX_SHOWN)
            lines.append(f"{where}{message}" if not field or message.startswith(field) else f"{where}{field}: {message}")
            continue
        received = short_repr(error.get("input"))
        lines.append(f"{where}{field}: {error.get('msg')}; {_fix_for(error, field)}. Received: {field}={received}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines) if lines else f"{model.__name__} is not valid"


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
