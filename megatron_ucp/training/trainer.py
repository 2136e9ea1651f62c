"""The training loop: build the layout, model, optimizer and DeepSpeed engine; train, evaluate, save.

Run it under ``torchrun`` or the ``deepspeed`` launcher (``python -m megatron_ucp.train ...``). It uses
NCCL on GPUs and gloo on CPU (``DS_ACCELERATOR=cpu``), with no other difference.

``Trainer`` holds a run as explicit steps (``build``, ``load``, ``run``, ``close``); ``train`` is
those steps in order and is what the command line runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from megatron_ucp.checkpoint.trust import one_line, trust_checkpoint_code
from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.distributed import groups
from megatron_ucp.distributed.random import get_rng_state, seed_all, set_rng_state
from megatron_ucp.families import family_of_model
from megatron_ucp.layout.topology import ParallelLayout
from megatron_ucp.pacing import point
from megatron_ucp.training import checkpointing
from megatron_ucp.training.arguments import check_run
from megatron_ucp.training.data import MockDataset, micro_batches, sequence_slices
from megatron_ucp.training.logger import RunLogger
from megatron_ucp.training.memory import IterationMemory, memory_line
from megatron_ucp.training.schedule import LRScheduler
from megatron_ucp.training.optim import (  # noqa: F401 - optimizer_param_groups: re-exported for callers
    build_lr_scheduler,
    build_optimizer,
    group_hyperparameters,
    optimizer_param_groups,
)

if TYPE_CHECKING:
    from megatron_ucp.model.pipe import GPTPipe
    from megatron_ucp.model.sequential import GPTModel

log = logging.getLogger("megatron_ucp")


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Initialise torch.distributed (unless a caller did) and DeepSpeed's communication layer; a collective
    fails after ``timeout_minutes`` without its peers (``--distributed-timeout-minutes``)."""
    from datetime import timedelta

    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))


def enable_cpu_fp16() -> bool:
    """Let fp16 run on DeepSpeed's CPU accelerator; True if it had to be enabled.

    The CPU accelerator reports fp16 unsupported unless oneDNN has native fp16 kernels (AVX512-FP16),
    and the engine then refuses ``"fp16": {"enabled": true}``. Every fp16 op we use runs on CPU
    anyway (our linear layers compute half-precision GEMMs in fp32 on the exact fp16 inputs), so the
    loss-scaled fp16 optimizer behaves as on a GPU, just slower.
    """
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu" or acc.is_fp16_supported():
        return False
    acc.is_fp16_supported = lambda: True
    return True


def build_ds_config(cfg: TrainConfig, layout: ParallelLayout, moe: bool = False) -> dict:
    """The DeepSpeed config for this run, derived from the flags (one source of truth).

    DeepSpeed's pipeline engine partitions the activations a stage sends over its TP ranks, assuming they
    are replicated there. Under sequence parallelism they are not (each rank holds its slice of the
    sequence), and an MoE model's blocks pass ``(activations, aux loss)``, two tensors that need
    gradients, where the partitioning carries one (an assertion in its pipeline engine): in both cases it
    is off and stages exchange whole activations."""
    ds = {
        # DeepSpeed counts each Ulysses rank's slice of a sample as a sample of its own (its data axis is dp x sp)
        "train_batch_size": cfg.global_batch_size * layout.degree("sp"),
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(layout.degree("dp")),
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": cfg.universal_checkpoint},
    }
    if moe or cfg.sequence_parallel:
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as f:
            ds.update(json.load(f))
    return ds


def check_expert_groups(layout: ParallelLayout, state) -> None:
    """DeepSpeed's expert-parallel group of this rank is the one our layout derives (``layout.topology``):
    placement, initialisation and checkpoints name experts by it."""
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{layout.degree('ep')}"
    ranks = list(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name])
    want = layout.group_of(state.global_rank, "ep")
    if sorted(ranks) != want or ds_groups._get_expert_parallel_rank(name) != state.rank_in("ep"):
        raise RuntimeError(f"DeepSpeed's expert-parallel group {sorted(ranks)} of rank {state.global_rank} is not "
                           f"the layout's {want}")


