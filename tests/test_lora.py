"""Phase 2 multimodal LoRA: the real launcher with 2 CPU ranks, a tiny Qwen2 and a tiny Phase 1
checkpoint made offline by tools/make_tiny_multimodal.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli

LORA_TINY = REPO / "configs" / "lora_tiny.yaml"


def lora_config(tiny_mm: Path, where: Path, **sections: dict) -> Path:
    cfg = yaml.safe_load(LORA_TINY.read_text())
    cfg["run_dir"] = str(where / "runs")
    cfg["lora"].update(llm_path=str(tiny_mm / "llm"), phase1_checkpoint=str(tiny_mm / "phase1.safetensors"))
    cfg["data"]["path"] = str(tiny_mm / "data")
    cfg["tracking"]["enabled"] = False
    cfg["train"].update(log_every=2, max_steps=12)
    cfg["optim"].update(decay_steps=12, warmup_steps=2)
    cfg["checkpoint"].update(save_every=6, keep_last=5)
    cfg.setdefault("eval", {}).update(every=6)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    where.mkdir(parents=True, exist_ok=True)
    path = where / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("*/checkpoints/step-*/metadata.json"))


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "metadata.json").read_text())


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


ZERO3_PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.mark.launcher
@pytest.mark.parametrize("stage", [3])
def test_lora_learns_keeps_frozen_weights_resumes_exactly_and_exports(
    tiny_mm: Path, tmp_path: Path, stage: int
) -> None:
    """Loss falls; frozen weights bit-identical; 6 steps + resume == 12 steps; the export reloads with PEFT.

    Stage 3 partitions every parameter (persistence threshold 0), so the LoRA tensors are
    partitioned too: the adapter written with each checkpoint must still be complete. (ZeRO-2, the
    default, is the run of test_lora_with_activation_checkpointing_..., and its export that of the
    generation test.)"""
    ds = {"template": f"zero{stage}", "overrides": ZERO3_PARTITION_ALL if stage == 3 else {}}
    full = lora_config(tiny_mm, tmp_path / "full", deepspeed=ds)
    split = lora_config(tiny_mm, tmp_path / "split", deepspeed=ds)
    r = run_cli("train", str(full), "--num-ranks", "2")
    ok(r)
    assert "frozen weights unchanged (sha256" in r.stdout
    ok(run_cli("train", str(split), "--num-ranks", "2", "--max-steps", "6"))
    r = run_cli("train", str(split), "--num-ranks", "2")  # --resume auto
    ok(r)
    assert "at step 6" in r.stdout

    a, b = checkpoints(tmp_path / "full" / "runs"), checkpoints(tmp_path / "split" / "runs")
    assert [p.name for p in a] == [p.name for p in b] == ["step-00000006", "step-00000012"]
    ma, mb = meta(a[-1]), meta(b[-1])
    losses = [loss for _, loss in ma["loss_history"]]
    assert losses[-1] < losses[0] - 0.05, losses
    assert mb["loss_history"] == ma["loss_history"]  # exact, also the steps after the resume
    assert [s for s, _ in ma["val_history"]] == [0, 6, 12] and mb["val_history"] == ma["val_history"]
    assert ma["data_position"]["num_samples"] == 22 and ma["data_position"]["val_samples"] == 10
    assert ma["val_history"][-1][1] < ma["val_history"][0][1]  # the held-out responses are learned too
    assert ma["frozen_sha256"] == mb["frozen_sha256"] and len(ma["frozen_sha256"]) == 64

    # only trainable state in the checkpoint: the module file is smaller than the frozen weights alone
    frozen_bytes = (tiny_mm / "phase1.safetensors").stat().st_size + (
        tiny_mm / "llm" / "model.safetensors"
    ).stat().st_size
    assert sum(f.stat().st_size for f in a[-1].glob("*model_states.pt")) < frozen_bytes / 2

    from safetensors.torch import load_file

    adapter = load_file(str(a[-1] / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert {tuple(v.shape)[0] for k, v in adapter.items() if "lora_A" in k} == {8}

    out = tmp_path / "export"
    r = run_cli("export", str(a[-1]), "--out", str(out))
    ok(r)
    assert (out / "README.md").is_file() and (out / "projectors.safetensors").is_file()
    _exported_logits_match_the_checkpoint(a[-1], out, full, tiny_mm)


def _exported_logits_match_the_checkpoint(ckpt: Path, out: Path, config: Path, tiny_mm: Path) -> None:
    """The trained weights from DeepSpeed's shards vs the exported PEFT adapter and projectors: same logits, same
    tensors."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.config.load import load_config
    from trainer.tasks.lora import LoraTask

    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=True)
    model = LoraTask(load_config(config)).build_model()
    missing, unexpected = model.load_state_dict(trained, strict=False)
    assert not unexpected and all("lora_" not in k and not k.startswith("projectors.") for k in missing)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_mm / "llm"))
    exported = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = model.llm.eval()(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert torch.equal(want, got)
    proj = load_file(str(out / "projectors.safetensors"))
    assert proj and all(torch.equal(v, trained[f"projectors.{k}"]) for k, v in proj.items())


# ---------------------------------------------------------------------------- bad Phase 1 checkpoints
def _rewrite(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, header)
    save_file(tensors, str(dst), metadata=header)
    return dst


def _bad_phase1(kind: str, good: Path, tmp: Path) -> Path:
    import torch

    dst = tmp / f"{kind}.safetensors"
    if kind == "missing file":
        return tmp / "nope.safetensors"
    if kind == "not safetensors":
        dst.write_bytes(b"\x80\x02 this is a pickle, not safetensors" * 10)
        return dst
    edits = {
        "wrong format": lambda t, h: h.update(format="something-else"),
        "wrong version": lambda t, h: h.update(format_version="7"),
        "missing tensor": lambda t, h: t.pop(sorted(k for k in t if k.startswith("aligner.audio"))[0]),
        "unexpected tensor": lambda t, h: t.update({"aligner.smell.0.weight": torch.zeros(2, 2)}),
        "wrong shape": lambda t, h: t.update({"aligner.image.0.weight": torch.zeros(32, 31)}),
    }
    return _rewrite(good, dst, edits[kind])


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing file", "no such file"),
        ("not safetensors", "not a safetensors file"),
        ("wrong format", "header format is 'something-else', expected 'trainer-phase1'"),
        ("wrong version", "format_version '7', this trainer reads version 1"),
        ("missing tensor", "1 missing tensor(s), first 'aligner.audio.0.bias'"),
        ("unexpected tensor", "1 unexpected tensor(s), first 'aligner.smell.0.weight'"),
        (
            "wrong shape",
            "tensor 'aligner.image.0.weight' has shape [32, 31], the architecture in its header needs [32, 32]",
        ),
    ],
)
def test_bad_phase1_checkpoint_is_named(tiny_mm: Path, tmp_path: Path, kind: str, message: str) -> None:
    from trainer.errors import UserError
    from trainer.models.multimodal import load_phase1

    bad = _bad_phase1(kind, tiny_mm / "phase1.safetensors", tmp_path)
    with pytest.raises(UserError) as exc:
        load_phase1(bad)
    assert message in str(exc.value) and str(bad) in str(exc.value)


