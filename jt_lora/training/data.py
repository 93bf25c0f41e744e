"""Fine-tuning data: LoRA's ``FT_Dataset`` with dynamic padding, sharding and a resumable order.

Each encoded example (``{"context": ids, "completion": ids}``, see :mod:`jt_lora.tasks.e2e.data`) becomes,
exactly as in microsoft/LoRA's ``examples/NLG/src/data_utils.py``:

* ``input``  = (context + completion)[:seq_len]                      n = len(input) tokens
* ``target`` = (context + completion)[1:seq_len + 1]                 the next token at each position
* ``mask``   = 1 where the target is a completion token and inside the input, else 0; i.e.
  positions ``len(context) - 1 ... n - 2`` (the reference's ``_msk``)
* ``query``  = the context, cut from the left to ``seq_len - max_eval_len`` tokens (for generation)

The difference is padding: the reference pads every example to ``seq_len`` (512 for E2E, where the
longest example has ~125 tokens); here a batch is padded to its own longest example, with 0 as in the
reference (masked out of the loss). Batches are numpy arrays; the training code turns them into
Jittor variables.

Order: a permutation drawn from ``(seed, epoch)``, cut into global batches of
``batch_size * world_size`` examples; rank ``r`` takes the ``r``-th slice of each global batch, so
the ranks' micro-batches concatenated are the single-process batch. ``state_dict()`` holds epoch and
position, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..io.textio import iter_text_lines, parse_json_line

PAD_ID = 0  # the reference pads input/target with 0; padded positions have mask 0
Pair = Tuple[Sequence[int], Sequence[int]]


def _ids(value, path, line: int, key: str, vocab_size: Optional[int]) -> np.ndarray:
    ids = np.asarray(value) if isinstance(value, list) else None
    if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"{path}:{line}: {key!r} must be a list of integer token ids, got {str(value)[:60]}")
    if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
        raise ValueError(f"{path}:{line}: {key!r} has token ids outside [0, {vocab_size}): {ids.min()}..{ids.max()}")
    return ids.astype(np.int32)


def iter_jsonl_objects(path) -> Iterator[Tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming file, line (and column, for
    invalid JSON and non-UTF-8 bytes) otherwise."""
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        record = parse_json_line(path, line_no, line)
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