def build_model(model_cfg: ModelConfig, cfg: TrainConfig, state) -> GPTPipe | GPTModel:
    """GPTPipe for DeepSpeed's pipeline engine (ZeRO 0/1), else GPTModel with the same parameter names."""
    if cfg.use_pipeline_engine:
        from megatron_ucp.model.pipe import GPTPipe

        return GPTPipe(model_cfg, state, cfg.seed, block=family_of_model(model_cfg).block)
    from megatron_ucp.model.sequential import GPTModel

    model = GPTModel(model_cfg, state, cfg.seed, cfg.zero_stage, block=family_of_model(model_cfg).block)
    if cfg.zero_stage == 3:
        model.register_tied_head_for_zero3()
    return model


def build_run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (None with mock data)."""
    if cfg.mock_data:
        return None
    from megatron_ucp.data.tokenizer import build_tokenizer

    return build_tokenizer(cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model,
                           vocab_file=cfg.vocab_file, merge_file=cfg.merge_file)


def build_datasets(cfg: TrainConfig, tok=None):
    """(train, valid, vocab_size) sample sources; ``tok``: the run's tokenizer, when already built."""
    if cfg.mock_data:
        assert cfg.vocab_size is not None  # TrainConfig.validate: --mock-data needs --vocab-size
        return (MockDataset(cfg.vocab_size, cfg.seq_length, cfg.seed),
                MockDataset(cfg.vocab_size, cfg.seq_length, cfg.seed + 1), cfg.vocab_size)
    from megatron_ucp.data.gpt_dataset import GPTDataset

    assert cfg.data_path is not None  # TrainConfig.validate: --data-path unless --mock-data
    tok = tok if tok is not None else build_run_tokenizer(cfg)
    from megatron_ucp.training.identity import check_tokenizer_identity

    check_tokenizer_identity(cfg, tok)  # data made by another tokenizer (its sidecar says): for library callers too
    train = GPTDataset(cfg.data_path, cfg.seq_length, cfg.seed, split=cfg.split, name="train")
    valid = GPTDataset(cfg.data_path, cfg.seq_length, cfg.seed, split=cfg.split, name="valid")
    return train, valid, tok.vocab_size


def single_process_model(model_kwargs: dict, cfg: TrainConfig, vocab_size: int | None = None) -> GPTModel:
    """The trainer's model at TP 1 / PP 1 / DP 1 in this process, outside DeepSpeed and torch.distributed.

    It is the non-pipeline ``GPTModel`` (GPTPipe's parameter names), checked by ``check_run`` and seeded
    as ``Trainer.build`` seeds rank 0, so it starts from exactly the trainer's weights; nothing is
    initialised and nothing is left behind (``groups.single_process_state``). For code that steps the
    model by hand, such as the plain-PyTorch baseline of ``tools/benchmark_training.py``.
    """
    from megatron_ucp.model.sequential import GPTModel

    model_cfg = check_run(model_kwargs, cfg, 1, vocab_size)
    state = groups.single_process_state()
    seed_all(cfg.seed, state.rank_in("pp"), state.rank_in("tp"), state.tp.rng)  # also registers the tracker stream
    return GPTModel(model_cfg, state, cfg.seed, cfg.zero_stage, block=family_of_model(model_cfg).block)


@dataclass
class TrainResult:
    iteration: int
    last_loss: float | None
    last_valid_loss: float | None


def _tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def _plain_engine_steps(engine, state, gas: int):
    """train_batch / eval_batch for the non-pipeline engine, with the pipeline engine's loss reduction
    (micro-batch losses summed, divided by the accumulation steps, averaged over data parallel)."""

    def reduce(total: torch.Tensor) -> float:
        total = total.detach().float() / gas
        ranks = state.get_data_parallel_world_size()  # dp x sp: each rank's loss is its sequence slice's mean
        if ranks > 1:
            dist.all_reduce(total, group=state.get_data_parallel_group())
            total /= ranks
        return float(total)

    def train_batch(data_iter) -> float:
        total = None
        for _ in range(gas):
            tokens, labels = next(data_iter)
            loss = engine(tokens, labels)
            engine.backward(loss)
            engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None  # gas >= 1 (TrainConfig.gradient_accumulation_steps)
        return reduce(total)

    def eval_batch(data_iter) -> float:
        total = None
        engine.eval()
        with torch.no_grad():
            for _ in range(gas):
                tokens, labels = next(data_iter)
                loss = engine(tokens, labels).detach()
                total = loss if total is None else total + loss
        engine.train()
        assert total is not None  # gas >= 1 (TrainConfig.gradient_accumulation_steps)
        return reduce(total)

    return train_batch, eval_batch