def test_bad_phase1_checkpoint_stops_train_before_launch(tiny_mm: Path, tmp_path: Path) -> None:
    bad = _bad_phase1("wrong shape", tiny_mm / "phase1.safetensors", tmp_path)
    cfg = lora_config(tiny_mm, tmp_path, lora={"phase1_checkpoint": str(bad)})
    r = run_cli("train", str(cfg), "--num-ranks", "2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "aligner.image.0.weight" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------- bad JSONL lines
def _broken_dataset(tiny_mm: Path, tmp_path: Path) -> Path:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    (data / "images" / "broken.png").write_bytes(b"not a png at all")
    (data / "audio" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    good = (data / "train.jsonl").read_text().splitlines()
    bad = [
        '{"sample_id": "x1", "instruction": "hi", ',  # line 3
        json.dumps({"sample_id": "x2", "instruction": "hi"}),  # line 4
        json.dumps({"sample_id": "x3", "instruction": "hi", "response": "yo", "image": "images/none.png"}),  # 5
        json.dumps({"sample_id": "x4", "instruction": "hi", "response": "yo", "image": "images/broken.png"}),  # 6
        json.dumps({"sample_id": "x5", "instruction": "hi", "response": "yo", "audio": "audio/broken.wav"}),  # 7
    ]
    (data / "train.jsonl").write_text("\n".join(good[:2] + bad + good[2:]) + "\n")
    return data


def test_bad_jsonl_lines_are_listed_with_line_numbers_before_launch(tiny_mm: Path, tmp_path: Path) -> None:
    data = _broken_dataset(tiny_mm, tmp_path)
    cfg = lora_config(tiny_mm, tmp_path, data={"path": str(data)})
    r = run_cli("train", str(cfg), "--num-ranks", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    index = data / "train.jsonl"
    assert line.startswith(f"error: 5 bad line(s) in {index}")
    for no, what in [
        (3, "invalid JSON"),
        (4, "missing field 'response'"),
        (5, "image file images/none.png not found"),
        (6, "unreadable image images/broken.png"),
        (7, "unreadable audio audio/broken.wav"),
    ]:
        assert f"{index}:{no}: {what}" in line, (no, line)
    assert "data.on_bad_sample: skip" in line


@pytest.mark.launcher
def test_skip_mode_trains_on_the_good_lines_and_counts_the_bad(tiny_mm: Path, tmp_path: Path) -> None:
    data = _broken_dataset(tiny_mm, tmp_path)
    cfg = lora_config(tiny_mm, tmp_path, data={"path": str(data), "on_bad_sample": "skip"}, train={"max_steps": 4})
    r = run_cli("train", str(cfg), "--num-ranks", "1")
    ok(r)
    assert "5 bad line(s) skipped" in r.stdout
    (ckpt,) = checkpoints(tmp_path / "runs")
    lines = [json.loads(x) for x in (tiny_mm / "data" / "train.jsonl").read_text().splitlines()]
    trained = sum(1 for x in lines if x.get("split", "train") == "train")  # split-val lines are held out, not bad
    assert trained < len(lines)
    assert meta(ckpt)["data_position"]["skipped_lines"] == 5 and meta(ckpt)["data_position"]["num_samples"] == trained


# ------------------------------------------------------------------------------ guard and validate
def test_the_adapter_guard_rejects_empty_and_misshapen_tensors() -> None:
    import torch

    from trainer.models.multimodal import check_adapter_tensors

    expected = {"a.lora_A.default.weight": (8, 64), "a.lora_B.default.weight": (64, 8)}
    good = {"a.lora_A.weight": torch.zeros(8, 64), "a.lora_B.weight": torch.zeros(64, 8)}
    check_adapter_tensors(good, expected, "adapter")
    with pytest.raises(RuntimeError, match=r"a.lora_A.weight is empty \(0,\)"):
        check_adapter_tensors({**good, "a.lora_A.weight": torch.empty(0)}, expected, "adapter")
    with pytest.raises(RuntimeError, match="differ from the configured"):
        check_adapter_tensors({**good, "a.lora_B.weight": torch.zeros(64, 4)}, expected, "adapter")
    with pytest.raises(RuntimeError, match="1 LoRA tensors written, the model has 2"):
        check_adapter_tensors({"a.lora_A.weight": torch.zeros(8, 64)}, expected, "adapter")


def test_validate_passes_a_good_config_and_names_what_breaks(tiny_mm: Path, tmp_path: Path) -> None:
    good = lora_config(tiny_mm, tmp_path / "good", tracking={"enabled": True})
    r = run_cli("validate", str(good), "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = [
        "configuration",
        "model initialization",
        "parameter freezing",
        "data pipeline",
        "forward pass",
        "training step",
        "checkpoint save and load",
        "MLflow logging",
        "short training run",
        "preemption timing",
    ]
    for name in names:
        assert any(line.startswith("PASS") and name in line for line in r.stdout.splitlines()), (name, r.stdout)
    assert "10/10 checks passed" in r.stdout
    assert not (tmp_path / "good" / "runs").exists()  # validate writes nothing of its own next to the config

    broken = lora_config(tiny_mm, tmp_path / "broken", lora={"target_modules": ["q_proj", "qkv_fused"]})
    r = run_cli("validate", str(broken), "--quick")
    assert r.returncode == 1
    out = r.stdout.splitlines()
    fail = [line for line in out if line.startswith("FAIL")]
    assert len(fail) == 1 and "model initialization" in fail[0] and "lora.target_modules: ['qkv_fused']" in fail[0]
    assert sum(line.startswith("SKIP") for line in out) == 8 and "first failure: model initialization" in r.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_example_config_loads_and_renders(name: str) -> None:
    from trainer.config.deepspeed import render_ds_config
    from trainer.config.load import load_config
    from trainer.tasks import build_task

    cfg = load_config(REPO / "configs" / name)
    ds = render_ds_config(cfg, 2, build_task(cfg).model_hints().get("hidden_size"), name)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


def test_lora_task_without_its_section_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("task: lora\ntrain:\n  max_steps: 3\n")
    r = run_cli("config", "show", str(cfg))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert str(cfg) in r.stderr and "task: lora needs a `lora:` section" in r.stderr
    cfg.write_text("task: lora\nlora:\n  llm_path: m\n  phase1_checkpoint: p.safetensors\n  soft_tokens: {image: 0}\n")
    r = run_cli("config", "show", str(cfg))
    assert r.returncode == 2 and "soft_tokens" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_breaks_mid_run_is_skipped_or_named(tiny_mm: Path, tmp_path: Path, workers: int) -> None:
    """Files deleted after the start-up scan: `skip` replaces the sample and counts it, `error` names its line;
    the same with batches prepared in worker processes."""
    import shutil

    from trainer.config.load import load_config
    from trainer.errors import UserError
    from trainer.ranks import RankInfo
    from trainer.tasks.lora import LoraTask

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    for mode in ("skip", "error"):
        task = LoraTask(
            load_config(
                lora_config(
                    tiny_mm, tmp_path / mode, data={"path": str(data), "on_bad_sample": mode, "num_workers": workers}
                )
            )
        )
        task.setup_data(RankInfo(0, 1, 0, 1), 4, 1)
        first = task.samples[int(task.sampler.indices(0, 0)[0])]
        for path in first.media.values():
            path.unlink(missing_ok=True)
        if mode == "skip":
            batch = task.batch(0, 0, "cpu")
            assert batch["input_ids"].shape[0] == 4 and len(task.skipped) == 1
            assert f"train.jsonl:{first.line}: unreadable during training" in task.skipped[0]
        else:
            with pytest.raises(UserError, match=f"train.jsonl:{first.line}: unreadable during training"):
                task.batch(0, 0, "cpu")
        assert (task.prefetch is not None) == bool(workers)
        if task.prefetch is not None:
            task.prefetch.close()
        shutil.rmtree(data)
        shutil.copytree(tiny_mm / "data", data)


def test_worker_batches_equal_the_training_threads_in_any_order_of_asking(tiny_mm: Path, tmp_path: Path) -> None:
    """data.num_workers: every (step, micro) gets the tensors the training thread would make, asked in order, after a
    jump (a resume) and backwards; the stream restarts only at the jumps."""
    import torch

    from trainer.config.load import load_config
    from trainer.ranks import RankInfo
    from trainer.tasks.lora import LoraTask

    tasks = []
    for workers in (0, 2):
        task = LoraTask(load_config(lora_config(tiny_mm, tmp_path / str(workers), data={"num_workers": workers})))
        task.setup_data(RankInfo(1, 2, 1, 2), 3, 2)
        tasks.append(task)
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (7, 1), (8, 0), (8, 1), (3, 0), (3, 1)]
    for step, micro in keys:
        a, b = (t.batch(step, micro, "cpu") for t in tasks)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, micro)
    assert tasks[1].prefetch is not None and tasks[1].prefetch.restarts == 3
    tasks[1].prefetch.close()


def test_data_fields_rename_the_instruction_and_response(tiny_mm: Path, tmp_path: Path) -> None:
    """data.fields: {instruction: prompt, response: answer} reads lines that name them so; a line with neither the
    response field nor a text file is named with the configured field and the keys it does have."""
    import shutil

    from trainer.config.load import load_config
    from trainer.tasks.lora import LoraTask

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    for name in ("train.jsonl", "val.jsonl"):
        renamed = []
        for rec in (json.loads(x) for x in (data / name).read_text().splitlines()):
            if "instruction" in rec:
                rec["prompt"] = rec.pop("instruction")
            if "response" in rec:
                rec["answer"] = rec.pop("response")
            renamed.append(json.dumps(rec))
        (data / name).write_text("\n".join(renamed) + "\n")
    fields = {"instruction": "prompt", "response": "answer"}
    task = LoraTask(load_config(lora_config(tiny_mm, tmp_path, data={"path": str(data), "fields": fields})))
    train, _, problems = task._scan()
    assert not problems and len(train) == 22
    by_id = {json.loads(x)["sample_id"]: json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()}
    asked = [s for s in train if "prompt" in by_id[s.sample_id]]
    assert asked and all(
        s.instruction == by_id[s.sample_id]["prompt"] and s.response == by_id[s.sample_id]["answer"] for s in asked
    )
    (data / "train.jsonl").write_text(
        "\n".join(renamed + ['{"sample_id": "x9", "prompt": "hi", "reply": "yo"}']) + "\n"
    )
    cfg = lora_config(tiny_mm, tmp_path / "bad", data={"path": str(data), "fields": fields})
    r = run_cli("train", str(cfg), "--num-ranks", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        f"train.jsonl:{len(renamed) + 1}: missing field 'answer' (data.fields.response) (a non-empty string, or a "
        "`text`"
        " file whose contents are the response); the line has ['reply'] (name yours with data.fields.response)"
    ) in r.stderr
    assert not (tmp_path / "bad" / "runs").exists()
    r = run_cli("config", "show", str(LORA_TINY.parent / "pretrain_tiny.yaml"), "--set", "data.num_workers=2")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --set data.num_workers=2: data.num_workers: is for task: lora"
        " (pretraining reads memory-mapped token shards on the training thread)"
    ), r.stderr


