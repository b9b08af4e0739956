"""`trainer phase1 import`: a Phase 1 aligner.pt (Purr-Sight and other layouts) into the trainer-phase1 format,
and `resolve_phase1_checkpoint`, the rule of `lora.phase1_checkpoint` (globs, torch files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

MODALITIES = ("image", "audio", "text")
ALIGN_DIM = 16  # the tiny encoders are 32 wide: a distinct size catches a transposed weight


class NeedsCode:
    """A class instance in a checkpoint: unpickling it runs code, so it must be refused."""

    def __init__(self) -> None:
        self.lr = 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CLIP-vision, Whisper and BERT saved as ordinary Hugging Face folders (offline, once per module)."""
    import torch
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel

    from trainer.models.multimodal import tiny_architecture

    root = tmp_path_factory.mktemp("encoders")
    arch = tiny_architecture(300)["modalities"]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**arch["image"]["config"])).save_pretrained(root / "clip")
    WhisperModel(WhisperConfig(**arch["audio"]["config"])).save_pretrained(root / "whisper")
    BertModel(BertConfig(**arch["text"]["config"]), add_pooling_layer=False).save_pretrained(root / "bert")
    return {"image": root / "clip", "audio": root / "whisper", "text": root / "bert"}


def folder_args(folders: dict[str, Path], modalities: tuple[str, ...] = MODALITIES) -> list[str]:
    return [a for m in modalities for a in (f"--{m}", str(folders[m]))]