def resume_line(resumed: checkpointing.ResumeState, now: ParallelLayout, reached: int | None) -> str:
    """What a resume tells: the saved and the new layout, the iteration, and the iterations the job loses (those
    it had finished past the checkpoint, by ``reached``, the progress record of the save folder)."""
    saved = None if resumed.source_topology is None else ParallelLayout.from_dict(resumed.source_topology)
    if saved is None:
        layouts = f"unknown -> {checkpointing.layout_words(now)}"
    else:
        layouts = (f"{checkpointing.layout_words(saved)} -> {checkpointing.layout_words(now)} "
                   f"(world {saved.world_size} -> {now.world_size})")
    if reached is None or reached < resumed.iteration:
        lost = "iterations lost: unknown (no progress record past the checkpoint)"
    else:
        lost = f"{reached - resumed.iteration} iterations lost (the job had reached iteration {reached})"
    return f"resuming at iteration {resumed.iteration}: layout {layouts}; {lost}"


class PeerGone(RuntimeError):
    """After a SIGTERM, a collective failed because a peer is gone: the run ends without saving (exit 1, so an
    elastic agent restarts the job from the previous complete checkpoint)."""


class SaveTriggers:
    """What makes a run save (and stop) besides ``--save-interval``, agreed by every rank after each iteration.

    ``--exit-signal-handler``: a SIGTERM (what torchrun sends its workers before a restart, and clouds before a
    preemption) is noted and the iteration finishes; then every rank saves the same iteration and the run
    ends normally (exit 0). A second SIGTERM ends the process at once (the default action), leaving the
    previous checkpoint. ``--save-interval-minutes``: rank 0's clock says when the last save is that old.
    One all-reduce (MAX) of both flags per iteration makes every rank decide the same.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.minutes = cfg.save_interval_minutes
        self.last_save = time.monotonic()
        self.received = False
        self.previous = None
        if cfg.exit_signal_handler:
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process

    def poll(self, iteration: int) -> tuple[bool, bool]:
        """(stop: a rank got SIGTERM, overdue: rank 0's last save is older than the interval), agreed."""
        overdue = self.minutes is not None and time.monotonic() - self.last_save >= 60.0 * self.minutes
        flags = torch.tensor([float(self.received), float(overdue and dist.get_rank() == 0)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class Trainer:
    """One run in explicit steps: ``build()``, ``load()``, ``run()``, then ``close()``.

    ``train()`` is exactly these steps in order. They are separate so that a caller can stop between
    them with the engine in hand: the logits check builds and loads a model and evaluates it without
    training; tests read optimizer state after ``run()``. Use it as a context manager::

        with Trainer(model_kwargs, cfg) as trainer:
            trainer.build()
            trainer.load()
            result = trainer.run()
            ...  # trainer.engine, trainer.model, trainer.state

    Leaving the block waits for every rank (unless an exception is leaving it) and then forgets the
    process groups, so the next run in the same process starts clean.
    """

    # Set by build(); reading one before build() is an AttributeError.
    layout: ParallelLayout
    state: groups.ParallelState
    model_cfg: ModelConfig
    model: GPTPipe | GPTModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    ds_config: dict
    engine: Any  # deepspeed.DeepSpeedEngine or PipelineEngine
    metadata: checkpointing.CheckpointMetadata
    train_data: Any
    valid_data: Any
    device: torch.device
    gas: int  # gradient accumulation steps per iteration

    def __init__(self, model_kwargs: dict, cfg: TrainConfig) -> None:
        self.model_kwargs = dict(model_kwargs)
        self.cfg = cfg
        self.iteration = 0  # optimizer steps done (after load(): the checkpoint's)
        self.consumed = 0  # training samples consumed
        self.resumed: checkpointing.ResumeState | None = None
        self._owns_groups = False  # whether close() must destroy the process groups
        self._train_batch: Callable[[Any], float] | None = None
        self._eval_batch: Callable[[Any], float] | None = None

    @property
    def rank0(self) -> bool:
        return self.state.global_rank == 0

    # -- steps -------------------------------------------------------------------------------------

    def build(self) -> Trainer:
        """Distributed start-up, layout and process groups, data, model, optimizer, DeepSpeed engine
        and checkpoint metadata. Every rank must call it (it runs collectives)."""
        import deepspeed

        cfg = self.cfg
        # DeepSpeed's ZeRO-3 calls torch.distributed's renamed collectives on every step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
        if cfg.trust_checkpoint_code:
            trust_checkpoint_code(True)
        if cfg.save:  # before start-up: a link in the save folder would have the saves write through it
            checkpointing.check_save_folder(cfg.save, checkpointing.saved_iterations(cfg.train_iters,
                                                                                     cfg.save_interval))
        init_distributed(cfg.distributed_timeout_minutes)
        if cfg.elastic_layout:  # the entry point did the same for its launcher's world size
            from megatron_ucp.training.elastic import fit_layout

            self.cfg = cfg = fit_layout(self.model_kwargs, cfg, dist.get_world_size())
        self.layout = ParallelLayout.from_world_size(dist.get_world_size(), cfg.tensor_model_parallel_size,
                                                     cfg.pipeline_model_parallel_size,
                                                     sp=cfg.ds_sequence_parallel_size,
                                                     ep=cfg.moe_expert_parallel_size)
        self.state = groups.initialize(self.layout)
        self._owns_groups = True
        state = self.state
        tokenizer = build_run_tokenizer(cfg)
        self.train_data, self.valid_data, vocab_size = build_datasets(cfg, tokenizer)
        # The same whole-run checks the entry point ran before start-up, for library callers; now with
        # the tokenizer's vocabulary and the real world size.
        self.model_cfg = model_cfg = check_run(self.model_kwargs, cfg, dist.get_world_size(), vocab_size)
        if cfg.dtype == "fp16" and enable_cpu_fp16() and self.rank0:
            print("fp16 on the CPU accelerator: half-precision storage, GEMMs computed in fp32", flush=True)
        seed_all(cfg.seed, state.rank_in("pp"), state.rank_in("tp"), state.tp.rng)
        state.tp.sequence_parallel = cfg.sequence_parallel
        self.model = model = build_model(model_cfg, cfg, state)
        self.optimizer = build_optimizer(model, model_cfg, cfg)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg)
        self.ds_config = build_ds_config(cfg, self.layout, model_cfg.is_moe)
        if self.rank0 and cfg.ds_config_out:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.ds_config_out)), exist_ok=True)
            with open(cfg.ds_config_out, "w") as f:
                json.dump(self.ds_config, f, indent=2)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=self.ds_config,
                                                    mpu=None if cfg.use_pipeline_engine else state)
        if model_cfg.is_moe:
            check_expert_groups(self.layout, state)
        record = None if tokenizer is None else {**tokenizer.identity, "vocab_size": int(tokenizer.vocab_size)}
        self.metadata = checkpointing.build_metadata(model_cfg, cfg, state, model.padded_vocab, model.stage_parts(),
                                                     record)
        self.device = next(model.parameters()).device
        self.gas = cfg.gradient_accumulation_steps(self.layout.degree("dp"))
        if cfg.use_pipeline_engine:
            from megatron_ucp.model.pipe import tied_broadcast_warning_filtered

            engine, gas = self.engine, self.gas

            def train_batch(it) -> float:
                with tied_broadcast_warning_filtered():  # DeepSpeed's tied-weight broadcast: see model.pipe
                    return float(engine.train_batch(data_iter=it))

            def eval_batch(it) -> float:
                return float(engine.eval_batch(it, num_micro_batches=gas))

            self._train_batch, self._eval_batch = train_batch, eval_batch
        else:
            self._train_batch, self._eval_batch = _plain_engine_steps(self.engine, state, self.gas)
        return self

    def load(self) -> checkpointing.ResumeState | None:
        """Resume from ``cfg.load`` (None without it): weights, optimizer, schedule, counters and, at
        the same layout, the RNG states; fine-tuning restarts the counters and the schedule."""
        cfg, state = self.cfg, self.state
        if not cfg.load:
            return None
        folder = checkpointing.agreed_folder(cfg.load, cfg.universal_checkpoint, cfg.ckpt_step)
        if folder is None:  # Megatron's behaviour: the command that starts a job also restarts it
            if self.rank0:
                print(f"no checkpoint in {cfg.load} yet: starting from scratch", flush=True)
            return None
        new_rows = None
        if cfg.allow_vocab_extension:  # rows the checkpoint lacks are initialised as this model's own
            from megatron_ucp.training.sliced_load import NewVocabRows

            meta = checkpointing.folder_metadata(folder)
            if meta is not None and self.model_cfg.vocab_size > meta.original_vocab_size:
                new_rows = NewVocabRows(self.model_cfg, cfg.seed, self.model.padded_vocab, meta.original_vocab_size)
        resumed = checkpointing.load(self.engine, cfg.load, cfg.universal_checkpoint, state, cfg,
                                     group_hyperparameters(cfg, self.model_cfg.is_moe), new_rows, folder=folder)
        self.iteration, self.consumed = resumed.iteration, resumed.consumed_train_samples
        if resumed.rng_state is not None and not cfg.no_load_rng and not cfg.finetune:
            set_rng_state(resumed.rng_state, state.tp.rng)
        else:  # another layout: reseed deterministically for this one
            seed_all(cfg.seed + self.iteration, state.rank_in("pp"), state.rank_in("tp"), state.tp.rng)
        if self.rank0:
            what = "fine-tuning from" if cfg.finetune else "resumed from"
            print(f"{what} {resumed.path} at iteration {self.iteration} (saved at {resumed.source_topology}, "
                  f"now {self.layout.to_dict()}){resumed.note}", flush=True)
            if not cfg.finetune:
                print(resume_line(resumed, self.layout, checkpointing.read_progress(cfg.load)), flush=True)
        self.resumed = resumed
        return resumed

    def run(self) -> TrainResult:
        """Train from the current iteration to ``cfg.train_iters``, logging, evaluating and saving as
        the flags say (a run already there trains nothing)."""
        cfg, layout, state, model = self.cfg, self.layout, self.state, self.model
        assert self._train_batch is not None, "call build() before run()"
        topology = dict(layout.to_dict(), zero_stage=cfg.zero_stage, dtype=cfg.dtype)
        logger = RunLogger(cfg.tensorboard_dir, cfg.loss_log, topology, self.iteration) if self.rank0 else None
        train_iter = self._batches(self.train_data, self.consumed, None)
        if self.rank0:
            n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
            engine_kind = "pipeline engine" if cfg.use_pipeline_engine else "non-pipeline engine"
            print(f"training {layout} ZeRO-{cfg.zero_stage} {cfg.dtype} ({engine_kind}): vocab "
                  f"{self.model_cfg.vocab_size} (padded {model.padded_vocab}), {n_params} parameters on rank 0, "
                  f"stage parts {model.stage_parts()}, global batch {cfg.global_batch_size} = micro "
                  f"{cfg.micro_batch_size} x accumulation {self.gas} x DP {layout.degree('dp')}", flush=True)
        memory = IterationMemory(self.device) if cfg.report_memory else None
        last_loss = last_valid = None
        window_start, window_iters = time.perf_counter(), 0
        exits = SaveTriggers(cfg) if cfg.exit_signal_handler or cfg.save_interval_minutes else None
        try:
            if cfg.eval_at_start and self.iteration < cfg.train_iters:
                self._validate(logger)
            while self.iteration < cfg.train_iters:
                lr = self.scheduler.get_lr()[0]  # the LR this step uses
                if memory:
                    memory.start()
                loss = self._train_batch(train_iter)
                self.iteration += 1
                if memory and (sample := memory.stop()) is not None:
                    print(memory_line(state.global_rank, self.iteration, sample), flush=True)
                self.consumed += cfg.global_batch_size
                iteration = self.iteration
                window_iters += 1
                last_loss = loss
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = None if grad_norm is None else float(grad_norm)
                moe_loss = self._moe_loss() if self.model_cfg.is_moe else None
                if logger:
                    logger.train_step(iteration, loss, lr, grad_norm, self.consumed, moe_loss)
                if cfg.save and self.rank0:
                    checkpointing.record_progress(cfg.save, iteration, layout.to_dict())
                if self.rank0 and window_iters and (iteration % cfg.log_interval == 0
                                                    or iteration == cfg.train_iters):
                    elapsed = time.perf_counter() - window_start
                    tokens = window_iters * cfg.global_batch_size * cfg.seq_length
                    gn = "n/a" if grad_norm is None else f"{grad_norm:.4f}"
                    print(f" iteration {iteration:6d}/{cfg.train_iters} | consumed samples {self.consumed:8d} | "
                          f"elapsed time per iteration (ms): {1000 * elapsed / window_iters:.1f} | "
                          f"tokens/s: {_tokens_per_s(tokens, elapsed):.0f} | learning rate: {lr:.4E} | "
                          f"lm loss: {loss:.6E} | grad norm: {gn} |"
                          + ("" if moe_loss is None else f" moe loss: {moe_loss:.6E} |"), flush=True)
                    window_start, window_iters = time.perf_counter(), 0
                point(f"iteration-{iteration}", release=None if exits is None else lambda: exits.received)
                if cfg.eval_interval and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
                    last_valid = self._validate(logger)
                    window_start, window_iters = time.perf_counter(), 0
                stop, overdue = exits.poll(iteration) if exits else (False, False)
                if cfg.save and (
                    (cfg.save_interval and iteration % cfg.save_interval == 0) or iteration == cfg.train_iters
                    or overdue or stop
                ):
                    self.save(cfg.save)
                    window_start, window_iters = time.perf_counter(), 0
                    if exits:
                        exits.saved()
                if stop:
                    if self.rank0:
                        print(f"exiting after iteration {iteration} on SIGTERM"
                              + (" (checkpoint saved)" if cfg.save else ""), flush=True)
                    break
        except RuntimeError as e:  # a collective failed: a peer is gone (killed, or its node lost)
            if exits is None or not exits.received:
                raise
            raise PeerGone(f"SIGTERM received, but a peer is gone ({one_line(e)}): exiting without a save; the "
                           "previous complete checkpoint stays") from e
        finally:
            if exits:
                exits.close()
            if logger:
                logger.close()
        return TrainResult(self.iteration, last_loss, last_valid)

    def close(self, barrier: bool = True) -> None:
        """Leave together, then forget the process groups this trainer created (safe to call twice).

        The barrier matters: a rank tearing down its process groups while a peer still finishes
        asynchronous gloo traffic (ZeRO-3's gathers) can abort at exit. After a failure it is skipped,
        since the peers may never arrive.
        """
        if not self._owns_groups:
            return
        self._owns_groups = False
        try:
            if barrier:
                dist.barrier()
        finally:
            groups.destroy()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(barrier=exc_type is None)

    # -- pieces of run(), usable on their own after build() -------------------------------------------

    def _batches(self, dataset, consumed: int, num_steps: int | None):
        """This rank's micro batches (its data-parallel share, cut to its Ulysses slice of the sequence)."""
        cfg, layout, state = self.cfg, self.layout, self.state
        return sequence_slices(micro_batches(dataset, consumed, num_steps, cfg.global_batch_size, cfg.micro_batch_size,
                                             state.rank_in("dp"), layout.degree("dp"), self.device),
                               layout.degree("sp"), state.rank_in("sp"))

    def _moe_loss(self) -> float:
        """This iteration's load-balancing loss (unweighted): the mean over micro-batches, kept by the last
        pipeline stage's loss function, averaged over data parallelism and sent to every rank."""
        value = self.model.loss_fn.take_aux() if self.state.is_last_stage else None
        total = torch.zeros(1, dtype=torch.float64)
        if value is not None:  # every TP rank of a data-parallel rank holds the same value
            total += float(value) / (self.layout.degree("dp") * self.layout.degree("tp"))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return float(total)

    def _validate(self, logger: RunLogger | None) -> float:
        """``evaluate`` at the current iteration, logged and printed."""
        loss = self.evaluate()
        if logger:
            logger.validation(self.iteration, loss)
        if self.rank0:
            print(f" validation at iteration {self.iteration} | lm loss: {loss:.6E} |", flush=True)
        return loss

    def evaluate(self) -> float:
        """Mean loss over ``cfg.eval_iters`` batches from the start of the validation data."""
        cfg = self.cfg
        assert self._eval_batch is not None, "call build() before evaluate()"
        it = self._batches(self.valid_data, 0, cfg.eval_iters)
        losses = [self._eval_batch(it) for _ in range(cfg.eval_iters)]
        return sum(losses) / len(losses)

    def save(self, folder: str) -> str:
        """Write ``<folder>/global_step<iteration>`` (every rank) and return its path."""
        path = checkpointing.save(self.engine, folder, self.iteration, self.consumed, self.cfg.seq_length,
                                  get_rng_state(self.state.tp.rng), self.metadata, self.state, self.model_cfg)
        if self.rank0:
            print(f"saved checkpoint {path}", flush=True)
        return path


def train(model_kwargs: dict, cfg: TrainConfig, on_finish=None) -> TrainResult:
    """Train to ``cfg.train_iters``: ``Trainer``'s build, load and run. ``on_finish(engine, model, state)``
    runs after training, before the ranks leave (kept for callers written before ``Trainer``)."""
    with Trainer(model_kwargs, cfg) as trainer:
        trainer.build()
        trainer.load()
        result = trainer.run()
        if on_finish is not None:
            on_finish(trainer.engine, trainer.model, trainer.state)
    return result
