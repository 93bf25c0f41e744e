"""PyTorch reference for full fine-tuning, written from microsoft/LoRA's definitions (run in a
subprocess: torch and Jittor must not share a process).

Usage: ``python full_ft_ref.py BASE_DIR DATA.jsonl OUT.npz STEPS LR WD LABEL_SMOOTH [ADAM_EPS]``. Loads the base
with transformers, builds the batch as LoRA's FT_Dataset does (input = context + completion,
target = input shifted by one, mask on the completion predictions), and takes STEPS steps of the
reference AdamW (bias correction on, weight decay after the Adam step) on the loss
``sum(loss * mask) / (sum(mask) + 1e-4)`` with label smoothing ``(1-e) nll + e mean_v(-log p_v)``.
"""
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers


def batch(path):
    rows = [json.loads(line) for line in open(path)]
    n = max(len(r["context"]) + len(r["completion"]) for r in rows)
    inp, tgt, msk = (np.zeros((len(rows), n), np.int64) for _ in range(3))
    for i, r in enumerate(rows):
        tokens = r["context"] + r["completion"]
        inp[i, :len(tokens)] = tokens
        tgt[i, :len(tokens) - 1] = tokens[1:]
        msk[i, len(r["context"]) - 1:len(tokens) - 1] = 1
    return torch.tensor(inp), torch.tensor(tgt), torch.tensor(msk, dtype=torch.float32)


def main(base, data, out, steps, lr, wd, smooth, eps=1e-6, beta1=0.9, beta2=0.999):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(base).train()
    inp, tgt, msk = batch(data)
    params = list(model.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(1, steps + 1):
        logits = model(inp).logits
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        loss = (1 - smooth) * nll + smooth * (-logp.mean(-1)) if smooth > 0.0001 else nll
        loss = (loss * msk).sum() / (msk.sum() + 0.0001)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p, (m, v) in zip(params, state):
                g = p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-size)
                p.add_(p, alpha=-lr * wd)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith(".attn.bias")
          and not k.endswith("masked_bias") and k != "lm_head.weight"}
    np.savez(out, **sd)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), float(a[4]), float(a[5]), float(a[6]), *([float(a[7])] if len(a) > 7 else []))
