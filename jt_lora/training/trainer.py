"""The training loop of ``python -m jt_lora.train`` (the command, its flags and their checks are
in ``jt_lora/train.py``).

Numerics follow microsoft/LoRA's ``gpt2_ft.py``: the reference AdamW, schedules stepped per
micro-batch, loss scaled by ``1/grad_acc``, gradient clipping over the accumulated gradient, label
smoothing, loss only on completion tokens. What differs is what a long CPU/GPU job needs: dynamic
padding, adapter-only (or, for full fine-tuning, whole-model) checkpoints written atomically with the
optimiser, schedule, data-order and RNG state (``--resume`` ends with the same weights as an
uninterrupted run), a NaN guard that keeps the last good checkpoint, a progress bar, a JSONL log, a
loss-curve PNG, and data parallelism over MPI (``mpirun -np N python -m jt_lora.train ...``; only
rank 0 writes).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import jt
from ..nn import bf16
from .data import FTDataLoader, FTDataset
from ..models.gpt2 import MODEL_CARDS, GPT2Config, token_losses
from .optim import AdamW, clip_grad_norm, lr_lambda
from ..io.atomic import atomic_open, atomic_write_text, replace_dir
from ..models.loading import load_model
from ..models.saving import load_adapter, save_adapter, save_safetensors
from .workdir import (FULL_MODEL_DIR, OPTIM_FILE, RUN_FILE, STATE_FILE, RunConflict,
                      config_differences, fingerprint, list_checkpoints, new_run_id, newest_valid_checkpoint,
                      output_errors, prune_checkpoints, read_run, run_outputs, set_aside, truncate_log,
                      validate_checkpoint)

__all__ = ["Trainer", "masked_loss_sum", "loss_and_grads", "latest_checkpoint", "load_full_model",
           "INA_DEFAULT_INHIBITION"]

INA_DEFAULT_INHIBITION = 0.3
_SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")


def _adapter_fields(args) -> dict:
    if args.adapter == "full":  # full fine-tuning: the plain model, every weight trained
        return dict(adapter_type="none")
    fields = dict(adapter_type=args.adapter, lora_attn_dim=args.lora_dim, lora_attn_alpha=args.lora_alpha,
                  lora_dropout=args.lora_dropout,
                  lora_inhibition=args.lora_inhibition if args.adapter == "ina" else 0.0)
    if args.adapter == "ia3":   # which parts of c_attn's output (IA)3 rescales: q too, or k and v only
        fields["ia3_enable"] = (getattr(args, "ia3_parts", None) != "kv", True, True)
    return fields


def _shape_flags(args) -> dict:
    """The shape flags of a random init (the card's values where not given)."""
    return {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size") if getattr(args, k) is not None}


def _model_config(args) -> GPT2Config:
    """The config of a random init: the card, with any shape flags."""
    fields = _adapter_fields(args)
    return GPT2Config.from_card(args.model_card, **_shape_flags(args), adapter=fields.pop("adapter_type"), **fields)


def matching_card(config) -> "str | None":
    """The model card whose shape the config has (GPT-2's vocabulary and context), or None."""
    for name, card in MODEL_CARDS.items():
        if all(getattr(config, k) == v for k, v in card.items()) and config.vocab_size == 50257:
            return name
    return None


def latest_checkpoint(work_dir):
    """The newest checkpoint directory in work_dir whose files all read back, or None."""
    path, _ = newest_valid_checkpoint(work_dir, say=lambda msg: None)
    return path


def _due(step: int, interval: int) -> bool:
    """Whether a periodic action falls on ``step`` (interval 0 = never periodically)."""
    return interval > 0 and step % interval == 0


def _allreduce_sum(x: float) -> float:
    if not jt.in_mpi:
        return x
    return float(jt.array(np.array([x], dtype=np.float64)).mpi_all_reduce("add").item())


def masked_loss_sum(model, batch, label_smooth: float = 0.0):
    """Sum of the masked per-token loss of a batch, with the LM head run only where the mask is set.

    The LM head (``n_embd x 50257``) and the softmax over the vocabulary are the costliest part of a
    step on short E2E examples; positions without loss (context, padding) skip them entirely.
    """
    ids, mask = batch["input"], batch["mask"]
    b, t = ids.shape
    hidden, _, _ = model.transformer(jt.array(ids))
    flat_mask = mask.reshape(-1)
    where = np.nonzero(flat_mask)[0].astype("int32")
    h = hidden.reshape(b * t, hidden.shape[-1])[jt.array(where)]  # [N, C]
    targets = jt.array(batch["target"].reshape(-1)[where])
    from ..nn.fused_loss import fused_loss_enabled, fused_token_losses
    if fused_loss_enabled(model.transformer.wte.weight):  # head + loss in vocabulary chunks, no [N, V] logits
        if all(p.is_stop_grad() for p in model.parameters()):  # eval(): no dL/dh work in the op
            h = h.stop_grad()
        per_token = fused_token_losses(h, model.transformer.wte.weight, targets, label_smooth)
    else:  # JT_LORA_FUSED_LOSS=0, CUDA, no oneDNN
        per_token = token_losses(model.logits(h), targets, label_smooth)  # logits [N, V]
    return (per_token * jt.array(flat_mask[where])).sum()


def loss_and_grads(model, batch, params, label_smooth: float = 0.0, grad_scale: float = 1.0,
                   world: int = 1, global_count=None):
    """The reference's loss ``sum(loss·mask)/(sum(mask)+1e-4)`` of one micro-batch and its gradients.

    Under data parallelism each process passes the mask count of the *global* batch and the world
    size: then the mean over processes of the returned loss (and gradients) is exactly the
    single-process value for the global batch.
    """
    if global_count is None:
        global_count = float(batch["mask"].sum())
    if batch["input"].shape[0] == 0 or not batch["mask"].any():  # an empty shard, or nothing to learn
        return jt.zeros((1,)), [jt.zeros(p.shape) for p in params]
    loss = masked_loss_sum(model, batch, label_smooth) * (world / (global_count + 0.0001))
    grads = jt.grad(loss * grad_scale, params)
    return loss, grads


def load_full_model(model, model_dir: Path) -> None:
    """Full fine-tuning's checkpoint (a HF GPT-2 directory) back into ``model``, every key required."""
    from ..models.checkpoint import load_into_model, normalize_gpt2_keys, read_state_dict
    raw, _ = read_state_dict(model_dir)
    load_into_model(model, normalize_gpt2_keys(raw), strict=True, source=str(model_dir))


class Trainer:
    """The training loop; one instance per process."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
        self.is_main = self.rank == 0
        self.work_dir = Path(args.work_dir)
        self.run_id = None
        np.random.seed(args.random_seed)  # same adapter init on every rank
        jt.set_seed(args.random_seed)
        if args.init_checkpoint:
            shape = {"n_head": args.n_head} if args.n_head is not None else {}
            self.model = load_model(args.init_checkpoint, training=True, **shape, **_adapter_fields(args))
            self.base_note = f"base weights from {args.init_checkpoint}"
            self._warn_if_card_differs()
        else:
            self.model = load_model(None, training=True, card=args.model_card, **_shape_flags(args), **_adapter_fields(args))
            self.base_note = "RANDOM INIT base model (no --init_checkpoint): a pipeline demo, not a real fine-tune"
        self.config = self.model.config
        self.full = args.adapter == "full"
        if self.full:   # full fine-tuning: every weight of GPT-2 trains (the LM head is tied to wte)
            for p in self.model.parameters():
                p.start_grad()
        self.train_set = FTDataset(args.train_data, args.seq_len, vocab_size=self.config.vocab_size)
        self.train_loader = FTDataLoader(self.train_set, args.train_batch_size, shuffle=True, seed=args.random_seed,
                                         drop_last=False, rank=self.rank, world_size=self.world,
                                         pad_to_multiple_of=args.pad_to_multiple_of)
        self.valid_loader = None
        if args.valid_data:
            valid_set = FTDataset(args.valid_data, args.seq_len, vocab_size=self.config.vocab_size)
            self.valid_loader = FTDataLoader(valid_set, args.valid_batch_size, rank=self.rank, world_size=self.world,
                                             pad_to_multiple_of=args.pad_to_multiple_of)
        self.max_step = args.max_step or args.max_epoch * len(self.train_loader)
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if not p.is_stop_grad()]
        self.optimizer = AdamW(self.named_trainable, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                               eps=args.adam_epsilon, weight_decay=args.weight_decay, correct_bias=args.correct_bias)
        self.step = 0               # micro-batches done (the reference's train_step)
        self.history = []           # logged points, for the JSONL log and the plot
        self.best_valid = None
        self._acc = None            # gradient accumulation buffers
        self._wandb = None

    def _warn_if_card_differs(self):
        """The checkpoint decides the shape; a --model_card that says otherwise is named once."""
        cfg, card = self.model.config, MODEL_CARDS[self.args.model_card]
        if any(getattr(cfg, k) != v for k, v in card.items()):
            shape = ", ".join(f"{k}={getattr(cfg, k)}" for k in _SHAPE_KEYS)
            self._say(f"warning: --model_card {self.args.model_card} does not match {self.args.init_checkpoint} "
                      f"({shape}); training the checkpoint's shape, recorded in train_config.json")

    # -- one micro-batch ------------------------------------------------------------------
    def _loss_and_grads(self, batch):
        global_count = _allreduce_sum(float(batch["mask"].sum()))
        loss, grads = loss_and_grads(self.model, batch, [p for _, p in self.named_trainable],
                                     label_smooth=self.args.label_smooth, grad_scale=1.0 / self.args.grad_acc,
                                     world=self.world, global_count=global_count)
        if jt.in_mpi:
            loss = loss.mpi_all_reduce("mean")
            grads = [g.mpi_all_reduce("mean") for g in grads]
        return loss, grads

    def train_step(self, batch) -> float:
        self.model.train()
        jt.set_seed(self.args.random_seed * 1000003 + self.step * 7919 + self.rank)  # dropout: f(seed, step, rank)
        with bf16.compute(getattr(self.args, "precision", "fp32") == "bf16"):   # frozen base's products
            loss, grads = self._loss_and_grads(batch)
        self._acc = grads if self._acc is None else [a + g for a, g in zip(self._acc, grads)]
        lr = self.args.lr * lr_lambda(self.args.scheduler, self.step, self.args.warmup_step, self.max_step)
        self.step += 1
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss is {value} at step {self.step}; stopping. The last good checkpoint in {self.work_dir} "
                "is intact: lower --lr, set --clip, or check the data, then --resume")
        if self.step % self.args.grad_acc == 0:
            acc = self._acc
            if self.args.clip > 0:
                acc, _ = clip_grad_norm(acc, self.args.clip)
            self.optimizer.step(acc, lr=lr)
            self._acc = None
            jt.sync([p for _, p in self.named_trainable])
        return value, lr

    def evaluate(self) -> float:
        """Mean over validation batches of the masked mean loss (the reference's AverageMeter)."""
        self.model.eval()
        losses = []
        self.valid_loader.set_epoch(0)
        for batch in self.valid_loader:
            count = _allreduce_sum(float(batch["mask"].sum()))
            if batch["input"].shape[0] == 0 or not batch["mask"].any():
                local = 0.0
            else:
                local = float(masked_loss_sum(self.model, batch, self.args.label_smooth).item())
            losses.append(_allreduce_sum(local) / (count + 0.0001))
        self.model.train()
        return float(np.mean(losses))

    # -- checkpoints ----------------------------------------------------------------------
    def _check_finite_weights(self):
        """Never write a checkpoint whose weights blew up (the loss may still have been finite)."""
        bad = [n for n, p in self.named_trainable if not np.isfinite(p.numpy()).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite adapter weights after step {self.step} ({bad[:3]}); stopping without saving. "
                f"The last good checkpoint in {self.work_dir} is intact: lower --lr or set --clip, then --resume")

    def _writing(self, path):
        return output_errors(path, intact=f"checkpoints already written in {self.work_dir} are intact")

    def save_checkpoint(self):
        """Write checkpoint-<step> under a temporary name and rename it whole; then prune this run's
        older ones. A failed write removes the partial temporary directory and keeps the rest."""
        if not self.is_main:
            return
        self._check_finite_weights()
        final = self.work_dir / f"checkpoint-{self.step}"
        tmp = self.work_dir / f".tmp-checkpoint-{self.step}"
        state = {"step": self.step, "max_step": self.max_step, "loader": self.train_loader.state_dict(),
                 "best_valid": self.best_valid, "history": self.history, "world_size": self.world,
                 "run_id": self.run_id, "config": fingerprint(self.args, self.world)}
        try:
            with self._writing(final):
                if tmp.exists():
                    shutil.rmtree(tmp)
                self._save_weights(tmp / FULL_MODEL_DIR if self.full else tmp)
                save_safetensors(tmp / OPTIM_FILE, self.optimizer.state_dict())
                atomic_write_text(tmp / STATE_FILE, json.dumps(state))
                replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune_checkpoints(self.work_dir, self.run_id, self.args.keep_checkpoints, self.step)

    def _save_weights(self, out_dir: Path):
        """What the run trains, into ``out_dir``: the adapter tensors, or (full fine-tuning) the whole
        model as a HF GPT-2 directory, which every reader of base checkpoints loads."""
        if self.full:
            self.model.save_pretrained(out_dir)
        else:
            save_adapter(self.model, out_dir, extra={"step": self.step, "run_id": self.run_id})

    def load_checkpoint(self, ckpt_dir, state=None):
        """Restore adapter, optimiser, data position and log history from a checkpoint."""
        from safetensors.numpy import load_file
        ckpt_dir = Path(ckpt_dir)
        state = validate_checkpoint(ckpt_dir) if state is None else state
        if self.full:
            load_full_model(self.model, ckpt_dir / FULL_MODEL_DIR)
        else:
            load_adapter(self.model, ckpt_dir)
        self.optimizer.load_state_dict(load_file(str(ckpt_dir / OPTIM_FILE)))
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.best_valid = state.get("best_valid")
        self.history = [r for r in state.get("history", []) if r.get("step", 0) <= self.step]
        return state

    # -- the work_dir ---------------------------------------------------------------------
    def prepare_work_dir(self):
        """Decide, before writing anything, whether this run may use work_dir; then claim it.

        A new run needs a work_dir without another run's outputs (``--overwrite`` moves them aside
        or deletes them). ``--resume`` takes the newest checkpoint that reads back whole, and
        refuses one whose recorded settings differ from the flags (``--force`` accepts).
        """
        args, wd = self.args, self.work_dir
        current = fingerprint(args, self.world)
        run = read_run(wd)
        ckpt = None
        if args.resume:
            ckpt, state = self._pick_checkpoint()
            self.run_id = state.get("run_id") or (run or {}).get("run_id") or new_run_id()
            if run and run.get("run_id") and run["run_id"] != self.run_id:
                raise RunConflict(f"--resume {ckpt}: that checkpoint belongs to run {self.run_id}, but "
                                  f"{wd} holds run {run['run_id']}: resume in the checkpoint's own --work_dir")
            self._check_settings(ckpt, state, current)
        else:
            outputs = run_outputs(wd)
            if outputs and not args.overwrite:
                other = (run or {}).get("run_id", "from an older jt_lora")
                raise RunConflict(
                    f"--work_dir {wd} holds another run ({other}: {', '.join(outputs[:4])}"
                    f"{', ...' if len(outputs) > 4 else ''}); nothing was changed. Continue it with --resume, "
                    "move it aside with --overwrite (--overwrite delete removes it), or choose another --work_dir")
            self.run_id = new_run_id()
        _allreduce_sum(0.0)  # every rank has decided before rank 0 changes anything
        if self.is_main:
            with self._writing(wd):
                if not args.resume and run_outputs(wd):
                    self._say(set_aside(wd, args.overwrite))
                wd.mkdir(parents=True, exist_ok=True)
                if args.resume:
                    dropped = truncate_log(wd / "log.jsonl", int(state["step"]))
                    if dropped:
                        self._say(f"log.jsonl: dropped {dropped} entries past step {state['step']} (re-run now)")
                atomic_write_text(wd / RUN_FILE, json.dumps(
                    {"run_id": self.run_id, "config": current, "work_dir": str(wd.resolve())}, indent=2))
        if ckpt is not None:
            self.load_checkpoint(ckpt, state)
            self._say(f"resumed from {ckpt} at step {self.step}")

    def _pick_checkpoint(self):
        if self.args.resume != "latest":
            return Path(self.args.resume), validate_checkpoint(self.args.resume)
        ckpt, state = newest_valid_checkpoint(self.work_dir, self._say)
        if ckpt is None:
            why = "no complete checkpoint" if list_checkpoints(self.work_dir) else "no checkpoint"
            raise FileNotFoundError(f"--resume: {why} in {self.work_dir}; start a new run (with --overwrite if "
                                    "the directory holds outputs)")
        return ckpt, state

    def _check_settings(self, ckpt, state, current):
        recorded = state.get("config") or self._legacy_settings()
        if recorded is None:
            if not self.args.force:
                raise RunConflict(f"--resume {ckpt}: records no settings to check the flags against (an older "
                                  "jt_lora wrote it): pass --resume --force to continue it anyway")
            self._say(f"warning: --force: {ckpt} records no settings; continuing with the flags as given")
            return
        diffs = config_differences(recorded, current)
        if diffs and not self.args.force:
            raise RunConflict(f"--resume {ckpt}: the flags differ from the run's settings ({'; '.join(diffs)}): "
                              "pass the run's values, or --resume --force to continue with the new ones")
        if diffs:
            self._say(f"warning: --force: continuing {ckpt} with different settings: {'; '.join(diffs)}")

    def _legacy_settings(self):
        """The settings of a run written before checkpoints recorded them, from its train_config.json."""
        try:
            old = json.loads((self.work_dir / "train_config.json").read_text())
            return fingerprint(argparse.Namespace(**old["args"]), int(old.get("world_size", 1)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- outputs --------------------------------------------------------------------------
    def _log(self, record):
        self.history.append(record)
        if not self.is_main:
            return
        path = self.work_dir / "log.jsonl"
        with self._writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])

    def _plot(self):
        if not self.is_main or self.args.no_plot:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no loss-curve PNG (pip install matplotlib)", file=sys.stderr)
            return
        train = [(r["step"], r["loss"]) for r in self.history if r.get("kind") == "train"]
        valid = [(r["step"], r["valid_loss"]) for r in self.history if r.get("kind") == "valid"]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss (interval mean)")
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation loss")
        ax.set_xlabel("step (micro-batches)")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.args.adapter} fine-tuning ({self.args.model_card})")
        ax.grid(alpha=0.3)
        ax.legend()
        with self._writing(self.work_dir / "loss_curve.png"):
            try:
                with atomic_open(self.work_dir / "loss_curve.png", "wb") as f:
                    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
            finally:
                plt.close(fig)

    def _write_config(self):
        if not self.is_main:
            return
        args = dict(vars(self.args))
        card = matching_card(self.config)
        if card != args["model_card"]:  # the shape trained is the checkpoint's (or the shape flags')
            args["model_card_given"], args["model_card"] = args["model_card"], card
        resolved = {"args": args, "model_config": self.config.to_dict(),
                    "model_shape": {k: getattr(self.config, k) for k in _SHAPE_KEYS}, "run_id": self.run_id,
                    "world_size": self.world, "max_step": self.max_step, "base": self.base_note,
                    "train_examples": len(self.train_set), "train_truncated": self.train_set.num_truncated,
                    "jittor": jt.__version__}
        path = self.work_dir / "train_config.json"
        with self._writing(path):
            atomic_write_text(path, json.dumps(resolved, indent=2, default=str))

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        if self.run_id is None:
            self.prepare_work_dir()
        self._write_config()
        if self.is_main and not args.init_checkpoint:
            with self._writing(self.work_dir / "base"):
                self.model.save_pretrained(self.work_dir / "base")  # inference needs this random base
        self._say(self.base_note)
        self._say(self.train_set.summary())
        trainable = sum(int(p.numel()) for _, p in self.named_trainable)
        self._say(f"{self.config.adapter}: {trainable:,} trainable parameters; {self.max_step} steps; "
                  f"world size {self.world}")
        if args.wandb and self.is_main:
            self._init_wandb()
        from tqdm import tqdm
        bar = tqdm(total=self.max_step, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   desc="train")
        try:
            window_loss, window_tokens, window_start = [], 0, time.time()
            valid_loss = None
            while self.step < self.max_step:
                for batch in self.train_loader:
                    loss, lr = self.train_step(batch)
                    window_loss.append(loss)
                    window_tokens += int(_allreduce_sum(float(batch["length"].sum())))
                    bar.update(1)
                    if _due(self.step, args.log_interval) or self.step == self.max_step:
                        elapsed = time.time() - window_start
                        mean = float(np.mean(window_loss))
                        rec = {"kind": "train", "step": self.step, "epoch": self.train_loader.epoch, "loss": mean,
                               "ppl": math.exp(min(mean, 50)), "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                        self._log(rec)
                        bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{rec['ppl']:.2f}", lr=f"{lr:.2e}",
                                        tok_s=f"{rec['tokens_per_s']:.0f}")
                        window_loss, window_tokens, window_start = [], 0, time.time()
                    if self.valid_loader is not None and (_due(self.step, args.eval_interval) or self.step == self.max_step):
                        valid_loss = self.evaluate()
                        self.best_valid = valid_loss if self.best_valid is None else min(self.best_valid, valid_loss)
                        self._log({"kind": "valid", "step": self.step, "valid_loss": valid_loss,
                                   "valid_ppl": math.exp(min(valid_loss, 50))})
                        self._say(f"step {self.step}: valid loss {valid_loss:.4f} ppl {math.exp(min(valid_loss, 50)):.3f}")
                    if self.step % args.grad_acc == 0 and (_due(self.step, args.save_interval) or self.step == self.max_step):
                        self.save_checkpoint()
                    if self.step >= self.max_step:
                        break
                    if args.stop_after is not None and self.step >= args.stop_after:
                        self._say(f"stopping after {self.step} steps (--stop_after), as a kill would")
                        return {"step": self.step, "stopped": True}
        finally:
            bar.close()  # an error message then starts on a line of its own
        if self.is_main:
            self._check_finite_weights()
            final = self.work_dir / (FULL_MODEL_DIR if self.full else "adapter")
            tmp = self.work_dir / f".tmp-{final.name}"
            try:
                with self._writing(final):
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    self._save_weights(tmp)
                    replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._plot()
        train_points = [r["loss"] for r in self.history if r.get("kind") == "train"]
        summary = {"step": self.step, "final_train_loss": train_points[-1] if train_points else None,
                   "valid_loss": valid_loss, "best_valid_loss": self.best_valid,
                   ("model_dir" if self.full else "adapter_dir"):
                       str(self.work_dir / (FULL_MODEL_DIR if self.full else "adapter"))}
        self._say(json.dumps(summary))
        if self._wandb is not None:
            self._wandb.finish()
        return summary

    def _init_wandb(self):
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("--wandb needs the wandb package: pip install 'jt_lora[wandb]'") from e
        mode = None if os.environ.get("WANDB_API_KEY") else "offline"
        self._wandb = wandb.init(project=self.args.wandb_project, dir=str(self.work_dir), mode=mode,
                                 config={**vars(self.args), **self.config.to_dict()})

    def _say(self, msg):
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)


