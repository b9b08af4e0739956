"""The typed run configuration.

Every field carries a docstring (shown by `trainer config fields` and in error
messages), unknown keys are rejected, and cross-field rules live in one validator per section so
that all problems of a file are collected in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class ModelConfig(Section):
    preset: Literal["neox-tiny", "neox-410m", "neox-1.2b"] = "neox-tiny"
    """Architecture preset: `neox-tiny` (tests and demos on a CPU), `neox-410m` (Pythia-410M shape: the
    checkpoint-scale rehearsal) or `neox-1.2b` (Pythia-1.4B shape). The fields below override its sizes."""
    num_layers: Optional[int] = Field(default=None, ge=1, le=1024)
    """Transformer layers; None: the preset's (24 for neox-1.2b and neox-410m, 2 for neox-tiny)."""
    hidden_size: Optional[int] = Field(default=None, ge=8)
    """Width of the residual stream; None: the preset's (2048 / 1024 / 64)."""
    num_heads: Optional[int] = Field(default=None, ge=1)
    """Attention heads; must divide hidden_size; None: the preset's (16 / 16 / 4)."""
    intermediate_size: Optional[int] = Field(default=None, ge=1)
    """Width of the MLP; None: the preset's (4 x hidden: 8192 / 4096 / 256)."""
    vocab_size: Optional[int] = Field(default=None, ge=2)
    """Vocabulary size before padding; defaults to the preset's (50257 for neox-1.2b and neox-410m, 512 for
    neox-tiny)."""
    pad_vocab_to: int = Field(default=128, ge=1)
    """Pad the embedding rows up to a multiple of this (efficient matmuls on tensor cores)."""
    seq_len: Optional[int] = Field(default=None, ge=8)
    """Training sequence length in tokens; defaults to the preset's context (2048 / 2048 / 128)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on hidden states and attention weights while training (0, as in Pythia)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs ~30% compute)."""

    @model_validator(mode="after")
    def _buildable(self) -> "ModelConfig":
        from trainer.models.neox import dimension_problems, dims_of

        problems = dimension_problems(dims_of(self))
        if problems:  # one at a time, naming the field the config set (heads and width are judged together)
            name, what = problems[0]
            if name == "num_heads" and self.num_heads is None and self.hidden_size is not None:
                name = "hidden_size"
            raise ValueError(f"model.{name} {what}")
        return self