def test_validate_a_pretraining_config(tiny_config: Path) -> None:
    r = run_cli("validate", str(tiny_config), "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "10/10 checks passed" in r.stdout and "PASS  parameter freezing" in r.stdout


def test_phase1_from_pretrained_encoder_folders(tmp_path: Path) -> None:
    """Encoders saved as ordinary Hugging Face folders become a Phase 1 checkpoint that loads back bit for bit."""
    import torch
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel

    from trainer.models.multimodal import load_phase1, tiny_architecture

    arch = tiny_architecture(300)["modalities"]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**arch["image"]["config"])).save_pretrained(tmp_path / "clip")
    WhisperModel(WhisperConfig(**arch["audio"]["config"])).save_pretrained(tmp_path / "whisper")
    BertModel(BertConfig(**arch["text"]["config"]), add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    out = tmp_path / "phase1.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_phase1.py"),
            "--image",
            str(tmp_path / "clip"),
            "--audio",
            str(tmp_path / "whisper"),
            "--text",
            str(tmp_path / "bert"),
            "--align-dim",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    model = load_phase1(out)
    clip = CLIPVisionModel.from_pretrained(str(tmp_path / "clip"))
    assert all(torch.equal(v, model.encoders["image"].state_dict()[k]) for k, v in clip.state_dict().items())
    assert model.aligner["audio"][0].weight.shape == (16, 32)
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_phase1.py"),
            "--image",
            str(tmp_path / "nope"),
            "--align-dim",
            "16",
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "image encoder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------- validation data
def test_val_jsonl_and_split_lines_are_validation_and_the_seed_layout_reads(tiny_mm: Path, tmp_path: Path) -> None:
    """val.jsonl (the default val_file) and `"split": "val"` lines of train.jsonl are validation samples, never
    training samples; `"split": "test"` lines are left out; Purr-Sight's layout (no instruction or response)
    learns the text file's contents."""
    import shutil

    from trainer.config.load import load_config
    from trainer.tasks.lora import LoraTask

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    lines = (data / "train.jsonl").read_text().splitlines()
    test_line = dict(json.loads(lines[1]), sample_id="held_back", split="test")
    (data / "train.jsonl").write_text("\n".join(lines + [json.dumps(test_line)]) + "\n")
    task = LoraTask(load_config(lora_config(tiny_mm, tmp_path, data={"path": str(data)})))
    sizes = task.preflight()
    train, val, problems = task._scan()
    assert not problems and (sizes.train, sizes.val) == (len(train), len(val)) == (22, 10)
    val_ids = {s.sample_id for s in val}
    in_val_file = {json.loads(x)["sample_id"] for x in (data / "val.jsonl").read_text().splitlines()}
    split_lines = {json.loads(x)["sample_id"] for x in lines if json.loads(x).get("split") == "val"}
    assert val_ids == in_val_file | split_lines and len(in_val_file) == len(split_lines) == 5
    assert not val_ids & {s.sample_id for s in train} and "held_back" not in {s.sample_id for s in train + val}
    seed = [s for s in train if "instruction" not in json.loads(lines[s.line - 1])]
    assert seed, "the fixture has lines in the seed's layout"
    for s in seed:
        rec = json.loads(lines[s.line - 1])
        assert s.response == (data / rec["text"]).read_text().strip() and "text" not in s.media
        assert s.instruction == task.cfg.data.default_instruction


