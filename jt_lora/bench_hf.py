"""The HF transformers + PEFT side of ``jt_lora.bench`` (run in its own process: torch and Jittor
must not share one). Usage: ``python -m jt_lora.bench_hf '<json of the bench arguments>'``."""
import json
import sys
import time

import numpy as np


def main():
    from jt_lora.bench import peak_rss_mb  # no Jittor: jt_lora.bench imports it lazily
    args = json.loads(sys.argv[1])
    import torch
    import transformers
    from peft import IA3Config, LoraConfig, get_peft_model

    dims = {"gpt2.sm": (768, 12, 12), "gpt2.md": (1024, 24, 16), "gpt2.lg": (1280, 36, 20)}[args["model"]]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=dims[0], n_layer=dims[1], n_head=dims[2], attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    if args["adapter"] == "full":   # full fine-tuning: every weight trains, no PEFT
        peft_cfg = None
    elif args["adapter"] == "ia3":
        peft_cfg = IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    else:  # InA has no PEFT counterpart; plain LoRA is the reference workload
        peft_cfg = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    if peft_cfg is not None:
        model = get_peft_model(model, peft_cfg)
    rng = np.random.default_rng(0)
    times = []
    if args["mode"] == "train":
        b, t = args["batch"], args["seq"]
        ids = torch.tensor(rng.integers(0, cfg.vocab_size, (b, t)))
        labels = ids.clone()
        labels[:, : int(t * (1 - args["loss_fraction"]))] = -100
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step():
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        tokens = b * t
    else:
        model.eval()
        prompts = torch.tensor(rng.integers(0, cfg.vocab_size, (args["batch"], args["prompt_len"])))

        def step():
            with torch.no_grad():
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                               num_beams=args["beam"], max_new_tokens=args["new_tokens"],
                               min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=0)
        tokens = args["batch"] * args["new_tokens"]
    for _ in range(args["warmup"]):
        step()
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    print(json.dumps({"tokens_per_s": tokens / med, "step_s": med, "times": times,
                      "peak_rss_mb": peak_rss_mb(),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
