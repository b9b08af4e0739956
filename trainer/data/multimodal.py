"""Multimodal instruction data: a JSONL index plus image, audio (WAV) and text files.

One sample per line: `{"sample_id": ..., "instruction": ..., "response": ..., "image": "images/a.png",
"audio": "audio/a.wav", "text": "text/a.txt", "split": "train"}`; media paths are relative to the data
folder and each is optional (a sample may lack any of them). `sample_id`, `instruction` and `response` may
go by other names (`data.fields`). A line without `instruction` gets the
default prompt; a line without `response` learns the contents of its `text` file (which is then not an
input): the layout of Purr-Sight's `data/processed/*.jsonl`. `split` is `train` (or absent), `val` /
`validation` / `dev` (validation, never trained on) or `test` (left out). `scan_index` checks every line
before training (JSON, fields, files that exist and decode) and reports problems as `FILE:LINE: what`.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError

MEDIA = ("image", "audio", "text")
SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Sample:
    line: int
    sample_id: str
    instruction: str
    response: str
    media: dict[str, Path]
    split: str = "train"  # train | val | test


def read_wav(path: Path) -> Any:
    """Mono float32 samples at 16 kHz from a PCM WAV file (8/16/32-bit; other rates resampled)."""
    import numpy as np

    with wave.open(str(path), "rb") as w:
        width, channels, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width not in (1, 2, 4):
        raise ValueError(f"{width * 8}-bit samples (expected 8, 16 or 32-bit PCM)")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    if x.size == 0:
        raise ValueError("no audio frames")
    return x


def _check_media(kind: str, path: Path) -> None:
    if kind == "image":
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    elif kind == "audio":
        read_wav(path)
    else:
        path.read_text(encoding="utf-8")


def check_media(kind: str, path: Path) -> Optional[str]:
    """Why the media file cannot be read (decoded as its kind), or None."""
    try:
        _check_media(kind, path)
    except Exception as exc:
        return _problem(exc)
    return None


def _problem(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__


FIELDS = ("sample_id", "instruction", "response")


def scan_index(
    data_dir: Path,
    train_file: str,
    modalities: tuple[str, ...] = MEDIA,
    default_instruction: str = "",
    field: str = "data.train_file",
    names: Optional[dict[str, str]] = None,
    need_response: bool = True,
) -> tuple[list[Sample], list[str]]:
    """Every good sample of the index, and one `FILE:LINE: problem` per bad line. `names` renames the fields of
    `FIELDS` (data.fields: ours -> the file's); `need_response=False` (prompts to answer) lets lines lack a response."""
    key = {f: (names or {}).get(f, f) for f in FIELDS}
    data_dir = Path(data_dir)
    index = data_dir / train_file
    if not index.is_file():
        raise UserError(f"{field}: no {train_file} in data.path {data_dir} (the JSONL index of the samples)")
    samples: list[Sample] = []
    problems: list[str] = []
    with open(index, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{index}:{no}"
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
                continue
            bad = _field_problem(rec, default_instruction, key, need_response)
            if bad:
                problems.append(f"{where}: {bad}")
                continue
            split = SPLITS.get(str(rec.get("split", "train")).lower())
            if split is None:
                problems.append(f"{where}: split {rec.get('split')!r} is not one of {', '.join(SPLITS)}")
                continue
            response = rec.get(key["response"])
            kinds = modalities if response else tuple(dict.fromkeys(modalities + ("text",)))
            media: dict[str, Path] = {}
            for kind in kinds:
                rel = rec.get(kind)
                if rel in (None, ""):
                    continue
                if not isinstance(rel, str):
                    bad = f"field {kind!r} must be a path string, got {type(rel).__name__}"
                    break
                path = data_dir / rel
                if not path.is_file():
                    bad = f"{kind} file {rel} not found in {data_dir}"
                    break
                unreadable = check_media(kind, path)
                if unreadable:
                    bad = f"unreadable {kind} {rel}: {unreadable}"
                    break
                media[kind] = path
            if bad:
                problems.append(f"{where}: {bad}")
                continue
            if not response and "text" in media:  # the text file is the target, not an input
                try:
                    response = media.pop("text").read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append(f"{where}: unreadable text {rec.get('text')}: {_problem(exc)}")
                    continue
                if not response:
                    problems.append(f"{where}: no response: the text file {rec.get('text')} is empty")
                    continue
            instruction = rec.get(key["instruction"]) or default_instruction
            samples.append(Sample(no, rec[key["sample_id"]], instruction, response or "", media, split))
    return samples, problems


def _field_problem(
    rec: dict, default_instruction: str, key: dict[str, str], need_response: bool = True
) -> Optional[str]:
    """What is wrong with the fields of one JSONL record (None: nothing). `key`: our field -> the file's name."""

    def name(f: str) -> str:
        return repr(key[f]) + ("" if key[f] == f else f" (data.fields.{f})")

    for f in FIELDS:
        value = rec.get(key[f])
        if value is None and f == "instruction" and default_instruction:
            continue
        if value is None and f == "response":
            if rec.get("text") in (None, "") and need_response:
                others = sorted(k for k in rec if k not in (*key.values(), "split", *MEDIA))
                hint = f"; the line has {others} (name yours with data.fields.response)" if others else ""
                return (
                    f"missing field {name(f)} (a non-empty string, or a `text` file whose contents are the"
                    f" response){hint}"
                )
            continue
        if not isinstance(value, str) or not value:
            return f"missing field {name(f)} (a non-empty string)"
    return None


class Featurizer:
    """Sample -> tensors: LLM token ids with response-only labels, pixels, log-mel features, text-encoder ids."""

    def __init__(
        self, architecture: dict, modalities: tuple[str, ...], llm_tokenizer: Any, text_tokenizer: Any, max_length: int
    ):
        self.mods = modalities
        self.tok, self.text_tok, self.max_length = llm_tokenizer, text_tokenizer, max_length
        specs = architecture["modalities"]
        if "image" in modalities:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

            s = int(specs["image"]["config"]["image_size"])
            self.image_size = s
            self.images = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        if "audio" in modalities:
            from transformers import WhisperFeatureExtractor

            c = specs["audio"]["config"]
            frames = 2 * int(c["max_source_positions"])  # the encoder's two convolutions halve the mel frames
            self.audio = WhisperFeatureExtractor(feature_size=int(c["num_mel_bins"]), sampling_rate=SAMPLE_RATE)
            self.audio.n_samples = frames * self.audio.hop_length
            self.audio.nb_max_frames = frames
            self.mels, self.frames = int(c["num_mel_bins"]), frames
        if "text" in modalities:
            self.text_len = min(128, int(specs["text"]["config"].get("max_position_embeddings", 512)))
        self.pad_id = (
            llm_tokenizer.pad_token_id if llm_tokenizer.pad_token_id is not None else llm_tokenizer.eos_token_id
        )

    def prompt_ids(self, instruction: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = f"{instruction}\n"
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def response_ids(self, response: str) -> list[int]:
        ids = list(self.tok(response, add_special_tokens=False)["input_ids"])
        return ids + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])

    def features(self, sample: Sample) -> dict[str, Any]:
        import torch

        prompt, response = self.prompt_ids(sample.instruction), self.response_ids(sample.response)
        ids = (prompt + response)[: self.max_length]
        labels = ([-100] * len(prompt) + response)[: self.max_length]
        n, pad = len(ids), self.max_length - len(ids)
        return {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad),
            "attention_mask": torch.tensor([1] * n + [0] * pad),
            "labels": torch.tensor(labels + [-100] * pad),
            **self.media(sample),
        }

    def media(self, sample: Sample) -> dict[str, Any]:
        """The encoders' inputs of `sample` (zeros and `has_<modality>` false for a modality it lacks)."""
        import numpy as np
        import torch

        out: dict[str, Any] = {}
        if "image" in self.mods:
            path = sample.media.get("image")
            if path is not None:
                from PIL import Image

                with Image.open(path) as im:
                    px = self.images(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"][0]
            else:
                px = torch.zeros(3, self.image_size, self.image_size)
            out["pixel_values"], out["has_image"] = px, torch.tensor(path is not None)
        if "audio" in self.mods:
            path = sample.media.get("audio")
            if path is not None:
                feats = self.audio(read_wav(path), sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
                out["input_features"] = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
            else:
                out["input_features"] = torch.zeros(self.mels, self.frames)
            out["has_audio"] = torch.tensor(path is not None)
        if "text" in self.mods:
            path = sample.media.get("text")
            text = path.read_text(encoding="utf-8") if path is not None else ""
            enc = self.text_tok(text, max_length=self.text_len, truncation=True, padding="max_length")
            mask = list(enc["attention_mask"])
            mask[0] = 1  # an empty text still has one position to pool
            out["text_input_ids"], out["text_attention_mask"] = torch.tensor(enc["input_ids"]), torch.tensor(mask)
            out["has_text"] = torch.tensor(path is not None)
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def first_problems(problems: list[str], limit: int = 5) -> str:
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def response_room(featurizer: Featurizer, samples: list[Sample], index: Path) -> dict[int, str]:
    """Line -> problem, for lines whose prompt alone fills max_length: nothing would be learned from them."""
    out = {}
    for s in samples:
        n = len(featurizer.prompt_ids(s.instruction))
        if n >= featurizer.max_length:
            out[s.line] = (
                f"{index}:{s.line}: the prompt is {n} tokens, max_length {featurizer.max_length} leaves no room for "
                "the response"
            )
    return out


def check_vocab(tokenizer: Any, vocab_size: int, what: str) -> Optional[str]:
    n = len(tokenizer)
    return None if n <= vocab_size else f"{what}: tokenizer has {n} tokens, the model's embedding has {vocab_size} rows"