def read_encoded_jsonl(path, vocab_size: Optional[int] = None) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Read ``{"context": [ids], "completion": [ids]}`` lines (blank lines are ignored).

    Args:
        path: the encoded JSONL file.
        vocab_size: if given, every id must be below it.

    Raises:
        ValueError: naming file and line, for invalid JSON, a missing key, a non-list-of-ints value,
            an empty completion, or a file without examples.
    """
    examples = []
    for line_no, record in iter_jsonl_objects(path):
        for key in ("context", "completion"):
            if key not in record:
                raise ValueError(f"{path}:{line_no}: missing key {key!r} (has {sorted(record)})")
        context = _ids(record["context"], path, line_no, "context", vocab_size)
        completion = _ids(record["completion"], path, line_no, "completion", vocab_size)
        if completion.size == 0:
            raise ValueError(f"{path}:{line_no}: empty 'completion' (nothing to learn)")
        examples.append((context, completion))
    if not examples:
        raise ValueError(f"{path}: no examples (empty file?)")
    return examples


class FTDataset:
    """Encoded (context, completion) pairs turned into LoRA's training examples, unpadded.

    Args:
        source: an encoded JSONL path, or a sequence of (context ids, completion ids) pairs.
        seq_len: maximum length of ``input``; longer examples are truncated (see ``num_truncated``).
        max_eval_len: room kept for generation: ``query`` keeps the last ``seq_len - max_eval_len``
            context tokens (the reference's ``max_eval_length``).
        vocab_size: if given, ids read from a file must be below it.
    """

    def __init__(self, source: Union[str, Path, Sequence[Pair]], seq_len: int, max_eval_len: int = 0,
                 vocab_size: Optional[int] = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if not 0 <= max_eval_len < seq_len:
            raise ValueError(f"max_eval_len must be in [0, seq_len={seq_len}), got {max_eval_len}")
        if isinstance(source, (str, Path)):
            self.path: Optional[str] = str(source)
            self.examples = read_encoded_jsonl(source, vocab_size)
        else:
            self.path = None
            self.examples = [(np.asarray(c, dtype=np.int32), np.asarray(t, dtype=np.int32)) for c, t in source]
            if not self.examples:
                raise ValueError("FTDataset needs at least one example")
        self.seq_len, self.max_eval_len = seq_len, max_eval_len
        self.context_lens = np.array([len(c) for c, _ in self.examples], dtype=np.int64)
        self.full_lens = self.context_lens + np.array([len(t) for _, t in self.examples], dtype=np.int64)
        self.lengths = np.minimum(self.full_lens, seq_len)  # len(input) of each example
        # Examples cut at seq_len (the reference truncates them silently).
        self.num_truncated = int((self.full_lens > seq_len).sum())
        # Examples whose context fills the window: no completion token to learn from (loss 0).
        self.num_without_target = int((self.context_lens >= seq_len).sum())

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        """Example ``i`` as unpadded arrays: input, target, mask (all length n), query; and id."""
        context, completion = self.examples[i]
        tokens = np.concatenate([context, completion])
        n = min(len(tokens), self.seq_len)
        target = np.full(n, PAD_ID, dtype=np.int32)
        nxt = tokens[1 : n + 1]  # n tokens when truncated (the reference keeps tokens[n]), else n - 1
        target[: len(nxt)] = nxt
        mask = np.zeros(n, dtype=np.float32)
        # Position p predicts tokens[p + 1]: a completion token iff p + 1 >= len(context); and it
        # must lie inside the input (p + 1 <= n - 1), as in the reference's _msk.
        mask[max(len(context) - 1, 0) : n - 1] = 1.0
        keep = self.seq_len - self.max_eval_len
        query = context[-keep:] if len(context) > keep else context
        return {"input": tokens[:n], "target": target, "mask": mask, "query": query, "id": i}

    def summary(self) -> str:
        """One line for logs: size, lengths, truncation."""
        name = self.path or "in-memory data"
        return (
            f"{name}: {len(self)} examples, length mean {self.full_lens.mean():.1f} max {self.full_lens.max()}; "
            f"{self.num_truncated} truncated to seq_len {self.seq_len}"
            + (f", {self.num_without_target} with no completion token inside seq_len" if self.num_without_target else "")
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(items: Sequence[Dict[str, np.ndarray]], pad_to_multiple_of: int = 1) -> Dict[str, np.ndarray]:
    """Pad examples to the longest in this batch (rounded up to ``pad_to_multiple_of``).

    Returns:
        ``input``, ``target`` (B, T) int32; ``mask`` (B, T) float32; ``query`` (B, Q) int32
        right-padded with 0; ``query_len``, ``length`` (B,) int32 (real lengths); ``id`` (B,) int64.
        An empty ``items`` gives arrays with 0 rows (a rank's share of a tiny last batch).
    """
    b = len(items)
    t = _round_up(max((len(x["input"]) for x in items), default=0), pad_to_multiple_of)
    q = _round_up(max((len(x["query"]) for x in items), default=0), pad_to_multiple_of)
    batch = {
        "input": np.full((b, t), PAD_ID, dtype=np.int32),
        "target": np.full((b, t), PAD_ID, dtype=np.int32),
        "mask": np.zeros((b, t), dtype=np.float32),
        "query": np.full((b, q), PAD_ID, dtype=np.int32),
        "query_len": np.zeros(b, dtype=np.int32),
        "length": np.zeros(b, dtype=np.int32),
        "id": np.zeros(b, dtype=np.int64),
    }
    for row, x in enumerate(items):
        n, m = len(x["input"]), len(x["query"])
        batch["input"][row, :n] = x["input"]
        batch["target"][row, :n] = x["target"]
        batch["mask"][row, :n] = x["mask"]
        batch["query"][row, :m] = x["query"]
        batch["query_len"][row], batch["length"][row], batch["id"][row] = m, n, x["id"]
    return batch


class FTDataLoader:
    """Batches of an :class:`FTDataset`: deterministic order, data-parallel shards, resumable.

    Iterating yields the rest of the current epoch (``epoch``, from batch ``position``) and then
    moves to the next epoch, so ``while loader.epoch < max_epoch: for batch in loader: ...`` works
    and resumes mid-epoch after ``load_state_dict``.

    Args:
        dataset: the examples.
        batch_size: examples per rank per step (the global batch is ``batch_size * world_size``).
        shuffle: draw a new permutation per epoch from ``(seed, epoch)``; else file order.
        seed: the shuffling seed.
        drop_last: drop the last global batch when it is partial (training); keep it for eval. A kept
            partial batch is split as evenly as possible, so a rank can get fewer rows, or none.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        pad_to_multiple_of: round the padded length up (fewer distinct shapes for a JIT to compile).
    """

    def __init__(self, dataset: FTDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, pad_to_multiple_of: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or pad_to_multiple_of < 1:
            raise ValueError(f"bad loader settings: batch_size={batch_size} rank={rank} world_size={world_size} "
                             f"pad_to_multiple_of={pad_to_multiple_of}")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.pad_to_multiple_of = rank, world_size, pad_to_multiple_of
        self.global_batch_size = batch_size * world_size
        n = len(dataset)
        self.num_batches = n // self.global_batch_size if drop_last else -(-n // self.global_batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{n} examples make no full global batch of {self.global_batch_size} with drop_last")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.num_batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: a function of (seed, epoch) only."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def global_batch_ids(self, epoch: int, index: int) -> np.ndarray:
        """Example ids of global batch ``index`` of ``epoch`` (all ranks together)."""
        g = self.global_batch_size
        return self.epoch_order(epoch)[index * g : (index + 1) * g]

    def shard_ids(self, global_ids: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch (equal slices when the batch is full)."""
        return np.array_split(global_ids, self.world_size)[self.rank]

    def make_batch(self, ids: Sequence[int]) -> Dict[str, np.ndarray]:
        return collate([self.dataset[int(i)] for i in ids], self.pad_to_multiple_of)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        epoch, order, g = self.epoch, self.epoch_order(self.epoch), self.global_batch_size
        while self.position < self.num_batches:
            index = self.position
            self.position += 1  # counted as consumed once handed out: a checkpoint taken while
            # the caller trains on this batch resumes with the next one
            yield self.make_batch(self.shard_ids(order[index * g : (index + 1) * g]))
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        """Where the data order stands; an epoch whose batches were all handed out counts as done."""
        epoch, position = self.epoch, self.position
        if position >= self.num_batches:
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
            "num_examples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; the order must be the same (world_size may differ).

        Raises:
            ValueError: the state comes from a different dataset size, global batch, seed or mode.
        """
        mine = self.state_dict()
        for key in ("seed", "shuffle", "drop_last", "num_examples", "global_batch_size"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"data loader state has {key}={state[key]}, this loader has {mine[key]}: "
                                 "the remaining batches would differ")
        if not 0 <= int(state["position"]) <= self.num_batches:
            raise ValueError(f"data loader state position {state['position']} is outside 0..{self.num_batches}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def token_counts(dataset: FTDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False, pad_to_multiple_of: int = 1) -> Dict[str, float]:
    """Tokens processed per epoch with dynamic padding vs the reference's padding to seq_len.

    The reference (``FT_Dataset``) pads every example to ``seq_len`` and fills the last batch with
    random examples, i.e. ``ceil(n / batch_size) * batch_size * seq_len`` positions per epoch.

    Returns:
        ``examples``, ``batches``, ``real_tokens`` (sum of input lengths), ``loss_tokens`` (mask sum),
        ``dynamic_tokens`` and ``fixed_tokens`` (padded positions), ``dynamic_over_fixed``, and the
        padding share of each.
    """
    loader = FTDataLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                          pad_to_multiple_of=pad_to_multiple_of)
    order, lengths = loader.epoch_order(epoch), dataset.lengths
    dynamic = real = 0
    for b in range(loader.num_batches):
        ids = order[b * batch_size : (b + 1) * batch_size]
        dynamic += len(ids) * _round_up(int(lengths[ids].max()), pad_to_multiple_of)
        real += int(lengths[ids].sum())
    ref_batches = len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)
    fixed = ref_batches * batch_size * dataset.seq_len
    used = order[: loader.num_batches * batch_size]
    loss = int(np.maximum(0, lengths[used] - np.maximum(dataset.context_lens[used] - 1, 0) - 1).sum())
    return {
        "examples": len(dataset),
        "batches": loader.num_batches,
        "seq_len": dataset.seq_len,
        "batch_size": batch_size,
        "real_tokens": real,
        "loss_tokens": loss,
        "dynamic_tokens": dynamic,
        "fixed_tokens": fixed,
        "dynamic_over_fixed": dynamic / fixed,
        "padding_share_dynamic": 1 - real / dynamic,
        "padding_share_fixed": 1 - real / fixed,
        "truncated": dataset.num_truncated,
    }


def main(argv=None) -> int:
    """``python -m jt_lora.data FILE --seq_len 512 --batch_size 8``: token counts as JSON."""
    from ..cli import DefaultsHelpFormatter, positive_int, run_cli
    p = argparse.ArgumentParser(prog="python -m jt_lora.data", formatter_class=DefaultsHelpFormatter,
                                description="Tokens per epoch: dynamic padding vs padding to seq_len.")
    p.add_argument("path", help="encoded JSONL ({'context': ids, 'completion': ids})")
    p.add_argument("--seq_len", type=int, default=512, help="the trainer's --seq_len")
    p.add_argument("--batch_size", type=int, default=8, help="examples per batch")
    p.add_argument("--shuffle", action="store_true", help="count the shuffled order of --seed's epoch 0")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--drop_last", action="store_true", help="drop the last incomplete batch")
    p.add_argument("--pad_to_multiple_of", type=int, default=1, help="round padded lengths up to a multiple")
    args = p.parse_args(argv)

    def body():
        positive_int("--batch_size", args.batch_size)
        positive_int("--seq_len", args.seq_len, 2)
        positive_int("--pad_to_multiple_of", args.pad_to_multiple_of)
        dataset = FTDataset(args.path, args.seq_len)
        print(dataset.summary(), file=sys.stderr)
        counts = token_counts(dataset, args.batch_size, shuffle=args.shuffle, seed=args.seed,
                              drop_last=args.drop_last, pad_to_multiple_of=args.pad_to_multiple_of)
        print(json.dumps(counts))
        return 0
    return run_cli(body, "jt_lora.data")


if __name__ == "__main__":
    sys.exit(main())
