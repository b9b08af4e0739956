#!/usr/bin/env python
"""Make the offline fixtures of the Phase 2 LoRA task: nothing is downloaded.

  OUT/llm/                  a tiny Qwen2 model folder: config, random weights (safetensors), and a
                            byte-level BPE tokenizer trained here with `tokenizers` (chat template included)
  OUT/phase1.safetensors    a tiny Phase 1 checkpoint (CLIP vision, Whisper encoder, BERT + aligner)
  OUT/data/                 train.jsonl, val.jsonl + images/*.png, audio/*.wav, text/*.txt
                            (the last --val samples are validation: half in val.jsonl, half as train.jsonl
                            lines with "split": "val"; every 4th training sample with a text file is written
                            in Purr-Sight's layout: no instruction or response, the text file is the target)

The data has something to learn: each response names the image's colour and the tone's pitch, so
the loss of a short run falls. Some samples lack a modality on purpose.

    python tools/make_tiny_multimodal.py --out data/tiny_mm [--samples 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 230), "yellow": (240, 220, 40)}
TONES = {"low": 220.0, "middle": 440.0, "high": 880.0}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def sample_texts(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        colour, tone = rng.choice(sorted(COLOURS)), rng.choice(sorted(TONES))
        has = {"image": i % 7 != 3, "audio": i % 5 != 2, "text": i % 3 != 1}
        note = f"the cat looks {rng.choice(['calm', 'curious', 'sleepy', 'alert'])}"
        parts = [
            f"a {colour} picture" if has["image"] else "no picture",
            f"a {tone} sound" if has["audio"] else "no sound",
        ]
        out.append(
            {
                "sample_id": f"sample_{i:04d}",
                "colour": colour,
                "tone": tone,
                "has": has,
                "note": note,
                "instruction": "Describe the picture and the sound.",
                "response": f"I see {parts[0]} and hear {parts[1]}; {note if has['text'] else 'no note'}.",
            }
        )
    return out


def write_tokenizer(out: Path, corpus: list[str], vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(fast)


def write_llm(out: Path, vocab: int, seed: int, size: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size == "tiny":
        dims = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    else:  # Qwen2.5-0.5B-Instruct's shape
        dims = dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        )
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0, **dims
    )
    Qwen2ForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)


def write_phase1(path: Path, text_vocab: int, seed: int, size: str) -> None:
    import torch

    from trainer.models.multimodal import build_phase1, full_architecture, save_phase1, tiny_architecture

    torch.manual_seed(seed + 1)
    arch = tiny_architecture(text_vocab) if size == "tiny" else full_architecture(text_vocab)
    save_phase1(build_phase1(arch), path)


def write_media(data: Path, samples: list[dict], seed: int, val: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for d in ("images", "audio", "text"):
        (data / d).mkdir(parents=True, exist_ok=True)
    lines, val_lines = [], []
    first_val = len(samples) - val
    for n, s in enumerate(samples):
        seed_layout = n < first_val and s["has"]["text"] and n % 4 == 0
        rec = (
            {"sample_id": s["sample_id"]}
            if seed_layout
            else {k: s[k] for k in ("sample_id", "instruction", "response")}
        )
        if s["has"]["image"]:
            im = Image.new("RGB", (48, 40), (245, 245, 245))
            x, y = rng.randint(0, 16), rng.randint(0, 10)
            ImageDraw.Draw(im).rectangle([x, y, x + 28, y + 26], fill=COLOURS[s["colour"]])
            rec["image"] = f"images/{s['sample_id']}.png"
            im.save(data / rec["image"])
        if s["has"]["audio"]:
            rec["audio"] = f"audio/{s['sample_id']}.wav"
            rate, secs, f0 = 16000, 0.5, TONES[s["tone"]]
            frames = bytearray()
            for i in range(int(rate * secs)):
                v = int(12000 * math.sin(2 * math.pi * f0 * i / rate))
                frames += v.to_bytes(2, "little", signed=True)
            with wave.open(str(data / rec["audio"]), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(bytes(frames))
        if s["has"]["text"]:
            rec["text"] = f"text/{s['sample_id']}.txt"
            (data / rec["text"]).write_text(f"Owner's note: {s['note']}.\n")
        if n >= first_val:
            rec["split"] = "val"
        elif seed_layout:
            rec["split"] = "train"
        (val_lines if n >= first_val and (n - first_val) % 2 == 0 else lines).append(json.dumps(rec))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    if val_lines:
        (data / "val.jsonl").write_text("\n".join(val_lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/tiny_mm"))
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=10, help="validation samples (of --samples)")
    p.add_argument(
        "--size",
        choices=["tiny", "qwen2.5-0.5b"],
        default="tiny",
        help="tiny (tests) or Qwen2.5-0.5B's shape with random weights (benchmarks)",
    )
    p.add_argument(
        "--vocab", type=int, default=512, help="BPE vocabulary to train (tiny); the 0.5B shape pads to 151936"
    )
    args = p.parse_args()

    from trainer.config.schema import DataConfig

    rng = random.Random(args.seed)
    samples = sample_texts(rng, args.samples)
    corpus = (
        [s["instruction"] for s in samples]
        + [s["response"] for s in samples]
        + [f"Owner's note: {s['note']}." for s in samples]
        + [DataConfig().default_instruction]
    )
    llm = args.out / "llm"
    llm.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(llm, corpus * 4, args.vocab)
    write_llm(llm, n_tok if args.size == "tiny" else 151936, args.seed, args.size)
    write_phase1(args.out / "phase1.safetensors", n_tok, args.seed, "tiny" if args.size == "tiny" else "full")
    write_media(args.out / "data", samples, args.seed, args.val)
    print(
        f"wrote {llm} (tokenizer {n_tok} tokens), {args.out / 'phase1.safetensors'}, {args.out / 'data'} "
        f"({len(samples)} samples,"
        f" {args.val} of them validation)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
