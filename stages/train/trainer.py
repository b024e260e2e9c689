"""`KDTrainer`: a `transformers.Trainer` whose loss reads the cached teacher targets.

    args = training_arguments("out/", max_steps=1000, per_device_train_batch_size=8)
    trainer = KDTrainer(model=student, args=args, train_dataset=stream, data_collator=Collator(pad_id),
                        processing_class=tokenizer, plan=loss_settings("bild", top_k=8), vocab_size=len(tokenizer))
    trainer.train(resume_from_checkpoint=True)

Everything else is the stock Trainer (accelerate, DeepSpeed/FSDP, checkpoints, loggers); on
CPU ranks `cpu_fsdp` makes `--fsdp` FSDP2, which accelerate alone would run as DDP. The
loss per micro-batch is ce_weight * CE + kd_weight * KD, each a mean over the batch's supervised
rows, then weighted by the rows' share of the optimizer step's rows on all ranks
(`num_items_in_batch`), the way HF's own causal-LM loss is, so gradient accumulation and DDP give
the token-weighted mean.

Data and DDP. `ShardedStream` splits the data across ranks itself (each rank reads only its own
shards). Accelerate's `prepare` would split an IterableDataset again: with `dispatch_batches`
(its default for IterableDatasets) rank 0 reads every batch and sends slices to the others; without
it, `IterableDatasetShard` makes every rank read everything and keep one batch in world_size. So
`training_arguments` sets `dispatch_batches=False`, and `get_train_dataloader` turns the
`IterableDatasetShard` wrapper into a pass-through (num_processes=1), the way the Trainer itself
neutralises the wrapper around its own rank-aware `BatchRebalanceSampler`.

Resume. The stream's position (not buffered data) goes into every checkpoint as
`logitcache_data_rank{r}.json`; `train(resume_from_checkpoint=...)` loads it, and
`ignore_data_skip=True` stops the Trainer from skipping batches on top of it. SIGTERM or SIGINT
during `train` saves such a checkpoint at the end of the step and returns (`stop.py`);
`trainer.stop.name` then names the signal.
"""

import json
import os

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from logitcache.stages.train.data import ShardedStream
from logitcache.stages.train.batch_loss import fused_head_loss, head_weights, loss_parts, supervised_logits
from logitcache.stages.train.loss_settings import LossPlan
from logitcache.stages.train.stop import StopOnSignal
from logitcache.stages.train.student import fused_head_problem
from logitcache.storage.head import logit_transform
from logitcache.storage.errors import ConfigError
from logitcache.storage.paths import write_file_atomically

__all__ = ["KDTrainer", "training_arguments", "data_state_name", "model_inputs", "loss_parts", "supervised_logits",
           "cpu_fsdp"]


def data_state_name(rank: int) -> str:
    return f"logitcache_data_rank{rank}.json"


def training_arguments(output_dir: str, **kwargs) -> TrainingArguments:
    """TrainingArguments with the settings `KDTrainer` needs; `kwargs` are any other TrainingArguments."""
    accel = dict(kwargs.pop("accelerator_config", None) or {})
    accel.update(dispatch_batches=False, split_batches=False)
    kwargs.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available():
        # accelerate picks multi-CPU DDP (gloo) only when told to use the CPU.
        kwargs.setdefault("use_cpu", True)
    return TrainingArguments(output_dir=output_dir, remove_unused_columns=False, ignore_data_skip=True,
                             accelerator_config=accel, **kwargs)


def pass_through(shard) -> None:
    """Make accelerate's `IterableDatasetShard` yield every item of its dataset (one process's view).

    It reads private-by-convention attributes (`num_processes`, `process_index`), so they are
    checked first: an accelerate that renames them fails here, loudly, rather than silently
    keeping one batch in world_size (tests/stages/train/test_trainer_patch.py checks the behaviour).

    Raises:
        RuntimeError: `shard` lacks the attributes this relies on.
    """
    missing = [name for name in ("num_processes", "process_index", "dataset") if not hasattr(shard, name)]
    if missing:
        raise RuntimeError(f"accelerate's {type(shard).__name__} has no {', '.join(missing)}; logitcache's "
                           f"KDTrainer.get_train_dataloader needs updating for this accelerate version")
    shard.num_processes, shard.process_index = 1, 0


