"""``python -m jt_lora.train``: fine-tune GPT-2 with LoRA, InA, (IA)³ or all weights (full fine-tuning).

The command: its flags (microsoft/LoRA's ``gpt2_ft.py`` flags plus jt_lora's), every check made
before anything is read or written (each error names the flag), and the exit codes. The loop itself
is ``jt_lora.training.trainer.Trainer``.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

from .models.gpt2 import MODEL_CARDS
from .training.optim import SCHEDULERS
from .training.trainer import (INA_DEFAULT_INHIBITION, Trainer, _model_config,  # noqa: F401  (documented)
                               masked_loss_sum)
from .training.workdir import OutputError, check_output_location

__all__ = ["build_parser", "validate_args", "check_inputs", "main", "masked_loss_sum", "UsageError"]


class UsageError(ValueError):
    """A flag value that cannot work; the message names the flag."""


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once: appended to its help unless the help already states it, and
    never as "(default: None)" (a None default is described in the help itself)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text):  # identity: a default of 0 is shown, False (a switch) is not
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jt_lora.train", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter,
        epilog="Exit status: 0 done, 1 an output could not be written, 2 a bad flag, file or work_dir, "
               "3 non-finite loss or weights (the last good checkpoint is kept).")
    a = p.add_argument
    a("--train_data", required=True, help="encoded JSONL ({'context': ids, 'completion': ids}); required")
    a("--valid_data", default=None, help="encoded JSONL for validation loss/perplexity (default: no validation)")
    a("--init_checkpoint", default=None, help="base GPT-2 weights (HF dir/.bin/.safetensors or a microsoft/LoRA "
                                              "checkpoint); its shape is used (default: random init, demo only)")
    a("--model_card", default="gpt2.md", choices=sorted(MODEL_CARDS),
      help="model shape for a random init; with --init_checkpoint the checkpoint's shape wins (warned)")
    a("--n_layer", type=int, default=None, help="random init only: the depth (default: the card's)")
    a("--n_embd", type=int, default=None, help="random init only: the width (default: the card's)")
    a("--n_head", type=int, default=None,
      help="attention heads: overrides the card, or gives a checkpoint of non-standard width its head "
           "count (default: the card's, or the standard count for the checkpoint's width)")
    a("--vocab_size", type=int, default=None, help="random init only: the vocabulary size, for tests (default: 50257)")
    a("--train_batch_size", type=int, default=8, help="examples per process per micro-batch")
    a("--valid_batch_size", type=int, default=4, help="examples per process per validation batch")
    a("--grad_acc", type=int, default=1, help="micro-batches per optimiser update")
    a("--seq_len", type=int, default=512, help="longest example; longer ones are truncated")
    a("--lr", type=float, default=2e-4, help="peak learning rate")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay, applied after the Adam step")
    a("--correct_bias", action=argparse.BooleanOptionalAction, default=False,
      help="Adam bias correction (default: off, as the reference; the paper's recipe turns it on)")
    a("--adam_epislon", "--adam_epsilon", dest="adam_epsilon", type=float, default=1e-6, help="Adam epsilon")
    a("--adam_beta1", type=float, default=0.9, help="Adam beta1")
    a("--adam_beta2", type=float, default=0.98, help="Adam beta2")
    a("--scheduler", default="linear", choices=SCHEDULERS, help="learning-rate schedule")
    a("--warmup_step", type=int, default=0, help="micro-batches of linear warm-up")
    a("--max_epoch", type=int, default=5, help="epochs to train when --max_step is not given")
    a("--max_step", type=int, default=None,
      help="stop after this many micro-batches, >= 1 (default: no step limit, --max_epoch epochs)")
    a("--clip", type=float, default=0.0, help="gradient-norm clip (0 = off)")
    a("--label_smooth", type=float, default=0.0, help="label smoothing in [0, 1)")
    a("--adapter", default="lora", choices=["lora", "ina", "ia3", "full"],
      help="what to train: a LoRA, InA or (IA)3 adapter, or full = every weight of GPT-2 (full fine-tuning)")
    a("--lora_dim", type=int, default=4, help="LoRA/InA rank r")
    a("--lora_alpha", type=float, default=32, help="LoRA/InA alpha (scaling = alpha / r)")
    a("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA/InA input, in [0, 1)")
    a("--lora_inhibition", type=float, default=None,
      help=f"InA inhibition level in (0, 1); only with --adapter ina (default: {INA_DEFAULT_INHIBITION} "
           "with --adapter ina)")
    a("--ia3_parts", default=None, choices=["qkv", "kv"],
      help="(IA)3 on c_attn's output: qkv = q, k and v (PEFT's GPT-2 targets, which the InA code uses), "
           "kv = k and v only (the (IA)3 paper); only with --adapter ia3 (default: qkv with --adapter ia3)")
    a("--log_interval", type=int, default=100, help="log the training loss every N micro-batches (0 = only at the end)")
    a("--eval_interval", type=int, default=2000, help="validate every N micro-batches (0 = only at the end)")
    a("--save_interval", type=int, default=1000, help="checkpoint every N micro-batches (0 = only at the end)")
    a("--keep_checkpoints", type=int, default=2,
      help="how many of this run's periodic checkpoints to keep (0 = all)")
    a("--work_dir", default="trained_models/run", help="this run's directory (one run per directory)")
    a("--random_seed", type=int, default=110, help="seed of the adapter init, data order and dropout")
    a("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR",
      help="continue this work_dir's run from its newest valid checkpoint (or from the given checkpoint "
           "dir); the flags must match the checkpoint's settings (default: start a new run)")
    a("--force", action="store_true", help="with --resume: continue although settings differ from the checkpoint's")
    a("--overwrite", nargs="?", const="move", default=None, choices=("move", "delete"),
      help="start a new run in a work_dir that holds another run: --overwrite (or --overwrite move) "
           "moves the old run aside to <work_dir>.replaced-<time>, --overwrite delete removes it "
           "(default: refuse)")
    a("--pad_to_multiple_of", type=int, default=8, help="round padded lengths (fewer shapes to compile)")
    a("--precision", default="fp32", metavar="{fp32,bf16}",
      help="bf16: the frozen base's products (dense layers and the LM head) in bfloat16 with fp32 "
           "accumulation, on CPUs with AMX; weights, adapters, optimiser and loss stay fp32 (opt-in)")
    a("--wandb", action="store_true", help="log to Weights & Biases (offline mode without WANDB_API_KEY)")
    a("--wandb_project", default="jt_lora", help="Weights & Biases project")
    a("--no_plot", action="store_true", help="skip the loss-curve PNG")
    a("--dry_run", action="store_true", help="check the flags, print the resolved settings as JSON and exit")
    a("--stop_after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop like a kill after N steps
    return p


def _need(ok: bool, message: str):
    if not ok:
        raise UsageError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_input_file(flag: str, path, allow_dir: bool = False):
    if path is None:
        return
    p = Path(path)
    _need(p.exists(), f"{flag} {path}: no such file")
    _need(allow_dir or p.is_file(), f"{flag} {path}: not a regular file")
    _need(os.access(p, os.R_OK), f"{flag} {path}: not readable (check its permissions)")


def check_inputs(args) -> None:
    """The input files exist and are readable (their contents are checked when read)."""
    _check_input_file("--train_data", args.train_data)
    _check_input_file("--valid_data", args.valid_data)
    _check_input_file("--init_checkpoint", args.init_checkpoint, allow_dir=True)
    if args.resume and args.resume != "latest":
        _need(Path(args.resume).is_dir(), f"--resume {args.resume}: no such checkpoint directory")


def validate_args(args, inputs: bool = True) -> None:
    """Check every flag before anything is read or written; UsageError naming the flag otherwise.

    Resolves ``--lora_inhibition``'s default for InA (it is None elsewhere, so a value given for
    another adapter is an error, not silently ignored). ``inputs=False`` leaves out the input-file
    checks (``--dry_run`` reports those as warnings).
    """
    if args.init_checkpoint == "":   # finetune.sh's CKPT="" (and the BoolQ wrappers' CKPT=none) ask for a random init
        args.init_checkpoint = None
    _need(_finite(args.lr) and args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _need(args.grad_acc >= 1, f"--grad_acc must be >= 1, got {args.grad_acc}")
    for flag in ("log_interval", "eval_interval", "save_interval", "keep_checkpoints", "warmup_step"):
        value = getattr(args, flag)
        _need(value >= 0, f"--{flag} must be >= 0 (0 = " + ("all" if flag == "keep_checkpoints" else
              "none" if flag == "warmup_step" else "only at the end") + f"), got {value}")
    for flag in ("train_batch_size", "valid_batch_size", "max_epoch", "pad_to_multiple_of"):
        _need(getattr(args, flag) >= 1, f"--{flag} must be >= 1, got {getattr(args, flag)}")
    _need(args.max_step is None or args.max_step >= 1,
          f"--max_step must be >= 1, got {args.max_step} (omit it to train --max_epoch epochs)")
    _need(args.seq_len >= 2, f"--seq_len must be >= 2, got {args.seq_len}")
    _need(_finite(args.lora_dropout) and 0 <= args.lora_dropout < 1,
          f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    _need(_finite(args.label_smooth) and 0 <= args.label_smooth < 1,
          f"--label_smooth must be in [0, 1), got {args.label_smooth}")
    _need(_finite(args.clip) and args.clip >= 0, f"--clip must be >= 0 (0 = off), got {args.clip}")
    _need(_finite(args.weight_decay) and args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    for flag in ("adam_beta1", "adam_beta2"):
        _need(_finite(getattr(args, flag)) and 0 <= getattr(args, flag) < 1,
              f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    _need(_finite(args.adam_epsilon) and args.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {args.adam_epsilon}")
    if args.adapter in ("lora", "ina"):
        _need(args.lora_dim >= 1, f"--lora_dim must be >= 1 with --adapter {args.adapter}, got {args.lora_dim}")
        _need(_finite(args.lora_alpha) and args.lora_alpha > 0, f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.adapter == "ina":
        if args.lora_inhibition is None:
            args.lora_inhibition = INA_DEFAULT_INHIBITION
        _need(_finite(args.lora_inhibition) and 0 < args.lora_inhibition < 1,
              f"--adapter ina needs --lora_inhibition > 0 (0 is plain LoRA) and < 1, got {args.lora_inhibition}")
    else:
        _need(args.lora_inhibition is None,
              f"--lora_inhibition only applies to --adapter ina, not --adapter {args.adapter}: drop it")
    if args.adapter == "ia3":
        args.ia3_parts = args.ia3_parts or "qkv"
    else:
        _need(getattr(args, "ia3_parts", None) is None,
              f"--ia3_parts only applies to --adapter ia3, not --adapter {args.adapter}: drop it")
    for flag in ("n_layer", "n_embd", "n_head", "vocab_size"):
        value = getattr(args, flag)
        _need(value is None or value >= 1, f"--{flag} must be >= 1, got {value}")
        if flag != "n_head" and value is not None:
            _need(args.init_checkpoint is None,
                  f"--{flag} only applies to a random init: with --init_checkpoint the checkpoint's shape is used")
    _need(args.stop_after is None or args.stop_after >= 1, "--stop_after must be >= 1")
    _need(not (args.force and not args.resume), "--force only applies with --resume")
    _need(not (args.overwrite and args.resume),
          "--overwrite starts a new run and --resume continues one: give one of them")
    _check_precision(args)
    if inputs:
        check_inputs(args)
    problem = check_output_location(args.work_dir)
    _need(problem is None, problem or "")
    if args.init_checkpoint is None and args.n_embd is not None and args.n_head is None:
        n_head = MODEL_CARDS[args.model_card]["n_head"]
        _need(args.n_embd % n_head == 0,
              f"--n_embd {args.n_embd} is not divisible by --model_card {args.model_card}'s {n_head} heads: pass --n_head")


def _check_precision(args) -> None:
    """``--precision``: fp32 (the default) or bf16, which must be able to run here (CPU with AMX)."""
    from .nn import bf16
    precision = getattr(args, "precision", "fp32")
    _need(precision in bf16.PRECISIONS, f"--precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16":
        _need(args.adapter != "full", "--precision bf16 computes the frozen base in bf16, but --adapter full "
                                      "trains every weight: use --precision fp32")
        try:
            bf16.enable()
        except bf16.Bf16Unavailable as e:
            raise UsageError(f"--precision bf16: {e}") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args, inputs=not args.dry_run)
        if args.dry_run:
            try:
                check_inputs(args)
            except UsageError as e:
                print(f"warning: {e}", file=sys.stderr)
            print(json.dumps({"args": vars(args), "model_config": _model_config(args).to_dict()}, default=str))
            return 0
        trainer = Trainer(args)
        trainer.prepare_work_dir()
        trainer.run()
    except FloatingPointError as e:
        return _fail(e, 3)
    except OutputError as e:
        return _fail(e, 1)
    except (ValueError, FileNotFoundError) as e:  # UsageError, RunConflict, CheckpointError, data errors
        return _fail(e, 2)
    except OSError as e:  # reading an input failed after the checks (e.g. it vanished)
        return _fail(f"{e.filename or ''}: {e.strerror or e}", 2)
    return 0


def _fail(error, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
