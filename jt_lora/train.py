"""Fine-tune GPT-2 with LoRA / InA / (IA)³: ``python -m jt_lora.train`` (wrapped by finetune.sh).

Flags and numerics follow microsoft/LoRA's ``gpt2_ft.py``: the reference AdamW,
schedules stepped per micro-batch, loss scaled by ``1/grad_acc``, gradient
clipping over the accumulated gradient, label smoothing, loss only on
completion tokens. What differs is what a long CPU/GPU job needs: dynamic
padding, adapter-only checkpoints written atomically with the optimiser,
schedule, data-order and RNG state (``--resume`` ends with the same weights as
an uninterrupted run), a NaN guard that keeps the last good checkpoint, a
progress bar, a JSONL log, a loss-curve PNG, and data parallelism over MPI
(``mpirun -np N python -m jt_lora.train ...``; only rank 0 writes).
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

from .backend import jt
from .data import FTDataLoader, FTDataset
from .model import MODEL_CARDS, GPT2Config, GPT2LMModel, token_losses
from .optim import SCHEDULERS, AdamW, clip_grad_norm, lr_lambda
from .saving import atomic_write_text, load_adapter, save_adapter, save_safetensors

__all__ = ["build_parser", "main", "Trainer", "latest_checkpoint"]

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jt_lora.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--train_data", required=True, help="encoded JSONL ({'context': ids, 'completion': ids})")
    a("--valid_data", default=None, help="encoded JSONL for validation loss/perplexity")
    a("--init_checkpoint", default=None, help="base GPT-2 weights (HF dir/.bin/.safetensors or a microsoft/LoRA "
                                              "checkpoint); omitted = random init (demo only)")
    a("--model_card", default="gpt2.md", choices=sorted(MODEL_CARDS))
    a("--n_layer", type=int, default=None, help="random init only: override the card's depth")
    a("--n_embd", type=int, default=None, help="random init only: override the card's width")
    a("--n_head", type=int, default=None, help="random init only: override the card's head count")
    a("--vocab_size", type=int, default=None, help="random init only: override the vocabulary size (tests)")
    a("--train_batch_size", type=int, default=8, help="examples per process per micro-batch")
    a("--valid_batch_size", type=int, default=4)
    a("--grad_acc", type=int, default=1, help="micro-batches per optimiser update")
    a("--seq_len", type=int, default=512)
    a("--lr", type=float, default=2e-4)
    a("--weight_decay", type=float, default=0.01)
    a("--correct_bias", action=argparse.BooleanOptionalAction, default=False,
      help="Adam bias correction (the paper's recipe sets it)")
    a("--adam_epislon", "--adam_epsilon", dest="adam_epsilon", type=float, default=1e-6)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.98)
    a("--scheduler", default="linear", choices=SCHEDULERS)
    a("--warmup_step", type=int, default=0)
    a("--max_epoch", type=int, default=5)
    a("--max_step", type=int, default=None, help="stop after this many micro-batches (default: max_epoch epochs)")
    a("--clip", type=float, default=0.0, help="gradient-norm clip (0 = off)")
    a("--label_smooth", type=float, default=0.0)
    a("--adapter", default="lora", choices=["lora", "ina", "ia3"])
    a("--lora_dim", type=int, default=4)
    a("--lora_alpha", type=float, default=32)
    a("--lora_dropout", type=float, default=0.1)
    a("--lora_inhibition", type=float, default=0.3, help="InA inhibition level (with --adapter ina)")
    a("--log_interval", type=int, default=100)
    a("--eval_interval", type=int, default=2000)
    a("--save_interval", type=int, default=1000)
    a("--keep_checkpoints", type=int, default=2, help="how many periodic checkpoints to keep")
    a("--work_dir", default="trained_models/run")
    a("--random_seed", type=int, default=110)
    a("--resume", nargs="?", const="latest", default=None,
      help="continue from the latest checkpoint in work_dir (or from the given checkpoint dir)")
    a("--pad_to_multiple_of", type=int, default=8, help="round padded lengths (fewer shapes to compile)")
    a("--wandb", action="store_true", help="log to Weights & Biases (offline mode without WANDB_API_KEY)")
    a("--wandb_project", default="jt_lora")
    a("--no_plot", action="store_true", help="skip the loss-curve PNG")
    a("--dry_run", action="store_true", help="print the resolved settings as JSON and exit")
    a("--stop_after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop like a kill after N steps
    return p


def _model_config(args) -> GPT2Config:
    adapter = dict(adapter=args.adapter, lora_attn_dim=args.lora_dim, lora_attn_alpha=args.lora_alpha,
                   lora_dropout=args.lora_dropout,
                   lora_inhibition=args.lora_inhibition if args.adapter == "ina" else 0.0)
    if args.adapter == "ina" and args.lora_inhibition <= 0:
        raise ValueError("--adapter ina needs --lora_inhibition > 0 (0 is plain LoRA)")
    arch = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size") if getattr(args, k) is not None}
    if arch and args.init_checkpoint:
        raise ValueError("--n_layer/--n_embd/--n_head/--vocab_size only apply to a random init, not --init_checkpoint")
    return GPT2Config.from_card(args.model_card, **arch, **adapter)


def latest_checkpoint(work_dir):
    """The newest complete checkpoint directory in work_dir, or None."""
    found = []
    for d in Path(work_dir).glob("checkpoint-*"):
        if (d / STATE_FILE).exists() and d.name.split("-")[-1].isdigit():
            found.append((int(d.name.split("-")[-1]), d))
    return max(found)[1] if found else None


def _replace_dir(tmp: Path, final: Path):
    """Move a fully written directory into place; the old one (if any) goes only after."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


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
    logits = model.logits(h)  # [N, V]
    targets = jt.array(batch["target"].reshape(-1)[where])
    per_token = token_losses(logits, targets, label_smooth)
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


