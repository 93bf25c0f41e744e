"""Model flags of generate / eval_boolq: one set of defaults, the adapter directory's config decides,
contradicting flags are errors naming the flag and the file, shapes come from the weights."""

import argparse
import dataclasses

import pytest

from jt_lora.models import loading as MF


def parse(*argv):
    p = argparse.ArgumentParser()
    MF.add_model_flags(p)
    return p.parse_args(list(argv))


META = {"adapter": "lora", "lora_attn_dim": 4, "lora_attn_alpha": 32.0, "lora_dropout": 0.1,
        "lora_inhibition": 0.0, "lora_enable": [True, False, True], "ia3_enable": [False, True, True],
        "ia3_feedforward": True, "base": {"vocab_size": 97, "n_positions": 64, "n_embd": 48, "n_layer": 2,
                                          "n_head": 3}}
from jt_lora.models.saving import ADAPTER_FIELDS as FIELDS
INA = {**META, "adapter": "ina", "lora_inhibition": 0.3}


def test_defaults_are_the_lora_papers_and_the_trainers():
    from jt_lora.models.gpt2 import GPT2Config
    from jt_lora.train import build_parser as train_parser

    defaults = {f.name: f.default for f in dataclasses.fields(GPT2Config)}
    assert (MF.LORA_DIM, MF.LORA_ALPHA) == (defaults["lora_attn_dim"], defaults["lora_attn_alpha"]) == (4, 32.0)
    t = train_parser().parse_args(["--train_data", "x.jsonl"])
    assert (t.lora_dim, t.lora_alpha) == (MF.LORA_DIM, MF.LORA_ALPHA)
    out = MF.resolve_adapter(parse("--adapter", "lora"), fields=FIELDS)
    assert (out["lora_attn_dim"], out["lora_attn_alpha"]) == (4, 32.0)


def test_adapter_dir_config_decides_and_a_repeated_value_is_fine():
    out = MF.resolve_adapter(parse("--lora_alpha", "32", "--adapter", "lora"), META, "A/jt_lora_adapter.json", FIELDS)
    assert out["adapter"] == "lora" and out["lora_attn_alpha"] == 32.0 and out["lora_enable"] == (True, False, True)
    assert out["lora_dropout"] == 0.0
    out = MF.resolve_adapter(parse(), {**INA, "lora_inhibition_slope": 0.05}, "A/jt_lora_adapter.json", FIELDS)
    assert out["adapter"] == "ina" and out["lora_inhibition"] == 0.3 and out["lora_inhibition_slope"] == 0.05


@pytest.mark.parametrize("argv, pattern", [
    (("--lora_alpha", "128"), r"--lora_alpha 128.0 contradicts lora_attn_alpha=32.0 in A/jt_lora_adapter.json"),
    (("--lora_dim", "8"), r"--lora_dim 8 contradicts lora_attn_dim=4 in A/jt_lora_adapter.json"),
    (("--adapter", "ia3"), r"--adapter ia3 contradicts adapter='lora' in A/jt_lora_adapter.json"),
    (("--lora_inhibition", "0.3"), r"--lora_inhibition 0.3 contradicts lora_inhibition=0.0"),
])
def test_flag_contradicting_the_adapter_config_names_flag_and_file(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        MF.resolve_adapter(parse(*argv), META, "A/jt_lora_adapter.json", FIELDS)


@pytest.mark.parametrize("argv, pattern", [
    (("--adapter", "ina"), r"--adapter ina needs --lora_inhibition"),
    (("--adapter", "ina", "--lora_inhibition", "0"), r"--lora_inhibition must be in \(0, 1\).*0 is plain LoRA"),
    (("--adapter", "lora", "--lora_inhibition", "0.3"), r"--lora_inhibition applies only to --adapter ina, not lora"),
    (("--lora_inhibition", "0.3",), r"--lora_inhibition applies only to --adapter ina, not none"),
    (("--adapter", "ia3", "--lora_alpha", "16"), r"--lora_alpha applies only to --adapter lora/ina, not ia3"),
    (("--adapter", "lora", "--lora_dim", "0"), r"--lora_dim must be >= 1"),
])
def test_init_checkpoint_flags_that_do_not_fit_are_errors(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        MF.resolve_adapter(parse(*argv), fields=FIELDS)


def test_ina_adapter_dir_with_zero_inhibition_is_rejected():
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) for an InA adapter \(A/j.json\)"):
        MF.resolve_adapter(parse(), {**INA, "lora_inhibition": 0.0}, "A/j.json", FIELDS)


def test_slope_flag_maps_onto_the_configs_slope_field():
    fields = FIELDS
    out = MF.resolve_adapter(parse("--adapter", "ina", "--lora_inhibition", "0.2", "--lora_inhibition_slope", "0.05"),
                             fields=fields)
    assert out["lora_inhibition_slope"] == 0.05
    with pytest.raises(ValueError, match=r"--lora_inhibition_slope 0.1 contradicts lora_inhibition_slope=0.01"):
        MF.resolve_adapter(parse("--lora_inhibition_slope", "0.1"), {**INA, "lora_inhibition_slope": 0.01}, "A/j", fields)


ARCH = {"vocab_size": 97, "n_positions": 64, "n_embd": 48, "n_layer": 2}   # tensors tell no head count


def test_shape_from_weights_heads_from_the_adapter_record_or_flag():
    assert MF.resolve_shape(ARCH, "ck", parse(), META["base"], "A/j")["n_head"] == 3
    assert MF.resolve_shape(ARCH, "ck", parse("--n_head", "6"))["n_head"] == 6
    with pytest.raises(ValueError, match=r"--n_head 6 contradicts n_head=3 in A/j"):
        MF.resolve_shape(ARCH, "ck", parse("--n_head", "6"), META["base"], "A/j")
    with pytest.raises(ValueError, match=r"ck: n_embd=48 has no standard head count; pass --n_head"):
        MF.resolve_shape(ARCH, "ck", parse())
    with pytest.raises(ValueError, match=r"A/j was trained on a base with n_embd=64, but ck has n_embd=48"):
        MF.resolve_shape(ARCH, "ck", parse(), {**META["base"], "n_embd": 64}, "A/j")
    assert MF.resolve_shape({**ARCH, "n_embd": 1024, "n_layer": 24}, "ck", parse())["n_head"] == 16


def test_model_card_that_disagrees_warns_once_and_the_weights_win():
    warnings = []
    shape = MF.resolve_shape(ARCH, "ck", parse("--model_card", "gpt2.md"), META["base"], "A/j", warn=warnings.append)
    assert (shape["n_embd"], shape["n_layer"], shape["n_head"]) == (48, 2, 3)
    assert len(warnings) == 1 and "--model_card gpt2.md" in warnings[0] and "using the checkpoint's shapes" in warnings[0]
    warnings.clear()
    MF.resolve_shape({**ARCH, "n_embd": 768, "n_layer": 12}, "ck", parse("--model_card", "gpt2.sm"),
                     warn=warnings.append)
    assert warnings == []