def model_inputs(batch: dict) -> dict:
    """The model's inputs from a collated batch: input_ids and attention_mask, or position_ids when packed."""
    return {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids") if name in batch}


def cpu_fsdp(trainer) -> None:
    """Turn FSDP on for a multi-process CPU (gloo) run, which accelerate silently trains as DDP.

    accelerate's `AcceleratorState` enables FSDP only for accelerator device types (MULTI_GPU, ...):
    on MULTI_CPU it drops the `fsdp_plugin` the Trainer built from `--fsdp` and wraps the model in
    DDP. torch's FSDP2 (`fully_shard`) runs on CPU with gloo, so this sets the state's type and
    plugin as accelerate would on a GPU; `Trainer.__init__` calls it before anything is prepared.

    Raises:
        ConfigError: FSDP1 (`fsdp_config` version 1) asked for on CPU: transformers deprecates it,
            and only FSDP2 is tested here (tests/stages/train/test_trainer_fsdp.py).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = trainer.args.fsdp_plugin_args
    # `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and FSDP_* variables instead.
    from_env = plugin_args is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    state = trainer.accelerator.state
    if (plugin_args is None and not from_env) or trainer.is_fsdp_enabled or \
            state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU runs FSDP2 only: set fsdp_version: 2 in the accelerate config, or "
                          "version 2 (transformers' default) in fsdp_config")
    state.fsdp_plugin = plugin
    # Both states, as accelerate does: every AcceleratorState() re-reads PartialState's type.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class _SaveDataPosition(TrainerCallback):
    """Writes each rank's stream position into every checkpoint folder."""

    def __init__(self, stream: ShardedStream):
        self.stream = stream

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        # Atomically: a torn write must not end a resume in a traceback.
        write_file_atomically(os.path.join(folder, data_state_name(args.process_index)),
                              json.dumps(self.stream.state_dict()).encode())


class KDTrainer(Trainer):
    """Trainer for cached distillation (and plain SFT on the same batches).

    Args:
        plan: the loss, its options and total = ce_weight * CE + kd_weight * KD (`loss_settings`;
            CE is skipped at weight 0; sft trains on the labels alone).
        vocab_size: the logits columns to use (see `checks`); None uses all.
        chunk_size: rows per loss chunk (None: automatic).
        eval_sources: {name: `CacheSource` or `RowsSource`} evaluated by `evaluate` (every
            `eval_steps` with eval_strategy="steps"): `evaluate.evaluate_source`'s metrics, the ones
            `logitcache eval` reports (kd_loss with this trainer's loss), logged as
            eval_{name}_{metric}. eval_pad_id pads their batches.
        fused_head: apply the LM head inside the loss, a chunk of supervised rows at a time, so the
            (B, T, V) logits are never built (`batch_loss.fused_head_loss`). Used where the model
            allows it (`fused_head_problem`); otherwise, or with False, the model's own logits.
        online_teacher: a callable batch -> batch that fills the teacher targets in the loop
            (`online.OnlineTeacher`); None reads them from the cache.
        *args, **kwargs: `transformers.Trainer`'s; `args` should come from `training_arguments`.

    Raises:
        ConfigError: TrainingArguments that would split or skip the stream a second time.
    """

    online_teacher = None  # see __init__; a class default for trainers built without it

    def __init__(self, *args, plan: LossPlan, vocab_size: int | None = None, chunk_size: int | None = None,
                 fused_head: bool = True, eval_sources: dict | None = None, eval_pad_id: int = 0,
                 online_teacher=None, **kwargs):
        if eval_sources:
            kwargs.setdefault("eval_dataset", eval_sources)  # Trainer wants one with eval_strategy="steps"
        super().__init__(*args, **kwargs)
        self.eval_sources, self.eval_pad_id = dict(eval_sources or {}), eval_pad_id
        self.online_teacher = online_teacher
        self.plan, self.chunk_size, self.vocab_size = plan, chunk_size, vocab_size
        self.fused_head = fused_head and fused_head_problem(self.model, self.args, fsdp=self.is_fsdp_enabled) is None
        # compute_loss normalizes by `num_items_in_batch` itself; this makes the Trainer count and pass it.
        self.model_accepts_loss_kwargs = True
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        if isinstance(self.train_dataset, ShardedStream):
            a = self.args
            problems = [name for name, bad in (
                ("remove_unused_columns=False", a.remove_unused_columns),
                ("ignore_data_skip=True", not a.ignore_data_skip),
                ("accelerator_config.dispatch_batches=False", a.accelerator_config.dispatch_batches is not False),
                ("accelerator_config.split_batches=False", a.accelerator_config.split_batches)) if bad]
            if problems:
                raise ConfigError(f"KDTrainer streams its own data; its TrainingArguments need {', '.join(problems)} "
                                  "(use stages.train.trainer.training_arguments)")
            self.add_callback(_SaveDataPosition(self.train_dataset))
        # SIGTERM/SIGINT during `train`: checkpoint at the end of the step, then return (see stop.py).
        self.stop = StopOnSignal()
        self.add_callback(self.stop)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        cpu_fsdp(self)

    # ---- data -----------------------------------------------------------------------------------

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        shard = getattr(loader, "dataset", None)
        if isinstance(self.train_dataset, ShardedStream) and shard is not self.train_dataset:
            # accelerate's IterableDatasetShard around a stream that is already split by rank.
            assert getattr(shard, "dataset", None) is self.train_dataset, type(shard)
            pass_through(shard)
        return loader

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, plus the stream's position from the checkpoint when resuming."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"no checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint and isinstance(self.train_dataset, ShardedStream):
            path = os.path.join(resume_from_checkpoint, data_state_name(self.args.process_index))
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: no data position for rank {self.args.process_index}; the checkpoint "
                                  f"was not written by logitcache or with another number of ranks")
            try:
                with open(path) as f:
                    position = json.load(f)
            except ValueError as e:
                raise ConfigError(f"{path}: unreadable data position ({e}); resume from an earlier "
                                  f"checkpoint") from None
            self.train_dataset.load_state_dict(position)
        with self.stop:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out metrics of every `eval_sources` entry, logged as eval_{name}_{metric}: perplexity, accuracy,
        ECE and, with teacher targets, teacher agreement and kd_loss (this trainer's KD loss; see `evaluate`)."""
        if not self.eval_sources:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from logitcache.stages.train.evaluate import evaluate_source, kd_term

        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        metrics = {}
        for name, source in self.eval_sources.items():
            # The training loss's KD term on held-out teacher targets, at this source's draw temperature.
            found = evaluate_source(model, source, pad_id=self.eval_pad_id, vocab_size=self.vocab_size,
                                    batch_size=self.args.per_device_eval_batch_size, device=self.args.device,
                                    kd=kd_term(self.plan, source), **self.eval_options())
            metrics.update({f"{metric_key_prefix}_{name}_{key}": float(value) for key, value in found.items()})
        model.train(was_training)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def eval_options(self) -> dict:
        """`evaluate.evaluate_batches`' head, rank and world_size for this rank: evaluation shared across the
        ranks, applying the head itself where training does, except under FSDP (it reads the head's weight
        outside the forward there)."""
        return {"head": self.fused_head and not self.is_fsdp_enabled, "rank": self.args.process_index,
                "world_size": self.args.world_size}

    def training_step(self, model, inputs, num_items_in_batch=None):
        stream = inputs.pop("stream", None)
        if stream is not None and isinstance(self.train_dataset, ShardedStream):
            self.train_dataset.record(stream)
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- loss -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs["rows"]
        n = rows.shape[0]
        if self.online_teacher is not None and n:
            inputs = self.online_teacher(inputs)
        if self.fused_head and not return_outputs:
            outputs = None
            total, metrics, zero = self._fused_loss(model, inputs)
        else:
            outputs = model(**model_inputs(inputs), use_cache=False)
            logits = outputs.logits
            if n:
                total, metrics = self.loss_parts(supervised_logits(logits, rows, self.vocab_size), inputs)
            else:
                zero = logits.sum() * 0.0
        if n == 0:  # nothing supervised: a zero that still touches every parameter (DDP needs that)
            return (zero, outputs) if return_outputs else zero
        if num_items_in_batch is not None:
            scale = n / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                scale = scale * self.accelerator.num_processes
            loss = total * scale
        else:
            loss = total
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float() * n
            self._weights[name] = self._weights.get(name, 0.0) + n
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, model, inputs):
        """(total, metrics, zero) from the final hidden states and the head (`batch_loss.fused_head_loss`).

        The model's own forward runs (DDP, FSDP and PEFT wrappers see their call) with `logits_to_keep=1`;
        a hook takes the decoder's final hidden states, and the loss is computed in a pre-hook of the
        LM head, inside the forward: FSDP's own pre-hook, which runs first, has gathered the head's
        weight whole there, whether the head is in the root's unit, a unit with the final norm
        (accelerate's) or its own. Under FSDP the total also takes 0 * the forward's (B, 1, V) logits,
        so that FSDP's backward hooks on those fire as in the unfused run.
        """
        inner = self.accelerator.unwrap_model(model)
        rows = inputs["rows"]
        hidden, found = [], []

        def loss_at_head(module, args):
            h = hidden[-1]
            weight, bias = head_weights(inner, self.vocab_size)
            if rows.shape[0] == 0:
                found.append((None, {}, h.sum() * 0.0 + weight.sum() * 0.0))
                return
            h = h.reshape(-1, h.shape[-1]).index_select(0, rows)
            found.append((*fused_head_loss(h, weight, bias, inputs, self.plan, chunk_size=self.chunk_size,
                                           transform=logit_transform(inner.config)), None))

        hooks = [inner.get_decoder().register_forward_hook(lambda module, args, out: hidden.append(out[0])),
                 inner.get_output_embeddings().register_forward_pre_hook(loss_at_head)]
        try:
            outputs = model(**model_inputs(inputs), logits_to_keep=1, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        total, metrics, zero = found[-1]
        if self.is_fsdp_enabled:
            tie = outputs.logits.sum() * 0.0
            total, zero = (None if x is None else x + tie for x in (total, zero))
        return total, metrics, zero

    def loss_parts(self, s: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss_parts` with this trainer's loss plan."""
        return loss_parts(s, batch, self.plan, chunk_size=self.chunk_size)

    # ---- logging --------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        distributed = self.accelerator.num_processes > 1
        # Every rank logs at the same steps; under DDP all of them join the reduction, even a rank
        # whose batches since the last log had no supervised row (and so no metrics).
        if "loss" in logs and (self._sums or distributed):
            names = sorted(self._sums)
            if distributed:
                from accelerate.utils import gather_object

                names = sorted(set().union(*gather_object([names])))
            sums = torch.tensor([float(self._sums.get(k, 0.0)) for k in names], device=self.args.device)
            weights = torch.tensor([float(self._weights.get(k, 0.0)) for k in names], device=self.args.device)
            if distributed and names:
                sums, weights = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(weights, "sum")
            for name, value in zip(names, (sums / weights.clamp_min(1)).tolist()):
                logs[name] = round(value, 6)
            self._sums, self._weights = {}, {}
            if isinstance(self.train_dataset, ShardedStream):
                logs["data_epoch"] = round(self.train_dataset.epoch_progress(), 4)
        super().log(logs, start_time)