class Trainer:
    """The training loop; one instance per process."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
        self.is_main = self.rank == 0
        self.work_dir = Path(args.work_dir)
        np.random.seed(args.random_seed)  # same adapter init on every rank
        jt.set_seed(args.random_seed)
        config = _model_config(args)
        if args.init_checkpoint:
            self.model = GPT2LMModel.from_pretrained(args.init_checkpoint, **{
                k: v for k, v in config.to_dict().items() if k.startswith(("adapter", "lora_", "ia3_"))})
            self.base_note = f"base weights from {args.init_checkpoint}"
        else:
            self.model = GPT2LMModel(config)
            self.base_note = "RANDOM INIT base model (no --init_checkpoint): a pipeline demo, not a real fine-tune"
        self.config = self.model.config
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

    def save_checkpoint(self):
        if not self.is_main:
            return
        self._check_finite_weights()
        final = self.work_dir / f"checkpoint-{self.step}"
        tmp = self.work_dir / f".tmp-checkpoint-{self.step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapter(self.model, tmp, extra={"step": self.step})
        save_safetensors(tmp / OPTIM_FILE, self.optimizer.state_dict())
        state = {"step": self.step, "max_step": self.max_step, "loader": self.train_loader.state_dict(),
                 "best_valid": self.best_valid, "history": self.history, "world_size": self.world}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state))
        _replace_dir(tmp, final)
        ckpts = sorted((int(d.name.split("-")[-1]), d) for d in self.work_dir.glob("checkpoint-*")
                       if d.name.split("-")[-1].isdigit())
        for _, d in ckpts[:-self.args.keep_checkpoints] if self.args.keep_checkpoints > 0 else []:
            shutil.rmtree(d, ignore_errors=True)

    def load_checkpoint(self, ckpt_dir):
        from safetensors.numpy import load_file
        ckpt_dir = Path(ckpt_dir)
        state_path = ckpt_dir / STATE_FILE
        if not state_path.exists():
            raise FileNotFoundError(f"{ckpt_dir}: not a jt_lora checkpoint (no {STATE_FILE})")
        state = json.loads(state_path.read_text())
        load_adapter(self.model, ckpt_dir)
        self.optimizer.load_state_dict(load_file(str(ckpt_dir / OPTIM_FILE)))
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.best_valid = state.get("best_valid")
        self.history = state.get("history", [])
        return state

    # -- outputs --------------------------------------------------------------------------
    def _log(self, record):
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.work_dir / "log.jsonl", "a") as f:
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
        ax.set_title(f"{self.config.adapter} fine-tuning ({self.args.model_card})")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.work_dir / ".loss_curve.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, self.work_dir / "loss_curve.png")

    def _write_config(self):
        if not self.is_main:
            return
        resolved = {"args": vars(self.args), "model_config": self.config.to_dict(), "world_size": self.world,
                    "max_step": self.max_step, "base": self.base_note, "train_examples": len(self.train_set),
                    "train_truncated": self.train_set.num_truncated, "jittor": jt.__version__}
        atomic_write_text(self.work_dir / "train_config.json", json.dumps(resolved, indent=2, default=str))

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:
            ckpt = latest_checkpoint(self.work_dir) if args.resume == "latest" else Path(args.resume)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.work_dir}")
            self.load_checkpoint(ckpt)
            self._say(f"resumed from {ckpt} at step {self.step}")
        elif self.is_main and (self.work_dir / "log.jsonl").exists():
            (self.work_dir / "log.jsonl").unlink()  # a fresh run starts a fresh log
        self._write_config()
        if self.is_main and not args.init_checkpoint:
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
        window_loss, window_tokens, window_start = [], 0, time.time()
        valid_loss = None
        while self.step < self.max_step:
            for batch in self.train_loader:
                loss, lr = self.train_step(batch)
                window_loss.append(loss)
                window_tokens += int(_allreduce_sum(float(batch["length"].sum())))
                bar.update(1)
                if self.step % args.log_interval == 0 or self.step == self.max_step:
                    elapsed = time.time() - window_start
                    mean = float(np.mean(window_loss))
                    rec = {"kind": "train", "step": self.step, "epoch": self.train_loader.epoch, "loss": mean,
                           "ppl": math.exp(min(mean, 50)), "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    self._log(rec)
                    bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{rec['ppl']:.2f}", lr=f"{lr:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                    window_loss, window_tokens, window_start = [], 0, time.time()
                if self.valid_loader is not None and (self.step % args.eval_interval == 0 or self.step == self.max_step):
                    valid_loss = self.evaluate()
                    self.best_valid = valid_loss if self.best_valid is None else min(self.best_valid, valid_loss)
                    self._log({"kind": "valid", "step": self.step, "valid_loss": valid_loss,
                               "valid_ppl": math.exp(min(valid_loss, 50))})
                    self._say(f"step {self.step}: valid loss {valid_loss:.4f} ppl {math.exp(min(valid_loss, 50)):.3f}")
                if self.step % args.grad_acc == 0 and (self.step % args.save_interval == 0 or self.step == self.max_step):
                    self.save_checkpoint()
                if self.step >= self.max_step:
                    break
                if args.stop_after is not None and self.step >= args.stop_after:
                    self._say(f"stopping after {self.step} steps (--stop_after), as a kill would")
                    return {"step": self.step, "stopped": True}
        bar.close()
        if self.is_main:
            self._check_finite_weights()
            save_adapter(self.model, self.work_dir / "adapter", extra={"step": self.step})
            self._plot()
        train_points = [r["loss"] for r in self.history if r.get("kind") == "train"]
        summary = {"step": self.step, "final_train_loss": train_points[-1] if train_points else None,
                   "valid_loss": valid_loss, "best_valid_loss": self.best_valid,
                   "adapter_dir": str(self.work_dir / "adapter")}
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        print(json.dumps({"args": vars(args), "model_config": _model_config(args).to_dict()}, default=str))
        return 0
    try:
        trainer = Trainer(args)
        trainer.run()
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
