"""Config loading: defaults, `--set` and flag overrides, the config hash, and DeepSpeed rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from trainer.config.deepspeed import list_templates, render_ds_config, zero_stage
from trainer.config.load import Overrides, config_hash, config_to_dict, flatten, load_config
from trainer.config.plan import DataSizes, resolve_plan
from trainer.config.schema import RunConfig
from trainer.errors import UserError

EXPECTED_TEMPLATES = {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
TEMPLATES = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def schema_leaves(model: type = RunConfig, prefix: str = "") -> set[str]:
    """Dotted names of every leaf field of the schema, as configs write them (`checkpoint.async`)."""
    out: set[str] = set()
    for field_name, f in model.model_fields.items():
        name = f.alias or field_name
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out |= schema_leaves(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def file_batch(config: Path) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) as written in a config file."""
    train = yaml.safe_load(config.read_text())["train"]
    return train["micro_batch_size"], train.get("grad_accum", 1)


def autos(node, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in autos(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [a for i, v in enumerate(node) for a in autos(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


# ---------------------------------------------------------------------------------------------
# Defaults


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "min.yaml", {"task": "pretrain"}))
    assert cfg == RunConfig()
    assert cfg.optim.lr == 3e-4
    plan = resolve_plan(cfg, DataSizes(10_000), 1)  # the run's length and warmup are resolved against the data
    assert (plan.max_steps, plan.warmup_steps, plan.evaluates, plan.best_metric) == (100, 10, False, "train_loss")
    assert cfg.train.micro_batch_size == 4
    assert cfg.train.grad_accum == 1
    assert cfg.train.precision == "fp32"
    assert cfg.checkpoint.keep_last == 3
    assert cfg.deepspeed.template == "zero2"
    assert cfg.deepspeed.overrides == {}


def test_an_empty_config_file_is_a_user_error_not_all_defaults(tmp_path: Path) -> None:
    for text in ("", "# nothing set\n", "\n\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=r"empty\.yaml: the config file is empty"):
            load_config(path)
    path.write_text("{}\n")  # an explicit empty mapping says "all defaults" on purpose
    assert load_config(path) == RunConfig()


@pytest.mark.parametrize(
    "url, why",
    [
        ("s3://bucket/prefix", "expected gs://BUCKET/PREFIX or file:///PATH"),
        ("gs:///prefix", "names no bucket"),
        ("file://host/ckpts", "expected file:///absolute/path"),
    ],
)
def test_an_upload_url_the_backends_cannot_take_is_one_line_naming_file_line_and_field(
    tmp_path: Path, url: str, why: str
) -> None:
    path = write_yaml(tmp_path / "u.yaml", {"task": "pretrain", "upload": {"url": url}})
    with pytest.raises(UserError) as exc:
        load_config(path)
    line = str(exc.value)
    assert line.startswith(f"{path}:3: upload.url:") and why in line and "\n" not in line, line


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "p.yaml", {"optim": {"lr": 0.01}, "train": {"grad_accum": 4}}))
    assert cfg.optim.lr == 0.01
    assert cfg.optim.schedule == "cosine" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.grad_accum == 4 and cfg.train.micro_batch_size == 4
    assert resolve_plan(cfg, DataSizes(10_000), 1).max_steps == 100


def test_file_values_are_read(tiny_config: Path, tiny_shards: Path) -> None:
    raw = yaml.safe_load(tiny_config.read_text())
    cfg = load_config(tiny_config)
    assert Path(cfg.data.path) == tiny_shards
    assert cfg.run_dir == Path(raw["run_dir"])
    for section in ("optim", "train", "checkpoint"):
        for key, value in raw[section].items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.tracking.enabled is False


# ---------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    "item, dotted, expected",
    [
        ("optim.lr=3e-4", "optim.lr", 3e-4),
        ("optim.lr=0.01", "optim.lr", 0.01),
        ("optim.betas=[0.8, 0.99]", "optim.betas", (0.8, 0.99)),
        ("optim.schedule=linear", "optim.schedule", "linear"),
        ("optim.decay_steps=1000", "optim.decay_steps", 1000),
        ("train.max_steps=50", "train.max_steps", 50),
        ("train.micro_batch_size=2", "train.micro_batch_size", 2),
        ("train.precision=bf16", "train.precision", "bf16"),
        ("train.global_batch_size=8", "train.global_batch_size", 8),
        ("model.preset=neox-1.2b", "model.preset", "neox-1.2b"),
        ("model.vocab_size=1000", "model.vocab_size", 1000),
        ("model.vocab_size=null", "model.vocab_size", None),
        ("model.gradient_checkpointing=true", "model.gradient_checkpointing", True),
        ("data.path=/somewhere/else", "data.path", "/somewhere/else"),
        ("data.check_token_ids=false", "data.check_token_ids", False),
        ("checkpoint.resume=latest", "checkpoint.resume", "latest"),
        ("upload.url=file:///tmp/uploads", "upload.url", "file:///tmp/uploads"),
        ("tracking.uri=http://mlflow:5000", "tracking.uri", "http://mlflow:5000"),
        ("tracking.flush_every_s=2.5", "tracking.flush_every_s", 2.5),
        ("deepspeed.template=zero3", "deepspeed.template", "zero3"),
        ("run_id=my-run", "run_id", "my-run"),
        ("run_dir=/tmp/elsewhere", "run_dir", Path("/tmp/elsewhere")),
    ],
)
def test_set_overrides_a_field_with_its_type(tiny_config: Path, item: str, dotted: str, expected) -> None:
    cfg = load_config(tiny_config, Overrides(sets=[item]))
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_set_lr_scientific_notation_gives_float(tiny_config: Path) -> None:
    cfg = load_config(tiny_config, Overrides(sets=["optim.lr=3e-4"]))
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_set_nested_dict_into_deepspeed_overrides(tiny_config: Path) -> None:
    cfg = load_config(
        tiny_config,
        Overrides(
            sets=[
                "deepspeed.overrides.zero_optimization.stage=1",
                "deepspeed.overrides.zero_optimization.overlap_comm=false",
            ]
        ),
    )
    assert cfg.deepspeed.overrides == {"zero_optimization": {"stage": 1, "overlap_comm": False}}
    ds = render_ds_config(cfg, 1, 64)
    assert zero_stage(ds) == 1
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # merged, not replaced


