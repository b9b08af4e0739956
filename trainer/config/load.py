"""Load a run config: YAML file -> overrides -> validated `RunConfig`.

Errors are `UserError`s with one line per problem naming the file and line (or the `--set`
override) and the field, e.g. `configs/x.yaml:12: train.micro_batch_size: Input should be
greater than or equal to 1 (got 0)`.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from trainer.config.schema import RunConfig
from trainer.errors import UserError


@dataclass
class Overrides:
    """Command-line changes applied over the YAML file, in order."""

    sets: list[str] = field(default_factory=list)
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    resume: Optional[str] = None

    def as_pairs(self) -> list[tuple[str, str, Any]]:
        """(origin, dotted key, value) for every override; origin names the flag for error lines."""
        pairs: list[tuple[str, str, Any]] = []
        for item in self.sets:
            if "=" not in item:
                raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
            key, raw = item.split("=", 1)
            key = key.strip()
            if not key:
                raise UserError(f"--set {item}: the key before '=' is empty")
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
            pairs.append((f"--set {item}", key, value))
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("--max-steps and --num-epochs: give one")
        # the run's length in steps or in epochs: a flag for one replaces the file's setting of the other
        if self.max_steps is not None:
            pairs.append((f"--max-steps {self.max_steps}", "train.epochs", None))
        if self.epochs is not None:
            pairs.append((f"--num-epochs {self.epochs:g}", "train.max_steps", None))
        for flag, key, value in (
            ("--max-steps", "train.max_steps", self.max_steps),
            ("--num-epochs", "train.epochs", self.epochs),
            ("--batch-size", "train.micro_batch_size", self.batch_size),
            ("--learning-rate", "optim.lr", self.learning_rate),
            ("--resume", "checkpoint.resume", self.resume),
        ):
            if value is not None:
                pairs.append((f"{flag} {value}", key, value))
        return pairs

    def to_argv(self) -> list[str]:
        """The same overrides as command-line arguments (passed through the launcher to every rank)."""
        argv: list[str] = []
        for item in self.sets:
            argv += ["--set", item]
        if self.max_steps is not None:
            argv += ["--max-steps", str(self.max_steps)]
        if self.epochs is not None:
            argv += ["--num-epochs", repr(self.epochs)]
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        if self.learning_rate is not None:
            argv += ["--learning-rate", repr(self.learning_rate)]
        if self.resume is not None:
            argv += ["--resume", self.resume]
        return argv


def _read_yaml(path: Path) -> tuple[dict, Optional[yaml.Node]]:
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML config file")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if data is None:  # an empty file (or only comments) is a mistake: a run of nothing but defaults is never meant
        raise UserError(
            f"{path}: the config file is empty (expected sections such as task:, data:, train:; see"
            " configs/pretrain_tiny.yaml)"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data, node


def _line_of(node: Optional[yaml.Node], loc: Iterable[Any]) -> Optional[int]:
    """1-based line of the deepest key of `loc` found in the YAML node tree."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
                continue
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def _set_dotted(data: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    cursor = data
    for part in parts[:-1]:
        nxt = cursor.get(part)
        if nxt is None:
            nxt = cursor[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{origin}: {part} is not a section, cannot set {key}")
        cursor = nxt
    cursor[parts[-1]] = value


def _describe(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; `trainer config fields` lists the valid keys)"
    if err["type"] == "missing":
        return "required field is missing"
    if "input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict):
        return f"{msg} (got {err['input']!r})"
    return msg


def _is_text_field(dotted: str) -> bool:
    """True if the schema types `dotted` as text (str or Path, optionally None)."""
    model: Any = RunConfig
    annotation: Any = None
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a in (str, Path) for a in args)


_LEADING_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)\b")


