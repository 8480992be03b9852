"""The run config tree: every knob of a run, its default, its bounds and a one-line description."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ami_dist.models.config import ModelConfig
from ami_dist.typed_config import spec

SCHEMA_VERSION = 2  # 2: lns.lam became lns.scale; AMI stages and demotion keys
Fail = Callable[[str, str], Exception]


@dataclass
class DataConfig:
    """Corpora and how they are read.

    Every line of a data file must be valid UTF-8 and hold a sentence (parallel text; an empty line is an
    error) or a dialog line (PersonaChat; blank lines between dialogs are ignored); a line that breaks this
    is an error naming the file and line, never silently skipped.
    Sentence length is limited twice: a line longer than ``max_line_chars`` characters is an error (in
    every split: such a line is a paragraph or a whole document, or the wrong file), while a training pair
    longer than ``max_src_len`` / ``max_tgt_len`` tokens is dropped from training and counted (the MLflow
    param ``train_pairs_dropped_too_long``); validation pairs are never dropped or truncated.
    """

    format: Literal["parallel", "personachat"] = spec(
        "parallel", "parallel: aligned source/target files; personachat: ParlAI fbdialog text"
    )
    license: str | None = spec(
        None, "the corpus's licence (e.g. 'CC BY 2.0 FR'), carried into exported models (data/README.md)"
    )
    train_src: str | None = spec(None, "parallel: training source file, one sentence per line")
    train_tgt: str | None = spec(None, "parallel: training target file, aligned with train_src")
    valid_src: str | None = spec(None, "parallel: validation source file")
    valid_tgt: str | None = spec(None, "parallel: validation target file")
    train_file: str | None = spec(None, "personachat: training dialogs")
    valid_file: str | None = spec(None, "personachat: validation dialogs")
    max_history_turns: int = spec(3, "personachat: source = at most this many last turns of history", gt=0)
    include_persona: bool = spec(False, "personachat: prepend the speaker's persona lines to the source")
    max_src_len: int = spec(
        100, "training pairs whose source has more tokens are dropped and counted (validation pairs are kept)", gt=0
    )
    max_tgt_len: int = spec(
        100, "training pairs whose target has more tokens are dropped and counted (validation pairs are kept)", gt=0
    )
    max_line_chars: int = spec(
        10000, "a data line longer than this many characters is an error naming file and line (any split)", gt=0
    )
    lowercase: bool = spec(False, "lower-case all text (both sides) when it is read")
    valid_limit: int = spec(0, "evaluate on the first N validation pairs only (0 = all)", ge=0)
    prepared: str | None = spec(
        None, "a directory written by ami-prepare: train on it instead of raw text (the raw-file keys stay unset)"
    )
    cache_dir: str | None = spec(
        None, "where raw text is prepared (token ids, memory-mapped by every rank) and found again on the next "
        "start; null: <run.output_dir>/.prepared",
    )
    prepare_workers: int = spec(0, "processes that encode the corpus when preparing it (0 = every core)", ge=0)

    def validate(self, fail: Fail) -> None:
        if self.prepared is not None:
            if CHECK_FILES.get() and not Path(self.prepared).is_dir():
                raise fail("prepared", f"not a directory: {self.prepared} (write one with ami-prepare)")
            for key in ("train_src", "train_tgt", "valid_src", "valid_tgt", "train_file", "valid_file"):
                if getattr(self, key) is not None:
                    raise fail(key, "set together with data.prepared; give raw files or a prepared directory, "
                               "not both")
            return
        needed = (
            ("train_src", "train_tgt", "valid_src", "valid_tgt")
            if self.format == "parallel"
            else ("train_file", "valid_file")
        )
        for key in needed:
            path = getattr(self, key)
            if path is None:
                raise fail(key, f"required for data.format {self.format!r}")
            if CHECK_FILES.get() and not Path(path).is_file():
                raise fail(key, f"file not found: {path}")


# Whether loading a config checks that the files it names exist: not when a command reads the config saved in
# a run directory only to describe the run (ami-export), where the corpus may have moved since training.
CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)


@dataclass
class VocabConfig:
    kind: Literal["sentencepiece", "words"] = spec(
        "sentencepiece",
        "sentencepiece: BPE trained on the training side (NMT); words: split on spaces and punctuation (dialog)",
    )
    size: int = spec(8000, "vocabulary size, special tokens included", ge=8)
    model: str | None = spec(None, "an existing sentencepiece model / word list to use instead of training one")
    character_coverage: float = spec(1.0, "sentencepiece character coverage", gt=0, le=1)
    sample_size: int = spec(
        2_000_000, "sentencepiece trains on at most this many training sentences, half from each side, drawn "
        "with sample_seed (all of them when the corpus is smaller)", gt=0,
    )
    sample_seed: int = spec(0, "seed of that sample and of sentencepiece's own randomness", ge=0)

    def validate(self, fail: Fail) -> None:
        if self.model is not None and CHECK_FILES.get() and not Path(self.model).is_file():
            raise fail("model", f"file not found: {self.model}")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam"] = spec("sgd", "optimizer: sgd (the paper's LSTMs) or adam")
    lr: float = spec(1.0, "initial learning rate", gt=0)
    momentum: float = spec(0.0, "SGD momentum", ge=0, lt=1)
    adam_beta1: float = spec(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = spec(0.998, "Adam beta2 (the paper's Transformer setting)", ge=0, lt=1)
    adam_eps: float = spec(1e-9, "Adam epsilon", gt=0)
    weight_decay: float = spec(0.0, "L2 weight decay", ge=0)
    max_grad_norm: float = spec(5.0, "clip gradients to this global norm (0 = no clipping)", ge=0)
    schedule: Literal["step", "noam"] = spec(
        "step", "step: lr decayed from decay_start (the paper's LSTMs); noam: lr·d_model^-0.5·min(s^-0.5, s·w^-1.5)"
    )
    decay_start: int = spec(15000, "step: first step at which the learning rate is decayed", ge=0)
    decay_every: int = spec(5000, "step: decay again every this many steps", gt=0)
    decay_factor: float = spec(0.95, "step: multiply the learning rate by this at each decay", gt=0, le=1)
    warmup_steps: int = spec(4000, "noam: linear warm-up steps before the inverse square-root decay", gt=0)


@dataclass
class TrainConfig:
    batch_size: int = spec(64, "sentence pairs per optimizer step, summed over ranks and accumulation", gt=0)
    grad_accum: int = spec(1, "micro-batches accumulated per optimizer step", gt=0)
    batch_tokens: int = spec(
        0, "batch by tokens: at most this many padded tokens per rank-batch (its sentences x the widest, "
        "max(source, target + 1)); 0 = batch by sentences (train.batch_size)", ge=0,
    )
    mle_steps: int = spec(
        1000, "MLE steps of both networks (with ami.enabled: the pretraining before the first cycle)", ge=0
    )
    label_smoothing: float = spec(0.0, "label smoothing of the token-level NLL", ge=0, lt=1)
    log_every: int = spec(50, "log training metrics every N steps", gt=0)
    valid_every: int = spec(0, "evaluate every N steps (0 = only at the end)", ge=0)
    save_every: int = spec(0, "checkpoint every N steps (0 = only at the end)", ge=0)
    max_bad_steps: int = spec(
        10, "a step whose loss or gradient is not finite is skipped on every rank; stop the run (with a "
        "checkpoint) after this many such steps in a row", gt=0,
    )
    keep_checkpoints: int = spec(3, "keep the newest N complete checkpoints, delete older ones (0 = keep all)", ge=0)
    keep_best: int = spec(
        0, "also keep the N checkpoints with the best validation eval.select (a validation that enters them is "
        "checkpointed); listed in checkpoints/best.json and as MLflow tags (0 = off)", ge=0,
    )
    early_stopping: int = spec(
        0, "stop, with a checkpoint, after N validations in a row without a new best eval.select (0 = off)", ge=0,
    )
    bucket_batches: int = spec(100, "length bucketing: sort pools of this many steps' examples by length", gt=0)
    threads_per_rank: int = spec(0, "intra-op threads per rank (0 = CPU cores / local ranks)", ge=0)
    eval_before_training: bool = spec(False, "also evaluate at step 0 (a baseline for the learning curve)")
    stop_after_steps: int = spec(
        0, "end each invocation after this many steps, with a checkpoint (0 = run to the end of the schedule); "
        "continue with --resume", ge=0,
    )


@dataclass
class EvalConfig:
    max_len_a: float = spec(1.5, "greedy decoding stops after max_len_a * source length + max_len_b", ge=0)
    max_len_b: int = spec(10, "see max_len_a", ge=1)
    batch_size: int = spec(64, "sentences per decoding batch on each rank", gt=0)
    bleu_tokenize: Literal["13a", "none", "intl", "char", "zh", "ja-mecab", "flores200"] = spec(
        "13a", "sacreBLEU tokenizer"
    )
    samples: int = spec(5, "validation examples printed and logged with their hypotheses", ge=0)
    select: Literal["bleu", "ppl", "mi_logq_fixed"] = spec(
        "bleu", "the validation metric train.keep_best and train.early_stopping rank by: the forward network's "
        "BLEU (higher is better), its perplexity (lower), or log q(S|T̂) under the fixed critic (higher)",
    )
    fixed_critic: str | None = spec(
        None, "a backward network's checkpoint directory (checkpoints/backward of an MLE run): it scores the forward "
        "outputs, frozen, as valid/mi_logq_fixed; null: with ami.enabled, the backward network as the AMI stages "
        "began (saved in the run directory)",
    )

    def validate(self, fail: Fail) -> None:
        if self.fixed_critic is not None and not Path(self.fixed_critic).is_dir():
            raise fail("fixed_critic", f"checkpoint directory not found: {self.fixed_critic}")


@dataclass
class TrackingConfig:
    uri: str | None = spec(None, "MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    experiment: str = spec("ami-dist", "MLflow experiment name")
    enabled: bool = spec(True, "log to MLflow at all")
    parent_run_id: str | None = spec(None, "nest this run under that MLflow run (an experiment's parent run)")
    system_metrics_s: float = spec(
        10.0, "log the CPU, memory, disk and network use (and GPU, where there is one) of rank 0's machine every "
        "N seconds as system/* metrics (0 = off)", ge=0,
    )


@dataclass
class RunConfig:
    name: str = spec("run", "run name: the MLflow run name and the prefix of the run directory")
    output_dir: str = spec("runs", "run directories (config, vocabulary, checkpoints, outputs) go under here")
    seed: int = spec(1234, "seed for initialisation, shuffling and noise", ge=0)
    task: Literal["nmt", "dialog"] = spec("nmt", "recorded as an MLflow tag; chooses nothing else")


@dataclass
class DistributedConfig:
    deepspeed_config: str = spec(
        "configs/ds_zero2.json", "DeepSpeed preset (ZeRO stage etc.); --deepspeed_config overrides it"
    )
    deepspeed_adapter: bool = spec(
        True, "on CPU (gloo), ami-dist's measured changes to DeepSpeed's internals (README 'What ami-dist changes "
        "in DeepSpeed'); false: stock DeepSpeed. Never applied under NCCL"
    )
    timeout_s: int = spec(600, "collective timeout: a rank that waits longer fails instead of hanging", gt=0)
    failure_timeout_s: int = spec(
        60, "a rank without a heartbeat for this long counts as failed; every rank then exits non-zero within "
        "failure_timeout_s + 30 s, naming it", ge=3,
    )
    preempt_signal: Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "none"] = spec(
        "SIGUSR1", "on this signal all ranks checkpoint after the current step and exit with code 75 (requeue "
        "me); Slurm: #SBATCH --signal=USR1@<seconds>",
    )


@dataclass
class LNSConfig:
    impl: Literal["auto", "fused", "reference"] = spec(
        "auto", "latent-noise op: fused C++/CUDA, the pure-PyTorch reference, or auto (fused when built)"
    )
    k: int = spec(5, "latent noise samples per sentence, decoded as one batch of K·B (release wh_sample_num: 5)",
                  ge=1)
    scale: float = spec(
        1.0, "s, the scale of the latent perturbation h + s·δ (release noise_lambda: 1.0; the paper's "
        "'λ = 0.1' is read as ami.strength_weight, see the README)", ge=0,
    )

    RENAMED: ClassVar[dict[str, str]] = {"lam": "scale (the scale s of h + s·δ; the release's noise_lambda)"}


@dataclass
class AMIConfig:
    """The AMI stages after MLE pretraining (release train.sh): noise pretraining, then adversarial cycles.

    In the adversarial stage the forward and backward networks train at ``adv_lr`` with every update
    clipped at ``adv_max_grad_norm`` (release: lr 0.01, max_grad_norm 0.1); the noise network keeps its
    ``noise_optim`` learning rate in both AMI stages and is clipped at ``adv_max_grad_norm`` in the
    adversarial stage.
    """

    enabled: bool = spec(False, "run the AMI stages after train.mle_steps of MLE (false: an MLE-only run)")
    noise_pretrain_steps: int = spec(
        10000, "noise pretraining: batches that train the noise network alone, forward and backward frozen, "
        "before the first cycle (release train.sh: 10k)", ge=0,
    )
    cycles: int = spec(10, "adversarial stage: cycles of noise, forward and backward phases", ge=0)
    noise_steps: int = spec(4, "batches per noise phase (release: 4; paper NMT: 5000)", ge=0)
    forward_steps: int = spec(8, "batches per forward phase (release: 8; paper NMT: 35)", ge=0)
    backward_steps: int = spec(8, "batches per backward phase (release: 8; paper NMT: 10000)", ge=0)
    adv_every: int = spec(
        2, "in the forward and backward phases, every adv_every-th batch adds an adversarial step to the MLE one",
        ge=1,
    )
    adv_lr: float = spec(
        0.01, "adversarial stage: constant learning rate of the forward and backward networks (release: 0.01 "
        "with SGD); 0 = continue their MLE schedule", ge=0,
    )
    adv_max_grad_norm: float = spec(
        0.1, "adversarial stage: gradient-norm clipping of every update of all three networks (release "
        "max_grad_norm: 0.1); 0 = keep optim.max_grad_norm / noise_optim.max_grad_norm", ge=0,
    )
    baseline: bool = spec(True, "subtract the mean reward over the K samples of a sentence (variance reduction)")
    score_term: bool = spec(True, "noise update: the score-function term −E[(R − b)·log p(δ | μ, σ)]")
    strength_term: bool = spec(True, "noise update: the strength term −β·min(‖δ‖, cap), path-wise through the op")
    strength_weight: float = spec(
        0.1, "β, the weight of the strength term (release wh_disturb_ratio: 0.1, the paper's 'λ = 0.1')", ge=0
    )
    strength_cap: float = spec(
        1.0, "cap on ‖δ‖ over the model dimension beyond which strength is not rewarded (release noise_l2: 1.0, "
        "a norm over a batch of 64; the recipes set √(D/64), the same size per element)", gt=0,
    )
    demotion: Literal["bounded", "unbounded"] = spec(
        "bounded", "backward adversarial step: bounded demotes a synthetic pair only until its NLL exceeds the real "
        "pair's by demotion_margin; unbounded is the release's NLL(S|T) − w·NLL(S|T̃), which never stops paying",
    )
    demotion_margin: float = spec(
        1.0, "bounded demotion: margin in nats per token (length-normalised NLL) past which it stops", gt=0
    )
    fw_adv_clip: float = spec(
        1.0, "gradient-norm clipping of the forward adversarial step (release fw_adv_w_clip: 1.0; the stage's "
        "adv_max_grad_norm applies too, the smaller wins); 0 = none", ge=0,
    )
    bw_adv_clip: float = spec(
        1.0, "gradient-norm clipping of the backward adversarial step (release bw_adv_w_clip: 1.0; the smaller of "
        "it and adv_max_grad_norm applies); 0 = none", ge=0,
    )
    noise_inner_size: int = spec(0, "inner width of the noise network's Linear-ReLU-Linear (0 = hidden_size)", ge=0)
    init_forward: str | None = spec(None, "start the forward network from this MLE checkpoint directory")
    init_backward: str | None = spec(None, "start the backward network from this MLE checkpoint directory")

    def validate(self, fail: Fail) -> None:
        for key in ("init_forward", "init_backward"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_dir():
                raise fail(key, f"checkpoint directory not found: {path}")
        if not self.enabled:
            return
        if self.cycles and self.noise_steps + self.forward_steps + self.backward_steps == 0:
            raise fail("cycles", "a cycle needs at least one of noise_steps, forward_steps, backward_steps")
        if self.noise_steps + self.noise_pretrain_steps and not (self.score_term or self.strength_term):
            raise fail("score_term", "the noise phases need score_term or strength_term (or noise_steps and "
                       "noise_pretrain_steps 0): with both off the noise network is never updated")
        if self.noise_steps + self.noise_pretrain_steps and self.strength_term and self.strength_weight == 0 \
                and not self.score_term:
            raise fail("strength_weight", "0 with score_term off: the noise network would get no gradient")
        if self.cycles and (self.forward_steps or self.backward_steps) \
                and self.adv_every > max(self.forward_steps, self.backward_steps):
            raise fail("adv_every", f"{self.adv_every} is more than forward_steps ({self.forward_steps}) and "
                       f"backward_steps ({self.backward_steps}): no adversarial step would ever run")


@dataclass
class FaultConfig:
    """Fault injection for the reliability tests; leave empty in real runs."""

    nan_loss_steps: list[int] = spec([], "make the loss NaN at these global steps (1-based) on fault.rank")
    nan_grad_steps: list[int] = spec([], "make the gradients NaN (loss finite) at these steps on fault.rank")
    rank: int = spec(0, "the rank that injects the faults", ge=0)
    prepare_delay_s: float = spec(0.0, "sleep this long inside the data prepare step (a slow prepare)", ge=0)


@dataclass
class Config:
    schema_version: int = spec(SCHEMA_VERSION, "version of this config schema", ge=1, le=SCHEMA_VERSION)
    run: RunConfig = spec(RunConfig(), "run identity and output location")
    data: DataConfig = spec(DataConfig(), "corpora and how they are read")
    vocab: VocabConfig = spec(VocabConfig(), "the vocabulary shared by forward and backward networks")
    model: ModelConfig = spec(ModelConfig(), "the forward and backward seq2seq networks")
    optim: OptimConfig = spec(OptimConfig(), "optimizer and LR schedule of the forward and backward networks")
    noise_optim: OptimConfig = spec(
        OptimConfig(name="adam", lr=1e-3, decay_start=10**9, adam_beta2=0.999, adam_eps=1e-8),
        "optimizer and LR schedule of the noise network",
    )
    train: TrainConfig = spec(TrainConfig(), "MLE training")
    eval: EvalConfig = spec(EvalConfig(), "validation decoding and metrics")
    lns: LNSConfig = spec(LNSConfig(), "latent noise sampling (the AMI phases)")
    ami: AMIConfig = spec(AMIConfig(), "the alternating noise / forward / backward schedule")
    tracking: TrackingConfig = spec(TrackingConfig(), "MLflow")
    distributed: DistributedConfig = spec(DistributedConfig(), "DeepSpeed and torch.distributed")
    fault: FaultConfig = spec(FaultConfig(), "fault injection, for tests only")

    def validate(self, fail: Fail) -> None:
        if not self.ami.enabled and self.train.mle_steps == 0:
            raise fail("train.mle_steps", "must be > 0 for an MLE-only run (ami.enabled is false)")
        for key in ("keep_best", "early_stopping"):
            if getattr(self.train, key) and not self.train.valid_every:
                raise fail(f"train.{key}", "needs validations to rank by: set train.valid_every > 0")
        if self.eval.select == "mi_logq_fixed" and not self.ami.enabled and self.eval.fixed_critic is None:
            raise fail("eval.select", "mi_logq_fixed needs a fixed critic: ami.enabled (the backward network as "
                       "the AMI stages begin) or eval.fixed_critic")
        widest = max(self.data.max_src_len, self.data.max_tgt_len + 1)
        if 0 < self.train.batch_tokens < widest:
            raise fail("train.batch_tokens", f"{self.train.batch_tokens} is smaller than the widest training pair "
                       f"allowed, max(data.max_src_len, data.max_tgt_len + 1) = {widest}; raise it to at least "
                       f"{widest}")
        if self.ami.enabled and self.lns.scale == 0:
            raise fail("lns.scale", "0 with ami.enabled: every one of the K perturbed copies would equal h, so all "
                       "K samples T̃ are the same and every advantage is 0 (AMI would silently be MLE)")
        if self.ami.enabled and self.lns.k == 1 and self.ami.baseline:
            raise fail("lns.k", "1 with ami.baseline: the baseline is the mean over K samples, so with one sample "
                       "every advantage R − b is 0 and no adversarial gradient is left; use k >= 2")