def test_bad_val_lines_are_named_with_their_file_and_line_before_launch(tiny_mm: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    val = data / "val.jsonl"
    good = val.read_text().splitlines()
    val.write_text(
        "\n".join(
            good[:2]
            + [
                '{"sample_id": "v1", "instruction": "hi", "response": "yo", "audio": "audio/gone.wav"}',
                '{"sample_id": "v2", "split": "val"}',
            ]
            + good[2:]
        )
        + "\n"
    )
    cfg = lora_config(tiny_mm, tmp_path, data={"path": str(data)})
    r = run_cli("train", str(cfg), "--num-ranks", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: 2 bad line(s) in {data / 'train.jsonl'} and {val}")
    assert f"{val}:3: audio file audio/gone.wav not found" in line
    assert f"{val}:4: missing field 'response' (a non-empty string, or a `text` file" in line
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ generation
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _confident_llm(tiny_mm: Path, out: Path) -> Path:
    """The fixture's LLM re-initialised at std 0.25: its frozen tied embeddings at the usual 0.02 cap the logits near
    zero (the loss cannot go below ~4.5 with LoRA alone), where a pretrained LLM's do not."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_mm / "llm", out)
    config = AutoConfig.from_pretrained(out)
    config.initializer_range = 0.25
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.launcher
def test_generate_gives_the_memorised_responses_from_the_checkpoint_and_its_export(
    tiny_mm: Path, tmp_path: Path
) -> None:
    """Trained until the loss is near zero on four samples, `trainer generate` answers each with its response
    (greedy), from the checkpoint and from its export alike; bad input is one line and writes nothing."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_mm / "data", data)
    (data / "val.jsonl").unlink()
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    four = [r for r in rows if r.get("response") and r.get("split", "train") == "train"][:4]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in four))
    cfg = lora_config(
        tiny_mm,
        tmp_path,
        lora={"llm_path": str(_confident_llm(tiny_mm, tmp_path / "llm")), "r": 16, "target_modules": ALL_LINEAR},
        data={"path": str(data)},
        optim={"lr": 1e-2, "decay_steps": 150, "warmup_steps": 5},
        train={"max_steps": 150, "log_every": 25},
        checkpoint={"save_every": 150},
        eval={"enabled": False},
    )
    ok(run_cli("train", str(cfg), "--num-ranks", "1"))
    (ckpt,) = checkpoints(tmp_path / "runs")
    assert meta(ckpt)["loss"] < 0.02, meta(ckpt)["loss_history"]

    answers = {}
    for name, src in (("checkpoint", ckpt), ("export", tmp_path / "export")):
        if name == "export":
            ok(run_cli("export", str(ckpt), "--out", str(src)))
        out = tmp_path / f"{name}.jsonl"
        r = run_cli("generate", str(src), "--jsonl", str(data / "train.jsonl"), "--out", str(out))
        ok(r)
        answers[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert answers["checkpoint"] == answers["export"]
    assert [a["answer"] for a in answers["checkpoint"]] == [r["response"] for r in four]
    assert [a["reference"] for a in answers["checkpoint"]] == [r["response"] for r in four]

    # one sample from its files, the checkpoint named by reference; sampling is seeded
    first = four[0]
    media = [f"--{m}={data / first[m]}" for m in ("image", "audio", "text") if first.get(m)]
    r = run_cli("generate", "latest", "--runs", str(tmp_path / "runs"), *media, "--prompt", first["instruction"])
    ok(r)
    assert r.stdout.strip() == first["response"]
    sampled = [
        run_cli("generate", str(ckpt), *media, "--temperature", "2", "--top-p", "0.9", "--seed", "3").stdout
        for _ in "ab"
    ]
    assert sampled[0] == sampled[1] and sampled[0].strip()

    # bad input: one line, exit 2, nothing written
    (data / "ask.jsonl").write_text('{"sample_id": "q1", "image": "images/nope.png"}\n{"sample_id": "q2"}\n')
    bad = [
        (
            ["--jsonl", str(data / "ask.jsonl"), "--out", str(tmp_path / "x.jsonl")],
            f"{data / 'ask.jsonl'}:1: image file images/nope.png not found",
        ),
        (["--image", str(data / "nope.png")], f"--image {data / 'nope.png'}: unreadable"),
        (["--temperature", "-1"], "--temperature -1 (>= 0)"),
        (["--prompt-ids", "1 2"], "a lora model takes --prompt and media"),
        (["--jsonl", str(data / "train.jsonl"), "--image", str(data / first["image"])], "--jsonl and --image/--audio"),
        (["--out", str(tmp_path / "y.jsonl")], "--out goes with --jsonl"),
        (
            ["--jsonl", str(data / "train.jsonl"), "--out", str(tmp_path / "checkpoint.jsonl")],
            "exists (nothing was written",
        ),
    ]
    for args, message in bad:
        r = run_cli("generate", str(ckpt), *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "x.jsonl").exists()
    r = run_cli("generate", str(tmp_path / "data"), "--prompt", "hi")
    assert r.returncode == 2 and "neither a checkpoint nor an export folder" in r.stderr, r.stderr
    # a model without a text encoder says so before it loads anything
    no_text = tmp_path / "export-no-text"
    shutil.copytree(tmp_path / "export", no_text)
    record = json.loads((no_text / "trainer_export.json").read_text())
    del record["soft_tokens"]["text"]
    (no_text / "trainer_export.json").write_text(json.dumps(record))
    r = run_cli("generate", str(no_text), "--text", str(data / "train.jsonl"))
    assert r.returncode == 2 and "--text: this model has no text encoder (it takes --image, --audio)" in r.stderr, (
        r.stderr
    )


def test_phase1_checkpoint_glob_takes_the_newest_and_a_torch_file_names_the_import_command(
    tiny_mm: Path, tmp_path: Path
) -> None:
    """lora.phase1_checkpoint: checkpoints/alignment/*/aligner.safetensors picks the newest match; no match, and an
    aligner.pt, are one line each before launch, naming what to do.
    """
    import os
    import shutil

    from trainer.config.load import load_config
    from trainer.tasks.lora import LoraTask

    runs = tmp_path / "checkpoints" / "alignment"
    for i, name in enumerate(["run_b", "run_a"]):  # run_a is the newer despite its name
        (runs / name).mkdir(parents=True)
        shutil.copy(tiny_mm / "phase1.safetensors", runs / name / "aligner.safetensors")
        os.utime(runs / name / "aligner.safetensors", (1_700_000_000 + i, 1_700_000_000 + i))
    pattern = str(runs / "*" / "aligner.safetensors")
    task = LoraTask(load_config(lora_config(tiny_mm, tmp_path / "glob", lora={"phase1_checkpoint": pattern})))
    task.preflight()
    assert task.phase1_path == runs / "run_a" / "aligner.safetensors"

    torch_file = runs / "run_a" / "aligner.pt"
    torch_file.write_bytes(b"PK\x03\x04 a zip written by torch.save")
    for spec, message in [
        (
            str(tmp_path / "nowhere" / "*.safetensors"),
            f"lora.phase1_checkpoint: no file matches {tmp_path}/nowhere/*.safetensors",
        ),
        (str(torch_file), f"trainer phase1 import {torch_file} --image DIR --audio DIR --text DIR --out"),
    ]:
        cfg = lora_config(tiny_mm, tmp_path / "bad", lora={"phase1_checkpoint": spec})
        r = run_cli("train", str(cfg), "--num-ranks", "1")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "bad" / "runs").exists()


