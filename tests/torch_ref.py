"""PyTorch reference values for the parity tests, computed in a separate process.

Jittor and torch each bring their own MKL; keeping torch out of the test
process avoids their clash. Usage: ``python torch_ref.py MODE IN.npz OUT_DIR``.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TINY = dict(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)


def loralib_merged_delta(A, B, enable, scaling, fan_in_fan_out=False):
    """The update PyPI loralib's MergedLinear folds into its weight on eval(), in its weight layout."""
    import loralib
    r = A.shape[0] // sum(enable)
    part = B.shape[0] // sum(enable)
    layer = loralib.MergedLinear(A.shape[1], part * len(enable), r=r, lora_alpha=scaling * r,
                                 enable_lora=list(enable), fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.eval()
    return layer.weight.detach().clone()


def make_gpt2(inp, out: Path):
    """Tiny HF GPT-2 in every file format, plus reference logits (base and with LoRA)."""
    import transformers

    torch.manual_seed(int(inp["seed"]))
    cfg = transformers.GPT2Config(**TINY)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ids = torch.tensor(inp["ids"], dtype=torch.long)
    model.save_pretrained(out / "hf_safetensors")
    (out / "hf_bin").mkdir(exist_ok=True)
    (out / "hf_bin" / "config.json").write_text((out / "hf_safetensors" / "config.json").read_text())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, out / "hf_bin" / "pytorch_model.bin")
    torch.save(sd, out / "legacy.bin", _use_new_zipfile_serialization=False)
    results = {"base": model(ids).logits.detach().numpy()}

    # microsoft/LoRA training checkpoint: DDP prefix, lora_A/lora_B on c_attn (q, v).
    r, alpha, enable = 2, 8.0, [True, False, True]
    ms = {}
    for k, v in sd.items():
        if k.startswith("transformer."):
            ms["module." + k] = v
    ms["module.lm_head.decoder.weight"] = sd["transformer.wte.weight"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(TINY["n_layer"]):
            A = torch.randn(r * 2, TINY["n_embd"], generator=g) * 0.3
            B = torch.randn(TINY["n_embd"] * 2, r, generator=g) * 0.3
            ms[f"module.transformer.h.{i}.attn.c_attn.lora_A"] = A
            ms[f"module.transformer.h.{i}.attn.c_attn.lora_B"] = B
            w = model.transformer.h[i].attn.c_attn.weight  # Conv1D [in, out]
            w += loralib_merged_delta(A, B, enable, alpha / r, fan_in_fan_out=True)
    torch.save({"model_state_dict": ms}, out / "ms_lora.pt")
    results["lora"] = model(ids).logits.detach().numpy()
    # Legacy OpenAI-style names (.g/.b/.w) with a plain transformer. prefix.
    legacy = {}
    for k, v in sd.items():
        if not k.startswith("transformer."):
            continue
        if k.endswith(".weight"):
            k = k[:-len(".weight")] + (".g" if ".ln_" in k else ".w")
        elif k.endswith(".bias") and not k.endswith("attn.bias"):
            k = k[:-len(".bias")] + ".b"
        legacy[k] = v
    torch.save({"model_state_dict": legacy}, out / "ms_legacy_names.pt")
    (out / "meta.json").write_text(json.dumps({"r": r, "alpha": alpha, "enable": enable}))
    np.savez(out / "logits.npz", **results)


def _ina_module(x, A, B, inhibition, scaling):
    """One adapted module as the InA reference computes its low-rank path (its patched PEFT LoRA
    layer): h = lora_A(x); m = max of h over the rank; lora_B(leaky_relu(h - m*inhibition)) * scaling,
    leaky_relu at torch's default slope; inhibition 0 is plain LoRA."""
    h = x @ A.t()
    if inhibition > 0:
        m = h.max(dim=-1, keepdim=True).values
        h = F.leaky_relu(h - m * inhibition)
    return (h @ B.t()) * scaling


def ina(inp, out: Path):
    """InA's low-rank path and its gradients. ``modules``: how lora_A's rows / the output's columns
    split into separately adapted modules (one module: the reference on a whole layer; several: the
    reference applied to each part, e.g. q and v as their own modules; a part with no rows is not
    adapted)."""
    x = torch.tensor(inp["x"])
    A = torch.tensor(inp["A"], requires_grad=True)
    B = torch.tensor(inp["B"], requires_grad=True)
    G = torch.tensor(inp["G"])
    inh, scaling = float(inp["inhibition"]), float(inp["scaling"])
    rows = [int(v) for v in inp["rank_rows"]]     # rank rows of lora_A per output part (0: not adapted)
    part = G.shape[1] // len(rows)
    outs, a0, b0 = [], 0, 0
    for r in rows:
        if r == 0:
            outs.append(torch.zeros(x.shape[0], part))
            continue
        outs.append(_ina_module(x, A[a0:a0 + r], B[b0:b0 + part], inh, scaling))
        a0, b0 = a0 + r, b0 + part
    y = torch.cat(outs, dim=1)
    (y * G).sum().backward()
    np.savez(out / "ina.npz", y=y.detach().numpy(), dA=A.grad.numpy(), dB=B.grad.numpy())


def loralib_layers(inp, out: Path):
    """PyPI loralib's Linear, MergedLinear and Embedding with given weights: train-mode output, then
    eval(): merged weight and output; plus what its helpers select on a small net."""
    import loralib
    res = {}
    x = torch.tensor(inp["x"])
    for ffo in (0, 1):
        lin = loralib.Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=bool(ffo))
        merged = loralib.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                      fan_in_fan_out=bool(ffo))
        for name, layer in (("linear", lin), ("merged", merged)):
            key = f"{name}{ffo}"
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(inp[f"{key}_weight"]))
                layer.bias.copy_(torch.tensor(inp[f"{key}_bias"]))
                layer.lora_A.copy_(torch.tensor(inp[f"{key}_A"]))
                layer.lora_B.copy_(torch.tensor(inp[f"{key}_B"]))
                layer.train()
                res[f"{key}_train"] = layer(x).numpy()
                layer.eval()
                res[f"{key}_eval"] = layer(x).numpy()
                res[f"{key}_merged_weight"] = layer.weight.numpy().copy()
    emb = loralib.Embedding(10, 6, r=2, lora_alpha=4)
    ids = torch.tensor(inp["ids"], dtype=torch.long)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor(inp["emb_weight"]))
        emb.lora_A.copy_(torch.tensor(inp["emb_A"]))
        emb.lora_B.copy_(torch.tensor(inp["emb_B"]))
        emb.train()
        res["emb_train"] = emb(ids).numpy()
        emb.eval()
        res["emb_eval"] = emb(ids).numpy()
        res["emb_merged_weight"] = emb.weight.numpy().copy()
    np.savez(out / "loralib.npz", **res)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = loralib.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], fan_in_fan_out=True)
            self.lin = loralib.Linear(12, 6, r=2)
            self.other = torch.nn.Linear(6, 4)
            self.emb = loralib.Embedding(10, 8, r=2)

    select = {}
    for bias in ("none", "lora_only", "all"):
        net = Net()
        loralib.mark_only_lora_as_trainable(net, bias=bias)
        select[bias] = {"trainable": sorted(n for n, p in net.named_parameters() if p.requires_grad),
                        "state_dict": sorted(loralib.lora_state_dict(net, bias=bias))}
    (out / "loralib_select.json").write_text(json.dumps(select))


if __name__ == "__main__":
    mode, inp_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"gpt2": make_gpt2, "ina": ina, "loralib": loralib_layers}[mode](dict(np.load(inp_file)), out_dir)