def aligner_state(modalities: tuple[str, ...] = MODALITIES, dim: int = ALIGN_DIM, seed: int = 1) -> dict:
    """What a Phase 1 run saves for its aligner: per modality Linear(32 -> dim) then LayerNorm(dim), random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modalities:
        out.update(
            {
                f"{m}.0.weight": torch.randn(dim, 32, generator=g),
                f"{m}.0.bias": torch.randn(dim, generator=g),
                f"{m}.1.weight": torch.randn(dim, generator=g),
                f"{m}.1.bias": torch.randn(dim, generator=g),
            }
        )
    return out


def assert_imported(
    out: Path,
    aligner: dict,
    folders: dict[str, Path],
    modalities: tuple[str, ...],
    encoder_overrides: dict | None = None,
) -> None:
    """The written file loads as the trainer loads it; aligner tensors equal the file's and encoders the folders'
    (or the file's where it carried encoder tensors), bit for bit."""
    import torch
    from transformers import BertModel, CLIPVisionModel, WhisperModel

    from trainer.models.multimodal import load_phase1

    model = load_phase1(out)
    assert list(model.architecture["modalities"]) == list(modalities) and model.architecture["align_dim"] == ALIGN_DIM
    state = model.state_dict()
    assert {k for k in state if k.startswith("aligner.")} == {f"aligner.{k}" for k in aligner}
    for k, v in aligner.items():
        assert torch.equal(state[f"aligner.{k}"], v), k
    loaders = {
        "image": lambda p: CLIPVisionModel.from_pretrained(str(p)),
        "audio": lambda p: WhisperModel.from_pretrained(str(p)).get_encoder(),
        "text": lambda p: BertModel.from_pretrained(str(p), add_pooling_layer=False),
    }
    overrides = encoder_overrides or {}
    for m in modalities:
        for k, v in loaders[m](folders[m]).state_dict().items():
            name = f"encoders.{m}.{k}"
            assert torch.equal(state[name], overrides.get(name, v)), name


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


# ----------------------------------------------------------------------------------------- imports that work
def _layout(kind: str, aligner: dict) -> tuple[dict, list[str], dict]:
    """(what torch.save writes, extra CLI arguments, encoder tensors the file carries) for each layout users have."""
    import torch

    if kind == "bare":  # what tools/build_phase1.py --aligner took: <modality>.0.weight, ...
        return dict(aligner), [], {}
    if kind == "lightning":  # a LightningModule with `self.aligner`: keys under state_dict, prefixed model.
        return (
            {
                "state_dict": {f"model.aligner.{k}": v for k, v in aligner.items()},
                "epoch": 7,
                "global_step": 420,
                "hyper_parameters": {"lr": 1e-3, "name": "phase1"},
                "optimizer_states": [{"state": {}}],
            },
            [],
            {},
        )
    if kind == "model":  # {"model": DDP state dict, ...} with an encoder tensor fine-tuned in Phase 1
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with torch.device("meta"):  # the name differs between transformers versions (vision_model. or not)
            name = next(
                k for k in CLIPVisionModel(CLIPVisionConfig()).state_dict() if k.endswith("post_layernorm.weight")
            )
        enc = {f"encoders.image.{name}": torch.full((32,), 0.5)}
        state = {f"module.aligner.{k}": v for k, v in aligner.items()} | {f"module.{k}": v for k, v in enc.items()}
        return {"model": state, "step": 3}, [], enc
    # Purr-Sight style: one head per modality with its own names, fixed with --map
    renamed = {k.replace(".0.", "_head.proj.").replace(".1.", "_head.norm."): v for k, v in aligner.items()}
    maps = [
        a
        for m in ("image", "text")
        for a in ("--map", f"{m}_head.proj.=aligner.{m}.0.", "--map", f"{m}_head.norm.=aligner.{m}.1.")
    ]
    return renamed, maps, {}


@pytest.mark.parametrize("kind", ["bare", "lightning", "model", "custom names with --map"])
def test_import_writes_a_phase1_file_that_loads_bit_for_bit(
    folders: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    import torch

    modalities = ("image", "text") if kind.startswith("custom") else MODALITIES
    aligner = aligner_state(modalities)
    saved, extra, encoder_tensors = _layout(kind, aligner)
    pt = tmp_path / "aligner.pt"
    torch.save(saved, pt)
    out = tmp_path / "phase1.safetensors"
    r = run_cli("phase1", "import", str(pt), *folder_args(folders, modalities), "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"wrote {out}: {', '.join(modalities)} encoders"), summary
    assert f"{len(aligner) + len(encoder_tensors)} tensors from {pt}" in summary[0] and "parameters" in summary[0]
    assert ("encoder tensors replacing the folders'" in summary[0]) == bool(encoder_tensors)
    assert_imported(out, aligner, folders, modalities, encoder_tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligner.pt", "phase1.safetensors"]  # no temp file left


def test_build_phase1_tool_takes_a_torch_aligner(folders: dict[str, Path], tmp_path: Path) -> None:
    """tools/build_phase1.py --aligner x.pt goes through the same import (it used to end in a traceback)."""
    import torch

    aligner = aligner_state(("audio",))
    torch.save({"state_dict": {f"model.aligner.{k}": v for k, v in aligner.items()}}, tmp_path / "x.pt")
    out = tmp_path / "phase1.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_phase1.py"),
            "--audio",
            str(folders["audio"]),
            "--aligner",
            str(tmp_path / "x.pt"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"wrote {out}: audio encoders + aligner (align_dim {ALIGN_DIM})")
    assert_imported(out, aligner, folders, ("audio",))


# ------------------------------------------------------------------------------------- what is refused
def test_a_pickle_that_needs_code_is_refused_in_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    import torch

    pt = tmp_path / "aligner.pt"
    torch.save({"state_dict": aligner_state(("image",)), "config": NeedsCode()}, pt)
    out = tmp_path / "phase1.safetensors"
    line = one_line_error(run_cli("phase1", "import", str(pt), *folder_args(folders, ("image",)), "--out", str(out)))
    assert str(pt) in line and "Python objects other than tensors" in line and "NeedsCode" in line
    assert "only tensor state dicts are read" in line
    assert not out.exists()


def test_keys_that_match_nothing_are_listed_and_nothing_is_written(folders: dict[str, Path], tmp_path: Path) -> None:
    import torch

    pt = tmp_path / "aligner.pt"
    odd = {f"head{i}.weight": torch.zeros(2) for i in range(7)}
    torch.save({**aligner_state(("image",)), **odd}, pt)
    out = tmp_path / "phase1.safetensors"
    line = one_line_error(run_cli("phase1", "import", str(pt), *folder_args(folders, ("image",)), "--out", str(out)))
    assert "7 tensor(s) match no Phase 1 tensor name" in line and "'head0.weight'" in line and "and 2 more" in line
    assert "--map" in line and str(pt) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligner.pt"]


def _import(pt: Path, folders: dict[str, Path], out: Path, modalities: tuple[str, ...] = ("image",), **kw: object):  # type: ignore[no-untyped-def]
    from trainer.models.phase1_import import import_phase1

    return import_phase1({m: folders[m] for m in modalities}, out, pt, **kw)


def _refused(pt: Path, folders: dict[str, Path], tmp_path: Path, **kw: object) -> str:
    from trainer.errors import UserError

    out = tmp_path / "phase1.safetensors"
    with pytest.raises(UserError) as exc:
        _import(pt, folders, out, **kw)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_and_misshapen_aligner_tensors_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    import torch

    pt = tmp_path / "aligner.pt"
    state = aligner_state(("image", "audio"))
    state.pop("audio.1.bias")
    torch.save(state, pt)
    msg = _refused(pt, folders, tmp_path, modalities=("image", "audio"))
    assert "1 aligner tensor(s) missing: 'aligner.audio.1.bias'" in msg and str(pt) in msg

    torch.save({**aligner_state(("image",)), "image.0.weight": torch.zeros(ALIGN_DIM, 31)}, pt)
    msg = _refused(pt, folders, tmp_path)
    assert f"tensor 'aligner.image.0.weight' has shape [{ALIGN_DIM}, 31], expected [{ALIGN_DIM}, 32]" in msg
    torch.save(aligner_state(("image",)), pt)
    msg = _refused(pt, folders, tmp_path, align_dim=8)  # --align-dim that disagrees with the file
    assert f"has shape [{ALIGN_DIM}, 32], expected [8, 32]" in msg


def test_other_refusals_are_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    """Not a torch file; the aligner of a modality without its folder; --out existing without --force; --ignore."""
    import torch

    pt = tmp_path / "aligner.pt"
    pt.write_text("not a checkpoint\n")
    assert "not a torch or safetensors file" in _refused(pt, folders, tmp_path)
    torch.save(aligner_state(("image", "audio")), pt)
    msg = _refused(pt, folders, tmp_path)
    assert "'audio.0.weight'" in msg and "--audio" in msg
    torch.save({**aligner_state(("image",)), "logit_scale": torch.tensor(2.66)}, pt)
    out = tmp_path / "phase1.safetensors"
    assert "'logit_scale'" in _refused(pt, folders, tmp_path)
    assert _import(pt, folders, out, ignore=["logit_scale"]).align_dim == ALIGN_DIM
    before = out.read_bytes()
    from trainer.errors import UserError
    from trainer.models.multimodal import verify_phase1

    with pytest.raises(UserError, match="exists; pass --force"):
        _import(pt, folders, out, ignore=["logit_scale"])
    assert out.read_bytes() == before
    out.write_bytes(b"an older file")
    assert _import(pt, folders, out, ignore=["logit_scale"], force=True).from_file == 4
    assert verify_phase1(out)["align_dim"] == ALIGN_DIM


# ---------------------------------------------------------------------------- lora.phase1_checkpoint rule
def test_resolve_phase1_checkpoint_globs_and_torch_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.errors import UserError
    from trainer.models.multimodal import read_phase1_header, resolve_phase1_checkpoint

    for i, name in enumerate(["epoch-09.safetensors", "epoch-10.safetensors", "epoch-11.safetensors"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1_000 + i, 1_000 + (50 if name == "epoch-10.safetensors" else i)))
    assert resolve_phase1_checkpoint(str(tmp_path / "epoch-*.safetensors")) == tmp_path / "epoch-10.safetensors"
    os.utime(tmp_path / "epoch-11.safetensors", (1_050, 1_050))  # equal mtimes: the last in name order
    assert resolve_phase1_checkpoint(str(tmp_path / "epoch-*.safetensors")) == tmp_path / "epoch-11.safetensors"
    monkeypatch.chdir(tmp_path)
    assert resolve_phase1_checkpoint("epoch-1[0].safetensors") == Path("epoch-10.safetensors")
    assert resolve_phase1_checkpoint("epoch-09.safetensors") == Path("epoch-09.safetensors")  # unchanged

    with pytest.raises(UserError, match=r"^lora.phase1_checkpoint: no file matches runs/\*/phase1.safetensors$"):
        resolve_phase1_checkpoint("runs/*/phase1.safetensors")
    with pytest.raises(UserError, match="lora.phase1_checkpoint nope.safetensors: no such file"):
        resolve_phase1_checkpoint("nope.safetensors")

    torch.save({"image.0.weight": torch.zeros(2)}, tmp_path / "aligner.pt")
    torch.save({"image.0.weight": torch.zeros(2)}, tmp_path / "legacy.data", _use_new_zipfile_serialization=False)
    for spec, path in [("aligner.pt", "aligner.pt"), ("legacy.data", "legacy.data"), ("align*.pt", "aligner.pt")]:
        with pytest.raises(UserError) as exc:
            resolve_phase1_checkpoint(spec)
        assert str(exc.value) == (
            f"lora.phase1_checkpoint {path} is a torch file; convert it once: trainer phase1 import"
            f" {path} --image DIR --audio DIR --text DIR --out {Path(path).with_suffix('.safetensors')}"
            f" (then point lora.phase1_checkpoint at {Path(path).with_suffix('.safetensors')})"
        )
    with pytest.raises(
        UserError, match=r"^Phase 1 checkpoint aligner.pt is a torch file; convert it once: trainer phase1 import"
    ):
        read_phase1_header(Path("aligner.pt"))
