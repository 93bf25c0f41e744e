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


def loralib_merged_delta(A, B, enable, scaling):
    """loralib MergedLinear's update, [out, in], via its grouped conv1d."""
    groups = sum(enable)
    d = F.conv1d(A.unsqueeze(0), B.unsqueeze(-1), groups=groups).squeeze(0)  # [part*groups, in]
    part = d.shape[0] // groups
    out = torch.zeros(part * len(enable), A.shape[1], dtype=A.dtype)
    mask = torch.zeros(len(enable), part, dtype=torch.bool)
    mask[torch.tensor(enable)] = True
    out[mask.view(-1)] = d
    return out * scaling


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
            w += loralib_merged_delta(A, B, enable, alpha / r).t()
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


def ina(inp, out: Path):
    """InA low-rank path and its gradients, straight from the formula."""
    x = torch.tensor(inp["x"], requires_grad=False)
    A = torch.tensor(inp["A"], requires_grad=True)
    B = torch.tensor(inp["B"], requires_grad=True)
    G = torch.tensor(inp["G"])
    groups, inh, scaling = int(inp["groups"]), float(inp["inhibition"]), float(inp["scaling"])
    enable = [bool(e) for e in inp["enable"]]
    h = x @ A.t()  # [N, r*groups]
    n, rg = h.shape
    hg = h.view(n, groups, rg // groups)
    peak = hg.max(dim=-1, keepdim=True).values
    hg = F.leaky_relu(hg - inh * peak, negative_slope=0.1)
    h = hg.view(n, rg)
    # grouped B back into the full output (q|k|v), zero on disabled parts
    part = B.shape[0] // groups
    r = rg // groups
    outs, gi = [], 0
    for e in enable:
        if e:
            outs.append(h[:, gi * r:(gi + 1) * r] @ B[gi * part:(gi + 1) * part].t())
            gi += 1
        else:
            outs.append(torch.zeros(n, part))
    y = torch.cat(outs, dim=1) * scaling
    (y * G).sum().backward()
    np.savez(out / "ina.npz", y=y.detach().numpy(), dA=A.grad.numpy(), dB=B.grad.numpy())


if __name__ == "__main__":
    mode, inp_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"gpt2": make_gpt2, "ina": ina}[mode](dict(np.load(inp_file)), out_dir)