def test_later_set_wins(tiny_config: Path) -> None:
    cfg = load_config(tiny_config, Overrides(sets=["train.seed=1", "train.seed=2"]))
    assert cfg.train.seed == 2


def leaf_annotations(model: type = RunConfig, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for field_name, f in model.model_fields.items():
        name, ann = f.alias or field_name, f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out.update(leaf_annotations(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = ann
    return out


# Leaves whose other valid value cannot be derived from the type alone (ranges, formats), and the leaves that
# cross-field rules change with them (`KEY=VALUE` sets, given as they would be on the command line).
LORA = [
    'task="lora"',
    'lora={"llm_path": "/models/qwen", "phase1_checkpoint": "/models/p1.safetensors"}',
    "data.val_fraction=null",
]
OTHER_VALUES: dict[str, tuple[object, list[str]]] = {
    "task": ("lora", LORA[1:]),
    "lora": ({"llm_path": "/models/qwen", "phase1_checkpoint": "/models/p1.safetensors"}, [LORA[0], LORA[2]]),
    "model.preset": ("neox-410m", []),
    "model.hidden_size": (128, []),
    "model.num_heads": (8, []),
    "model.seq_len": (256, []),
    "optim.betas": ([0.8, 0.99], []),
    "optim.min_lr_ratio": (0.2, []),
    "optim.warmup_ratio": (0.1, ["optim.warmup_steps=null"]),
    "train.epochs": (2.0, ["train.max_steps=null"]),
    "train.global_batch_size": (16, []),
    "train.max_steps": (200, []),
    "eval.every": (25, []),
    "data.val_path": ("/data/val", ["data.val_fraction=null"]),
    "data.val_file": ("val.jsonl", LORA),
    "data.fields": ({"response": "answer"}, LORA),
    "data.num_workers": (2, LORA),
    "checkpoint.resume": ("latest", []),
    "upload.url": ("file:///tmp/uploads", []),
    "tracking.uri": ("http://mlflow:5000", []),
    "run_dir": ("/tmp/elsewhere", []),
    "deepspeed.overrides": ({"gradient_clipping": 2.0}, []),
}


def another_value(value: object, ann: object) -> object:
    """A value of the leaf's type that differs from `value`."""
    import typing

    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
        choices = typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else typing.get_args(args[0])
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "-x"
    if value is None:
        kinds = set(args)
        if bool in kinds:
            return True
        if int in kinds:
            return 7
        if float in kinds:
            return 0.5
        return "x"
    raise AssertionError(f"no other value for {value!r} ({ann})")


def test_every_schema_field_can_be_set(tiny_config: Path) -> None:
    """`--set KEY=VALUE` works for every leaf of the schema: each set to a value it does not have takes that value,
    and no other leaf changes."""
    base = load_config(tiny_config)
    leaves = flatten(config_to_dict(base))
    assert set(leaves) == schema_leaves()
    annotations = leaf_annotations()
    failures = []
    for key, value in leaves.items():
        new, companions = OTHER_VALUES.get(key) or (another_value(value, annotations[key]), [])
        assert new != value, key
        try:
            doc = config_to_dict(load_config(tiny_config, Overrides(sets=[f"{key}={json.dumps(new)}", *companions])))
        except UserError as exc:
            failures.append(f"{key}={new!r}: {exc}")
            continue
        read = doc
        for part in key.split("."):
            read = read[part]
        if isinstance(new, dict) and isinstance(read, dict):  # a section: what was set, the rest its defaults
            read = {k: read.get(k) for k in new}
        if read != new and not (isinstance(read, (list, tuple)) and list(read) == list(new)):  # type: ignore[call-overload]
            failures.append(f"{key}: set to {new!r}, reads {read!r}")
        got = flatten(doc)
        also = {c.split("=", 1)[0] for c in companions}
        changed = sorted(
            k
            for k in leaves
            if k != key and got.get(k) != leaves[k] and not any(k == a or k.startswith(a + ".") for a in also)
        )
        if changed:
            failures.append(f"{key}: also changed {changed}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "item, dotted, expected",
    [("run_id=1234", "run_id", "1234"), ("tracking.experiment=2024", "tracking.experiment", "2024")],
)
def test_set_numeric_looking_value_into_string_field(tiny_config: Path, item: str, dotted: str, expected: str) -> None:
    cfg = load_config(tiny_config, Overrides(sets=[item]))
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    assert value == expected


# ---------------------------------------------------------------------------------------------
# Flag overrides


def test_overrides_flags_set_their_fields(tiny_config: Path) -> None:
    cfg = load_config(tiny_config, Overrides(max_steps=50, batch_size=2, learning_rate=1e-3, resume="latest"))
    assert cfg.train.max_steps == 50
    assert cfg.train.micro_batch_size == 2
    assert cfg.optim.lr == 1e-3
    assert cfg.checkpoint.resume == "latest"


def test_flags_apply_after_set(tiny_config: Path) -> None:
    cfg = load_config(
        tiny_config, Overrides(sets=["train.max_steps=70", "optim.lr=0.5"], max_steps=50, learning_rate=1e-3)
    )
    assert cfg.train.max_steps == 50
    assert cfg.optim.lr == 1e-3


def test_no_overrides_leave_file_values(tiny_config: Path) -> None:
    assert load_config(tiny_config, Overrides()) == load_config(tiny_config)


def test_overrides_to_argv_round_trip() -> None:
    ov = Overrides(
        sets=["optim.lr=3e-4", "train.seed=7"], max_steps=50, batch_size=2, learning_rate=1e-3, resume="step-00000100"
    )
    argv = ov.to_argv()
    assert argv == [
        "--set",
        "optim.lr=3e-4",
        "--set",
        "train.seed=7",
        "--max-steps",
        "50",
        "--batch-size",
        "2",
        "--learning-rate",
        "0.001",
        "--resume",
        "step-00000100",
    ]
    assert float(argv[argv.index("--learning-rate") + 1]) == 1e-3


def test_flags_via_cli(tiny_config: Path) -> None:
    r = run_cli(
        "config",
        "show",
        str(tiny_config),
        "--json",
        "--max-steps",
        "50",
        "--batch-size",
        "2",
        "--learning-rate",
        "0.001",
        "--set",
        "train.grad_accum=3",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["train"]["max_steps"] == 50
    assert doc["train"]["micro_batch_size"] == 2
    assert doc["train"]["grad_accum"] == 3
    assert doc["optim"]["lr"] == 0.001
    assert doc["resolved"]["deepspeed_json"]["train_batch_size"] == 6


# ---------------------------------------------------------------------------------------------
# Config hash


def test_config_hash_is_stable(tiny_config: Path) -> None:
    h = config_hash(load_config(tiny_config))
    assert h == config_hash(load_config(tiny_config))
    assert len(h) == 16 and int(h, 16) >= 0


def test_config_hash_same_in_another_process(tiny_config: Path) -> None:
    r = run_cli("config", "show", str(tiny_config), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resolved"]["config_hash"] == config_hash(load_config(tiny_config))


@pytest.mark.parametrize(
    "ov",
    [
        Overrides(max_steps=1000),
        Overrides(sets=["train.max_steps=25"]),
        Overrides(resume="latest"),
        Overrides(sets=["checkpoint.resume=step-00000100"]),
        Overrides(sets=["run_dir=/tmp/another/place"]),
        Overrides(sets=["run_id=some-run"]),
        Overrides(sets=["upload.url=file:///tmp/up"]),
        Overrides(sets=["tracking.enabled=true"]),
    ],
    ids=["max-steps", "set-max-steps", "resume", "set-resume", "run_dir", "run_id", "upload", "tracking"],
)
def test_config_hash_ignores_run_length_resume_and_outputs(tiny_config: Path, ov: Overrides) -> None:
    assert config_hash(load_config(tiny_config, ov)) == config_hash(load_config(tiny_config))


@pytest.mark.parametrize(
    "item",
    [
        "optim.lr=0.001",
        "train.seed=7",
        "train.micro_batch_size=2",
        "model.seq_len=64",
        "deepspeed.template=zero1",
        "train.precision=bf16",
    ],
)
def test_config_hash_changes_with_trajectory_settings(tiny_config: Path, item: str) -> None:
    assert config_hash(load_config(tiny_config, Overrides(sets=[item]))) != config_hash(load_config(tiny_config))


# ---------------------------------------------------------------------------------------------
# DeepSpeed rendering


def test_all_expected_templates_exist() -> None:
    assert EXPECTED_TEMPLATES <= set(TEMPLATES)
    assert EXPECTED_TEMPLATES <= set(list_templates())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("hidden", [64, None], ids=["hidden", "no-hidden"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_render_fills_every_auto(tiny_config: Path, template: str, world: int, hidden) -> None:
    cfg = load_config(
        tiny_config,
        Overrides(
            sets=[
                f"deepspeed.template={template}",
                "train.micro_batch_size=2",
                "train.grad_accum=3",
                "optim.grad_clip=0.5",
            ]
        ),
    )
    ds = render_ds_config(cfg, world, hidden)
    assert autos(ds) == []
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 2 * 3 * world
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert zero_stage(ds) == int(template.removeprefix("zero")[0])
    if "optimizer" in ds:
        params = ds["optimizer"]["params"]
        assert params["lr"] == cfg.optim.lr
        assert params["betas"] == list(cfg.optim.betas)
        assert params["eps"] == cfg.optim.eps
        assert params["weight_decay"] == cfg.optim.weight_decay
    if hidden:
        zo = ds["zero_optimization"]
        if "reduce_bucket_size" in zo:
            assert zo["reduce_bucket_size"] == 50_000_000  # not 64^2: hundreds of tiny buckets cost 1.2x the step
    wide = render_ds_config(cfg, world, 8192)["zero_optimization"]  # hidden^2 once it is the larger
    assert wide.get("reduce_bucket_size", 8192**2) == 8192**2
    json.dumps(ds)  # a valid JSON document


@pytest.mark.parametrize("template", ["zero2_offload", "zero3_offload"])
def test_offload_templates_keep_offload_and_optimizer(tiny_config: Path, template: str) -> None:
    cfg = load_config(tiny_config, Overrides(sets=[f"deepspeed.template={template}"]))
    ds = render_ds_config(cfg, 2, 64)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize(
    "precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_render_precision_switches(tiny_config: Path, precision: str, bf16: bool, fp16: bool) -> None:
    cfg = load_config(tiny_config, Overrides(sets=[f"train.precision={precision}"]))
    ds = render_ds_config(cfg, 1, 64)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16


def test_render_accepts_a_json_path(tiny_config: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom.json"
    custom.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 1},
            }
        )
    )
    cfg = load_config(
        tiny_config, Overrides(sets=[f"deepspeed.template={custom}", "train.micro_batch_size=8", "train.grad_accum=1"])
    )
    ds = render_ds_config(cfg, 2, 64)
    # The keys the run config owns are filled even when a custom template leaves them out.
    assert ds == {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 1},
    }


def test_render_global_batch_size_matching_world_is_accepted(tiny_config: Path) -> None:
    cfg = load_config(
        tiny_config, Overrides(sets=["train.global_batch_size=16", "train.micro_batch_size=8", "train.grad_accum=1"])
    )
    assert render_ds_config(cfg, 2, 64)["train_batch_size"] == 16
    with pytest.raises(UserError, match="global_batch_size"):
        render_ds_config(cfg, 1, 64)


@pytest.mark.parametrize("world", [1, 2])
def test_config_show_json_reports_deepspeed_json(tiny_config: Path, world: int) -> None:
    r = run_cli("config", "show", str(tiny_config), "--num-ranks", str(world), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    micro, accum = file_batch(tiny_config)
    resolved = doc["resolved"]
    assert resolved["world_size"] == world
    ds = resolved["deepspeed_json"]
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert autos(ds) == []
    assert doc["optim"]["lr"] == yaml.safe_load(tiny_config.read_text())["optim"]["lr"]
    assert doc["deepspeed"]["template"] == "zero2"


def test_config_show_yaml_default_output(tiny_config: Path) -> None:
    r = run_cli("config", "show", str(tiny_config), "--num-ranks", "2", "--set", "train.grad_accum=2")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    micro, _ = file_batch(tiny_config)
    assert doc["resolved"]["deepspeed_json"]["train_batch_size"] == micro * 2 * 2
    assert doc["train"]["grad_accum"] == 2


def test_config_show_uses_hostfile_slots(tiny_config: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two workers\nworker-1 slots=2\nworker-2 slots=2\n")
    r = run_cli("config", "show", str(tiny_config), "--hostfile", str(hostfile), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    micro, accum = file_batch(tiny_config)
    assert doc["resolved"]["world_size"] == 4
    assert doc["resolved"]["deepspeed_json"]["train_batch_size"] == micro * accum * 4