class DataConfig(Section):
    path: str = "data/tiny_shards"
    """Folder of pre-tokenized shards (`*.npy` memory-mapped, or `*.npz` with one array), or gs://BUCKET/PREFIX."""
    cache_dir: Optional[str] = None
    """Where shards from gs:// are downloaded (verified by CRC32C); None: ~/.cache/trainer/shards (or
    $TRAINER_CACHE)."""
    max_files: Optional[int] = Field(default=None, ge=1)
    """Use only the first N shard files in name order (None: all)."""
    check_token_ids: bool = True
    """Scan every shard at start for token ids outside the vocabulary (one pass over the data)."""
    val_path: Optional[str] = None
    """pretrain: held-out shards (a folder or gs://BUCKET/PREFIX, the format and checks of `path`) for evaluation."""
    val_fraction: Optional[float] = Field(default=None, ge=0.001, le=0.5)
    """pretrain, instead of `val_path`: hold out this share of the windows of `path` for evaluation. Of every block
    of 1000 consecutive windows the first round(1000 x fraction) are validation windows, and training never
    reads them (independent of the seed, the world size and the batch shape)."""
    train_file: str = "train.jsonl"
    """task lora: the JSONL index in `path` (one sample per line; media paths relative to `path`). Lines with
    `"split": "val"` (or `validation`, `dev`) are validation samples and `"split": "test"` lines are left out:
    neither is ever trained on."""
    val_file: Optional[str] = None
    """task lora: the JSONL index of the validation samples, relative to `path` (same line format, checked the
    same way); None: `val.jsonl` in `path` when it exists."""
    default_instruction: str = Field(default="Describe what you see and hear.", min_length=1)
    """task lora: the prompt of lines without an `instruction` (lines without a `response` learn the contents of
    their `text` file, which is then not an input)."""
    fields: dict[Literal["sample_id", "instruction", "response"], str] = Field(default_factory=dict)
    """task lora: JSONL field names where yours differ, e.g. {instruction: prompt, response: answer} (unnamed
    ones keep their own name). Media fields (`image`, `audio`, `text`) and `split` keep theirs."""
    num_workers: Optional[int] = Field(default=None, ge=0, le=64)
    """task lora: processes per rank that prepare batches (decode images and audio, tokenize) ahead of the step,
    in the same order as without them (resume stays exact); 0 prepares them on the training thread. None: 2 on a
    GPU host with at least 4 CPU cores per rank, else 0."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """task lora: a bad JSONL line stops the run before it starts (`error`, every problem listed with its line
    number) or is left out and counted (`skip`)."""

    @model_validator(mode="after")
    def _one_val_source(self) -> "DataConfig":
        if self.val_path is not None and self.val_fraction is not None:
            raise ValueError("val_path and val_fraction: give one (held-out shards, or a share of data.path held out)")
        return self


class LoraSection(Section):
    """Phase 2 multimodal LoRA fine-tuning (task: lora)."""

    llm_path: str
    """Local folder of the causal LLM (Qwen2-style, Hugging Face format: config, weights, tokenizer)."""
    phase1_checkpoint: str
    """Phase 1 checkpoint: one .safetensors file with the encoders and the aligner (format in README)."""
    r: int = Field(default=16, ge=1, le=1024)
    """LoRA rank."""
    alpha: float = Field(default=32.0, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    """LLM module names that get LoRA adapters."""
    soft_tokens: dict[Literal["image", "audio", "text"], int] = Field(
        default_factory=lambda: {"image": 8, "audio": 8, "text": 8}
    )
    """Soft tokens per modality prepended to the prompt (modalities absent here or in Phase 1 are not used)."""
    projector_hidden: int = Field(default=1024, ge=1)
    """Hidden width of each projector MLP (aligned feature -> hidden -> K x LLM hidden)."""
    text_tokenizer: Optional[str] = None
    """Tokenizer folder of the Phase 1 text encoder; None: the LLM's tokenizer."""
    max_length: int = Field(default=512, ge=8)
    """Prompt + response tokens per sample (soft tokens not counted); longer samples are cut at the end."""

    @model_validator(mode="after")
    def _tokens(self) -> "LoraSection":
        bad = {k: v for k, v in self.soft_tokens.items() if v < 1}
        if bad or not self.soft_tokens:
            raise ValueError(
                f"soft_tokens needs at least one modality with >= 1 token each, got {dict(self.soft_tokens)}"
            )
        return self