def load_config(path: Path | str, overrides: Optional[Overrides] = None) -> RunConfig:
    """Read, override and validate a run config; raise `UserError` listing every problem."""
    path = Path(path)
    data, node = _read_yaml(path)
    origins: dict[tuple[str, ...], str] = {}
    for origin, key, value in (overrides or Overrides()).as_pairs():
        if value is not None and not isinstance(value, str) and _is_text_field(key) and origin.startswith("--set "):
            value = origin.split("=", 1)[1]  # `--set run_id=0042` means the text "0042", not a number
        _set_dotted(data, key, value, origin)
        origins[tuple(key.split("."))] = origin
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            named = _LEADING_FIELD.match(err["msg"].removeprefix("Value error, "))
            if named and named.group(1).startswith(".".join(loc)):  # a section rule: point at the field it names
                loc = tuple(named.group(1).split("."))
                err = {**err, "loc": loc}
            dotted = ".".join(loc) if loc else "(config)"
            origin = next((o for k, o in origins.items() if loc[: len(k)] == k), None)
            if origin is not None:
                where = origin
            else:
                line = _line_of(node, err["loc"])
                where = f"{path}:{line}" if line else str(path)
            msg = _describe(err)
            if err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
                if msg.startswith(dotted + " "):
                    msg = msg[len(dotted) + 1 :]
            lines.append(f"{where}: {dotted}: {msg}")
        raise UserError("\n".join(lines)) from None


def config_to_dict(cfg: RunConfig) -> dict:
    """JSON-safe dict of the resolved config (paths as strings)."""
    return cfg.model_dump(mode="json")


def model_identity(cfg: RunConfig) -> dict:
    """The settings that fix a checkpoint's parameter shapes, recorded in its metadata and compared on resume."""
    data = config_to_dict(cfg)
    if cfg.task == "lora":
        lora = data["lora"]
        return {k: lora[k] for k in ("r", "alpha", "target_modules", "soft_tokens", "projector_hidden")}
    from trainer.models.neox import dims_of

    return {**data["model"], **dims_of(cfg.model)}  # the fields as configured, and the sizes they resolve to


_NOT_SHAPES = ("attn_implementation", "gradient_checkpointing", "dropout", "max_position_embeddings")


def architecture(model: dict) -> dict:
    """The part of a recorded model identity that fixes the parameters' shapes (and the data windows).

    Metadata written before the sizes were recorded holds only the preset and its overrides: those
    are resolved here, so that old and new checkpoints compare alike.
    """
    from trainer.config.schema import ModelConfig

    if "preset" in model:
        from pydantic import ValidationError

        from trainer.models.neox import dims_of

        try:
            model = {
                **model,
                **dims_of(
                    ModelConfig.model_validate({k: v for k, v in model.items() if k in ModelConfig.model_fields})
                ),
            }
        except ValidationError:
            pass  # a preset this version does not know: compare what was recorded
        model.pop("preset", None)  # the sizes decide, not the name they came from
    return {k: v for k, v in model.items() if k not in _NOT_SHAPES}


def architecture_difference(recorded: dict, wanted: dict) -> str:
    """`num_layers 2 there, 3 here; ...` for the settings in which two model identities differ ('' if none)."""
    a, b = architecture(recorded), architecture(wanted)
    return "; ".join(f"{k} {a.get(k)} there, {b.get(k)} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of the settings that define the training trajectory.

    Excludes what may legitimately change between a run and its resume (where to resume from, how
    long to train, where outputs and uploads go, tracking). Hash the config as written, before the
    batch is resolved for a world size (`config.batch.resolve_batch`): a run resumed on another
    world size keeps its hash.
    """
    data = config_to_dict(cfg)
    data.pop("run_dir", None)
    data.pop("run_id", None)
    data.pop("upload", None)
    data.pop("tracking", None)
    data["checkpoint"].pop("resume", None)
    data["checkpoint"].pop("async", None)  # how saves are written, not what is trained
    data["train"].pop("max_steps", None)
    data["train"].pop("epochs", None)
    data.pop("eval", None)  # evaluation reads the model, it does not change what is trained
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def public_config_dict(cfg: RunConfig) -> dict:
    """The config as saved beside checkpoints and logged to MLflow: credentials in URLs hidden."""
    from trainer.log import redact

    data = config_to_dict(cfg)
    for section, key in (("tracking", "uri"), ("upload", "url")):
        if data[section].get(key):
            data[section][key] = redact(data[section][key])
    return data


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(public_config_dict(cfg), sort_keys=False)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (MLflow params, config diffs)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
