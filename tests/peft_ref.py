"""HF PEFT reference values for the jt_lora.peft tests, computed in a separate process.

Jittor and torch each bring their own MKL, so torch never runs in the test
process (as tests/torch_ref.py). Usage: ``python peft_ref.py JOBS.json OUT_DIR``;
JOBS.json holds ``{"base": HF_DIR, "ids": [[...]], "jobs": [...]}`` and each job
writes logits into OUT_DIR/logits.npz under its name and facts into
OUT_DIR/facts.json. Job kinds:

* ``make``: a PEFT model on the base with ``config`` (adapter_config.json fields), every adapter
  tensor drawn at random (non-zero), saved to ``out``; records logits and parameter counts.
* ``eval``: ``peft.PeftModel.from_pretrained(base, adapter)``; records logits and warnings.
* ``weighted``: loads ``adapters`` and runs PEFT's ``add_weighted_adapter``.
* ``ina``: ``peft.PeftModel.from_pretrained(base, adapter)`` with every LoRA layer's forward replaced
  by the InA reference's (ChengKang520/inhibited-lora's patched PEFT LoRA layer), at ``inhibition``.
* ``ms``: a microsoft/LoRA checkpoint (``module.transformer.`` keys, loralib's grouped lora_A/B on
  q and v of c_attn) saved to ``out``, with logits from loralib's formula on the HF model.
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_ref import loralib_merged_delta  # tests/ is on sys.path: this file runs as a script

torch.set_num_threads(1)


def _base(base_dir):
    import transformers
    return transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def make(job, base_dir, ids, facts):
    import peft
    torch.manual_seed(job["seed"])
    config = peft.PeftConfig.from_peft_type(**job["config"])
    model = peft.get_peft_model(_base(base_dir), config)
    trainable, total = model.get_nb_trainable_parameters()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (name.endswith("bias") and p.requires_grad):
                p.add_(torch.randn_like(p) * 0.3)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn_like(p) * 0.3)
    model.eval()
    model.save_pretrained(job["out"], safe_serialization=job.get("safetensors", True))
    facts[job["name"]] = {"trainable": trainable, "total": total}
    return _logits(model, ids)


def evaluate(job, base_dir, ids, facts):
    import peft
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_base(base_dir), job["adapter"]).eval()
    facts[job["name"]] = {"warnings": [str(w.message) for w in caught]}
    return _logits(model, ids)


def weighted(job, base_dir, ids, facts):
    import peft
    names = [f"a{i}" for i in range(len(job["adapters"]))]
    model = peft.PeftModel.from_pretrained(_base(base_dir), job["adapters"][0], adapter_name=names[0])
    for name, path in zip(names[1:], job["adapters"][1:]):
        model.load_adapter(path, adapter_name=name)
    kw = {"combination_type": job["combination_type"]} if job.get("combination_type") else {}
    model.add_weighted_adapter(names, job["weights"], "combined", **kw)
    model.set_adapter("combined")
    return _logits(model.eval(), ids)


def _ina_forward(layer, inhibition):
    """The InA reference's LoRA layer forward: h = lora_A(dropout(x)); m = max of h over the rank;
    base(x) + lora_B(leaky_relu(h - m * inhibition)) * scaling, torch's default slope."""
    def forward(x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in layer.active_adapters:
            h = layer.lora_A[name](layer.lora_dropout[name](x))
            m = h.max(dim=-1, keepdim=True).values
            result = result + layer.lora_B[name](F.leaky_relu(h - m * inhibition)) * layer.scaling[name]
        return result
    return forward


def ina(job, base_dir, ids, facts):
    import peft
    from peft.tuners.lora import LoraLayer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stock PEFT warns that it ignores lora_inhibition: we apply it here
        model = peft.PeftModel.from_pretrained(_base(base_dir), job["adapter"]).eval()
    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.forward = _ina_forward(module, float(job["inhibition"]))
            patched += 1
    facts[job["name"]] = {"patched": patched}
    return _logits(model, ids)


def ms_checkpoint(job, base_dir, ids, facts):
    model = _base(base_dir)
    sd = model.state_dict()
    ms = {"module." + k: v.clone() for k, v in sd.items() if k.startswith("transformer.")}
    r, alpha, enable = job["r"], job["alpha"], [True, False, True]
    g = torch.Generator().manual_seed(job["seed"])
    n = model.config.n_embd
    with torch.no_grad():
        for i in range(model.config.n_layer):
            A = torch.randn(r * 2, n, generator=g) * 0.3
            B = torch.randn(n * 2, r, generator=g) * 0.3
            ms[f"module.transformer.h.{i}.attn.c_attn.lora_A"] = A
            ms[f"module.transformer.h.{i}.attn.c_attn.lora_B"] = B
            delta = loralib_merged_delta(A, B, enable, alpha / r, fan_in_fan_out=True)  # Conv1D [in, out]
            model.transformer.h[i].attn.c_attn.weight += delta
    torch.save({"model_state_dict": ms}, job["out"])
    return _logits(model, ids)


KINDS = {"make": make, "eval": evaluate, "weighted": weighted, "ms": ms_checkpoint, "ina": ina}

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = np.array(spec["ids"], dtype=np.int64)
    logits, facts = {}, {}
    for job in spec["jobs"]:
        logits[job["name"]] = KINDS[job["kind"]](job, spec["base"], ids, facts)
    np.savez(out_dir / "logits.npz", **logits)
    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1))
