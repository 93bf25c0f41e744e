"""What the trainer writes is an adapter HF PEFT reads: ``peft.PeftModel.from_pretrained`` on
transformers' GPT-2 with the trainer's ``adapter/`` gives jt_lora's logits (LoRA, grouped q/v as
PEFT's rank-2r ``c_attn``, and (IA)³)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import _synthetic  # noqa: E402  (tests/ is on sys.path)

pytest.importorskip("peft", reason="needs HF peft + torch for the reference")
from jt_lora.backend import jt  # noqa: E402
from jt_lora import GPT2Config, GPT2LMModel, load_adapter  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
IDS = np.array([[1, 5, 7, 9, 11, 3, 2, 50], [4, 4, 8, 15, 16, 23, 42, 60]])


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_trainer_adapter_loads_in_hf_peft_with_the_same_logits(tmp_path, adapter):
    np.random.seed(0)
    base = GPT2LMModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.2, adapter="none"))
    base.save_pretrained(tmp_path / "base")
    data = _synthetic(tmp_path / "train.jsonl", n=24)
    run = subprocess.run([sys.executable, "-m", "jt_lora.train", "--train_data", str(data), "--init_checkpoint",
                          str(tmp_path / "base"), "--adapter", adapter, "--lora_dim", "2", "--lora_alpha", "8",
                          "--seq_len", "32", "--train_batch_size", "4", "--lr", "0.05", "--max_step", "6",
                          "--no_plot", "--work_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    adapter_dir = tmp_path / "run" / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()

    fields = dict(adapter=adapter, lora_dropout=0.0)
    if adapter == "lora":
        fields.update(lora_attn_dim=2, lora_attn_alpha=8)
    ours = GPT2LMModel.from_pretrained(tmp_path / "base", **fields)
    load_adapter(ours, adapter_dir)
    ours.eval()
    logits = ours(jt.array(IDS.astype("int32")))[0].numpy()
    plain = GPT2LMModel.from_pretrained(tmp_path / "base").eval()(jt.array(IDS.astype("int32")))[0].numpy()
    assert np.abs(logits - plain).max() > 1e-3, "training did not move the adapter: the test would prove nothing"

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(tmp_path / "base"), "ids": IDS.tolist(),
                                "jobs": [{"name": "trained", "kind": "eval", "adapter": str(adapter_dir)}]}))
    proc = subprocess.run([sys.executable, str(HERE / "peft_ref.py"), str(spec), str(tmp_path / "ref")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(tmp_path / "ref" / "logits.npz")["trained"]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