@pytest.mark.launcher
def test_lora_with_activation_checkpointing_accumulation_workers_and_sync_uploads_resumes_exactly(
    tiny_mm: Path, tmp_path: Path
) -> None:
    """The paths users take: model.gradient_checkpointing, train.grad_accum 2, data.num_workers 2 and
    `--no-background-upload` on 2 ranks. The loss falls; a SIGTERM mid-run and the same command again give the
    uninterrupted run's losses step for step; every checkpoint is in the bucket, uploaded before training went on;
    MLflow has the run as `lora_<run_id>` with the PEFT adapter under `model/`."""
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    from trainer.checkpoint.remote import verify_remote
    from trainer.storage import open_storage

    def config(name: str) -> Path:
        return lora_config(
            tiny_mm,
            tmp_path / name,
            model={"gradient_checkpointing": True},
            data={"num_workers": 2},
            train={"grad_accum": 2, "max_steps": 40, "log_every": 2},
            optim={"decay_steps": 40},
            checkpoint={"save_every": 20},
            eval={"every": 20},
            upload={"url": f"file://{tmp_path / name / 'bucket'}"},
            tracking={"enabled": name == "full"},
        )

    full = config("full")
    r = run_cli("train", str(full), "--num-ranks", "2", "--no-background-upload")
    ok(r)
    assert "for background upload" not in r.stdout and "batches prepared ahead by 2 worker process(es)" in r.stdout
    (a,) = {p.parent.parent for p in checkpoints(tmp_path / "full" / "runs")}
    ma = meta(a / "checkpoints" / "step-00000040")
    losses = [loss for _, loss in ma["loss_history"]]
    assert losses[-1] < losses[0] - 0.05, losses
    storage = open_storage(f"file://{tmp_path / 'full' / 'bucket'}")
    for ckpt in checkpoints(tmp_path / "full" / "runs"):
        good, why, _ = verify_remote(storage, f"{ma['run_id']}/{ckpt.name}")
        assert good, why
    # synchronous: each checkpoint's upload is done before the next step is logged
    out = r.stdout.splitlines()
    for tag in ("step-00000020",):
        done = next(i for i, line in enumerate(out) if f"uploaded {tag}: " in line and "(verified)" in line)
        after = int(tag[5:]) + 2
        assert done < next(i for i, line in enumerate(out) if f"step {after}/40" in line), tag
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'full' / 'runs' / 'mlflow.db'}")
    run = client.get_run(ma["mlflow_run_id"])
    assert run.info.run_name == f"lora_{ma['run_id']}" and run.info.status == "FINISHED"
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/adapter_config.json", "model/projectors.safetensors"} <= logged

    split = config("split")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli.main", "train", str(split), "--num-ranks", "2", "--no-background-upload"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, deadline = "", time.monotonic() + 300
    while "step 6/40" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out_a, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, (seen + out_a)[-4000:]
    ok(run_cli("train", str(split), "--num-ranks", "2", "--no-background-upload"))
    mb = meta(checkpoints(tmp_path / "split" / "runs")[-1])
    assert mb["step"] == 40 and mb["run_id"] != ma["run_id"]
    got, want = dict((s, v) for s, v in mb["loss_history"]), dict((s, v) for s, v in ma["loss_history"])
    assert set(want) <= set(got) and all(got[s] == want[s] for s in want), (got, want)
    assert mb["val_history"] == ma["val_history"]

    # other frozen weights of the same shapes: continuing would train against another model
    done = [p.name for p in checkpoints(tmp_path / "split" / "runs")]
    other = _rewrite(
        tiny_mm / "phase1.safetensors",
        tmp_path / "phase1_other.safetensors",
        lambda t, h: t.update({"aligner.image.0.bias": t["aligner.image.0.bias"] + 1e-3}),
    )
    r = run_cli(
        "train", str(split), "--num-ranks", "2", "--max-steps", "50", "--set", f"lora.phase1_checkpoint={other}"
    )
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "frozen weights with sha256" in r.stdout + r.stderr
    assert [p.name for p in checkpoints(tmp_path / "split" / "runs")] == done