class OptimConfig(Section):
    lr: float = Field(default=3e-4, gt=0, le=1.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate of the decay, as a fraction of `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to `min_lr_ratio * lr`, or constant."""
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    """Linear warmup from 0 to `lr` over this many optimizer steps; None: 10 (at most the schedule's length),
    or `warmup_ratio` of it."""
    warmup_ratio: Optional[float] = Field(default=None, ge=0, lt=1)
    """Instead of `warmup_steps`: warm up over this share of the schedule (optim.decay_steps or the run's steps,
    derived from train.epochs when given), rounded to whole steps."""
    decay_steps: Optional[int] = Field(default=None, ge=1)
    """Steps of the whole schedule (warmup included); None: train.max_steps. Fix it to extend a run without changing its
    LR curve."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables clipping)."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("warmup_steps and warmup_ratio: give one")
        return self


class TrainConfig(Section):
    max_steps: Optional[int] = Field(default=None, ge=1)
    """Optimizer steps to train for (the run ends at this step, also after a resume); None: 100, or what
    `epochs` gives."""
    epochs: Optional[float] = Field(default=None, gt=0, le=100000)
    """Instead of `max_steps`: passes over the training data. The steps are derived at start as
    ceil(epochs x training samples / global batch), printed, and stored in every checkpoint."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Sequences per rank per forward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: Optional[int] = Field(default=None, ge=1)
    """Optional check: must equal micro_batch_size x grad_accum x world size when set."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16/fp16 mixed precision through DeepSpeed)."""
    log_every: int = Field(default=10, ge=1)
    """Log loss, lr, grad norm, step time and tokens/s every N steps."""
    seed: int = Field(default=1234, ge=0, le=2**64 - 1)  # (torch.manual_seed takes at most 64 bits)
    """Seed of model init and of the data order; batches are a pure function of (seed, step, rank)."""

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                "max_steps and epochs: give one (the run's length in optimizer steps, or in passes over the data)"
            )
        return self


def _every(value: Any) -> Any:
    """A cadence: one clear line for anything but a positive step count or `epoch` (not one per union member)."""
    if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("expected a number of steps >= 1, or `epoch`")


Every = Annotated[Union[int, Literal["epoch"]], BeforeValidator(_every)]


class EvalConfig(Section):
    """Held-out evaluation (runs when the task has validation data: data.val_path / val_fraction / val_file)."""

    every: Every = Field(default=100)
    """Evaluate every N optimizer steps, or `epoch` (at the step that completes each pass over the data);
    the last step is always evaluated."""
    batches: int = Field(default=20, ge=0)
    """Evaluation batches (each micro_batch_size x world size samples) per evaluation: the same fixed subset of
    the validation set every time, so that the points of the curve compare; 0: the whole validation set."""
    at_start: bool = True
    """Evaluate once before the first step of a fresh run (the step-0 point of the curve)."""
    enabled: bool = True
    """false: no evaluation even when validation data is configured."""


class CheckpointConfig(Section):
    save_every: Every = Field(default=100)
    """Save a checkpoint every N optimizer steps, or `epoch` (at the step that completes each pass over the
    data); and at the last step."""
    keep_last: int = Field(default=3, ge=1)
    """Keep the newest N committed checkpoints locally (the best by `best_metric` is kept as well)."""
    keep_best: bool = True
    """Also keep the best checkpoint by `best_metric`."""
    best_metric: Optional[Literal["val_loss", "train_loss"]] = None
    """What "best" means for retention, the `best` reference and `save_best`: `val_loss` (the held-out loss measured
    at the checkpoint's step) or `train_loss` (the logged training loss); None: val_loss when the run evaluates."""
    save_best: bool = False
    """Also save a checkpoint at an evaluation step whose val_loss is the best so far (a step between saves)."""
    async_save: bool = Field(default=True, alias="async")
    """Write scheduled checkpoints in the background: training waits only while the state is copied to host
    memory (kept for reuse: host RAM the size of one rank's state), then goes on while a thread writes and
    fsyncs the files; the checkpoint is committed once every rank's files are on disk. false: training
    waits for the whole write. Final and emergency saves are always written directly."""
    resume: Optional[str] = "auto"
    """`auto` (the newest local checkpoint of this task and model, else the newest complete one at
    upload.url, downloaded and verified, else a fresh start; a complete run: nothing to do), `latest`
    (local, required), a tag (`step-00000100` or `RUN_ID/step-00000100`), a checkpoint path, or
    `none` (a new run). The default makes "run the same command again" the recovery procedure."""


class UploadConfig(Section):
    url: Optional[str] = None
    """Where committed checkpoints go (`gs://bucket/prefix` or `file:///path`); None keeps them local."""
    compression: Literal["none", "zstd", "gzip"] = "none"
    """Archive compression: weights barely compress (~1.08x), so `none` spends no CPU (see BENCHMARKS.md)."""
    workers: int = Field(default=4, ge=1, le=64)
    """Parallel upload streams; a checkpoint's files go into about two tar parts per stream, one object each."""
    background: bool = True
    """Upload in a background thread (training never waits); false uploads synchronously after each save."""
    retries: int = Field(default=5, ge=0, le=100)
    """Re-uploads of a failed part (with exponential backoff) before the checkpoint is marked failed."""
    keep_remote: Optional[int] = Field(default=None, ge=1)
    """Remote retention: keep the newest N uploaded checkpoints of the run plus the best; None keeps all."""
    queue_size: int = Field(default=2, ge=1)
    """Checkpoints waiting for upload before backpressure is logged (none is ever skipped)."""
    drain_timeout_s: float = Field(default=3600.0, gt=0)
    """At the end of training, wait at most this long for queued uploads to finish."""

    @model_validator(mode="after")
    def _url_scheme(self) -> "UploadConfig":
        from trainer.storage import url_problem

        if self.url is not None and (why := url_problem(self.url)):
            raise ValueError(f"upload.url {self.url!r}: {why}")
        return self


class PreemptionConfig(Section):
    grace_s: float = Field(default=25.0, gt=0, le=3600)
    """Seconds from the first SIGTERM/SIGINT to exit (preemptible VMs get 30 s before a hard stop): the
    emergency save happens if the recent saves say it fits, then uploads drain, newest first, until
    the deadline."""
    exit_reserve_s: float = Field(default=2.0, ge=0)
    """Seconds of the grace kept for leaving (tracking, process teardown) after the upload drain."""
    check_micro_batches: bool = True
    """With grad_accum > 1, also agree on a stop between micro-batches (one small all-reduce each): a stop
    then waits for one micro-batch, not a whole step, and the state saved is that of the last complete step."""


class TrackingConfig(Section):
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (rank 0)."""
    uri: Optional[str] = None
    """MLflow tracking URI; None uses a local sqlite store `<run_dir>/mlflow.db` (no server)."""
    experiment: Optional[str] = None
    """MLflow experiment name; defaults to the task name."""
    flush_every_s: float = Field(default=5.0, gt=0)
    """Background thread sends batched metrics at least this often."""
    tensorboard: bool = False
    """Also write every logged scalar (train, val, perf, goodput) as TensorBoard events to `<run>/tensorboard/`."""
    log_export: Optional[bool] = None
    """At the end of a completed run, export the final checkpoint (`trainer export`) to `<run>/export/` and log
    it as the MLflow artifact `model/` (the deployable model). None: on for task lora (a PEFT adapter and the
    projectors: megabytes), off for pretrain (a whole model: gigabytes)."""

    def exports(self, task: str) -> bool:
        """Whether a completed run of `task` logs its exported model."""
        return self.log_export if self.log_export is not None else task == "lora"


class DeepSpeedConfig(Section):
    template: str = "zero2"
    """Template in ds_configs/ (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload) or a JSON path."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Keys merged (recursively) over the rendered template, e.g. {zero_optimization: {stage: 1}}."""


class RunConfig(Section):
    task: Literal["pretrain", "lora"] = "pretrain"
    """Which job to run: `pretrain` (GPT-NeoX causal LM on token shards) or `lora` (Phase 2 multimodal LoRA)."""
    run_dir: Path = Path("runs")
    """Root of the run folders: `<run_dir>/<run_id>/checkpoints/step-NNNNNNNN/`."""
    run_id: Optional[str] = None
    """Name of the run folder; None creates `{uuid hex}_{YYYYmmdd_HHMMSS}` (a resume reuses the checkpoint's)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model architecture."""
    lora: Optional[LoraSection] = None
    """Phase 2 multimodal LoRA settings (required for task: lora)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training data: token shards (pretrain) or a folder with a JSONL index and media files (lora)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Loop settings."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    upload: UploadConfig = Field(default_factory=UploadConfig)
    """Checkpoint uploads."""
    preemption: PreemptionConfig = Field(default_factory=PreemptionConfig)
    """What a stop signal does within the grace period."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow experiment tracking."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine configuration."""

    @model_validator(mode="after")
    def _cross_field(self) -> "RunConfig":
        if self.task == "lora" and self.lora is None:
            raise ValueError("task: lora needs a `lora:` section (llm_path, phase1_checkpoint, ...)")
        if self.task != "lora" and self.lora is not None:
            raise ValueError(f"the `lora:` section is for task: lora, this config has task: {self.task}")
        schedule_steps = (
            self.optim.decay_steps or self.train.max_steps or (None if self.train.epochs else DEFAULT_MAX_STEPS)
        )
        if (
            self.optim.warmup_steps is not None
            and schedule_steps is not None
            and self.optim.warmup_steps > schedule_steps
        ):
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must not exceed the schedule length"
                f" ({schedule_steps}, optim.decay_steps or train.max_steps)"
            )
        for name in ("fields", "num_workers"):
            if self.task == "pretrain" and getattr(self.data, name):
                raise ValueError(
                    f"data.{name} is for task: lora (pretraining reads memory-mapped token shards on the"
                    " training thread)"
                )
        if self.task == "pretrain" and self.data.val_file is not None:
            raise ValueError("data.val_file is for task: lora; pretraining takes data.val_path or data.val_fraction")
        if self.task == "lora" and (self.data.val_path is not None or self.data.val_fraction is not None):
            raise ValueError(
                "data.val_path and data.val_fraction are for task: pretrain; task: lora takes data.val_file"
                ' (and lines with "split": "val")'
            )
        return self


DEFAULT_MAX_STEPS = 100
DEFAULT_WARMUP_STEPS = 10
