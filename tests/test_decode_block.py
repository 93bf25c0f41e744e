"""The fused decode step (``jt_lora.nn.decode_block``): one op per GPT-2 block and one for ``ln_f`` +
the tied head give what the model's own path gives against a ``DecodeCache`` (several steps, beam
reordering, padded prompts, more rows than the registers hold, any thread count), the beam search
returns the same hypotheses with it on and off, and every case it must not take falls back to the
model's path (InA, train mode, int8, the switch)."""
import os

import numpy as np
import pytest

from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt, release_freed_memory
from jt_lora.generation.beam import beam_search
from jt_lora.generation.cache import DecodeCache
from jt_lora.generation.steppers import last_logits, lm_head
from jt_lora.nn import decode_block
from jt_lora.nn.decode_block import FusedDecoder, block_step
from jt_lora.nn.kernels import fast_path_available

pytestmark = pytest.mark.skipif(not fast_path_available(), reason="the fused decode step is CPU fast path only")

# n_embd 40: strips of 32 columns leave a partial strip in every matrix
TINY = dict(vocab_size=61, n_positions=64, n_embd=40, n_layer=3, n_head=4, lora_dropout=0.0)


def _model(seed=0, std=0.3, **overrides):
    """Random model with weights large enough that the outputs are far from zero everywhere."""
    np.random.seed(seed)
    m = GPT2LMModel(GPT2Config(**{**TINY, **overrides}))
    rng = np.random.default_rng(seed + 1)
    for name, p in m.named_parameters():
        base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        p.update(jt.array((base + rng.normal(0, std, p.shape)).astype("float32")))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompt_pass(model, prompts: int, padded: bool, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (prompts, 6)).astype(np.int32)
    mask = np.ones(ids.shape, np.float32)
    if padded:
        mask[-1, :3] = 0   # the last prompt is left-padded by 3
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    with jt.no_grad():
        _, presents, _ = model.transformer(jt.array(ids), position_ids=jt.array(pos),
                                           attention_mask=jt.array(mask) if padded else None)
    return presents, (mask if padded else None), pos[:, -1] + 1


def _compare_steps(model, fused, prompts, beam, padded, steps=5, threads=None, seed=0):
    """Drive two DecodeCaches through the same steps (random reordering each step): the model's
    path on one, the fused step on the other; returns the largest relative logit difference and
    the fused logits of every step."""
    presents, mask, next_pos = _prompt_pass(model, prompts, padded, seed)
    rows = prompts * beam
    ref_cache = DecodeCache(presents, mask, rows=rows, steps=steps + 1)
    new_cache = DecodeCache(presents, mask, rows=rows, steps=steps + 1)
    rng = np.random.default_rng(seed + 7)
    src = np.repeat(np.arange(prompts), beam).astype(np.int32)
    pos, worst, outs = next_pos, 0.0, []
    if threads is not None:
        fused.threads, fused.fixed = threads, True
    for _ in range(steps):
        ref_cache.advance(src)
        new_cache.advance(src)
        pos = pos[src]
        tokens = rng.integers(0, model.config.vocab_size, rows)
        with jt.no_grad():
            hidden, _, _ = model.transformer(jt.array(tokens.astype(np.int32).reshape(rows, 1)), past=ref_cache,
                                             position_ids=jt.array(pos.astype(np.int32).reshape(rows, 1)))
        ref = last_logits(lm_head(model), hidden)
        got = fused.step(new_cache, tokens, pos)
        assert got.shape == ref.shape and got.dtype == np.float32 and got.flags.writeable
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
        outs.append(got)
        pos = pos + 1
        src = rng.integers(0, rows, rows).astype(np.int32)   # beams reorder, some rows die
    return worst, outs


@pytest.mark.parametrize("prompts,beam,padded", [(1, 1, False), (2, 5, True), (1, 10, False), (2, 7, True), (4, 10, True)])
def test_fused_steps_equal_the_model_path(model, prompts, beam, padded):
    # rows 1, 10, 14 (two register chunks), 40 (four); padded prompts mask their keys
    fused = FusedDecoder.for_model(model)
    assert fused is not None
    worst, _ = _compare_steps(model, fused, prompts, beam, padded)
    assert worst < 1e-5


def test_one_block_equals_the_models_block(model):
    """The block op alone (hidden state, not logits) against Block.execute over a DecodeCache."""
    presents, mask, next_pos = _prompt_pass(model, 2, padded=True)
    fused = FusedDecoder.for_model(model)
    c_ref, c_new = (DecodeCache(presents, mask, rows=6, steps=3) for _ in range(2))
    src = np.array([0, 0, 0, 1, 1, 1], np.int32)
    c_ref.advance(src)
    c_new.advance(src)
    rng = np.random.default_rng(3)
    x = jt.array(rng.normal(0, 1, (6, TINY["n_embd"])).astype(np.float32))
    for layer, block in enumerate(model.transformer.h):
        with jt.no_grad():
            ref, _ = block(x.reshape(6, 1, -1), c_ref, layer)
        inputs, data = c_new.layer_inputs(layer)
        got = block_step(x, inputs, data, fused.packed, layer, fused.eps, 2).numpy()
        ref = ref.numpy().reshape(6, -1)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        x = jt.array(ref)


def test_results_do_not_depend_on_the_thread_count(model):
    fused = FusedDecoder.for_model(model)
    _, one = _compare_steps(model, fused, 2, 5, True, steps=3, threads=1)
    _, two = _compare_steps(model, fused, 2, 5, True, steps=3, threads=2)
    _, three = _compare_steps(model, fused, 2, 5, True, steps=3, threads=3)
    for a, b, c in zip(one, two, three):
        assert np.array_equal(a, b) and np.array_equal(a, c)   # same summation order in every thread split


def test_gpt2_small_shaped_layer():
    """One GPT-2 S block (768 wide, 12 heads) and a 1,000-token head: whole strips, 10 rows."""
    m = _model(seed=5, std=0.05, n_embd=768, n_head=12, n_layer=1, vocab_size=1000)  # ~unit activations
    fused = FusedDecoder.for_model(m)
    worst, _ = _compare_steps(m, fused, 1, 10, False, steps=3)
    assert worst < 1e-5


def test_beam_search_is_unchanged_by_the_fused_step(model, monkeypatch):
    prompts = [[3, 9, 14, 7], [22, 5], [40, 41, 42, 43, 44, 45]]
    kw = dict(beam=4, max_new_tokens=10, batch_size=3, eos_token_ids=(), return_scores=True)
    fused, s_fused = beam_search(model, prompts, **kw)
    recompute, s_recompute = beam_search(model, prompts, use_cache=False, **kw)
    monkeypatch.setenv("JT_LORA_FUSED_DECODE", "0")
    old, s_old = beam_search(model, prompts, **kw)
    assert fused == old == recompute
    np.testing.assert_allclose(s_fused, s_old, atol=1e-5)
    np.testing.assert_allclose(s_fused, s_recompute, atol=1e-5)


def test_the_stepper_takes_the_fused_step_only_where_it_applies(model, monkeypatch):
    from jt_lora.generation.steppers import make_stepper
    ids = np.array([[3, 4, 5]], np.int32)
    mask, pos = np.ones((1, 3), np.float32), np.arange(3, dtype=np.int32)[None]
    assert make_stepper(True, model, ids, mask, pos, False, 4, 3).fused is not None
    assert make_stepper("gather", model, ids, mask, pos, False, 4, 3).fused is None
    assert make_stepper(True, model, ids, mask, pos, False, 65, 3).fused is None   # oneDNN's rows
    monkeypatch.setenv("JT_LORA_FUSED_DECODE", "0")
    assert make_stepper(True, model, ids, mask, pos, False, 4, 3).fused is None


def test_merged_ia3_is_fused_and_equal():
    m = _model(seed=2, adapter="ia3")
    for layer in (m.transformer.h[0].attn.c_attn, m.transformer.h[0].mlp.c_proj):
        vec = [p for n, p in layer.named_parameters() if "ia3" in n][0]
        vec.update(jt.array(np.random.default_rng(0).normal(1, 0.3, vec.shape).astype(np.float32)))
    m.train()
    m.eval()   # merges the (IA)3 vectors into the weights
    fused = FusedDecoder.for_model(m)
    assert fused is not None
    worst, _ = _compare_steps(m, fused, 2, 3, True, steps=3)
    assert worst < 1e-5


def test_ina_train_mode_and_int8_fall_back():
    ina = _model(seed=1, adapter="ina", lora_inhibition=0.3)
    assert FusedDecoder.for_model(ina) is None          # InA never merges: its path stays the model's
    lora = _model(seed=1)
    assert FusedDecoder.for_model(lora) is not None
    assert lora in decode_block._PACKED
    lora.train()
    assert FusedDecoder.for_model(lora) is None         # training: the model's path ...
    assert lora not in decode_block._PACKED             # ... and the packed copy is dropped
    lora.eval()
    lora.quantized = True                               # what nn.quant.quantize_model marks
    assert FusedDecoder.for_model(lora) is None


def test_changed_weights_are_repacked():
    m = _model(seed=4)
    first = FusedDecoder.for_model(m)
    assert FusedDecoder.for_model(m).packed is first.packed       # same weights: the same copy
    w = m.transformer.h[1].mlp.c_fc.weight
    w.update(w * 1.5)
    second = FusedDecoder.for_model(m)
    assert second.packed is not first.packed
    worst, _ = _compare_steps(m, second, 2, 3, True, steps=2)
    assert worst < 1e-5


@pytest.mark.parametrize("transposed", [False, True])
def test_packing_layout(transposed):
    """Strip s of a packed [K, N] weight is the contiguous [K, 32] block of columns 32s..32s+31,
    zero-padded past N (``transposed``: the weight is stored [N, K], as the tied wte)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 70)).astype(np.float32)
    dst = np.full(3 * 5 * 32 + 4, -1.0, np.float32)
    n = decode_block._pack_var(dst, jt.array(np.ascontiguousarray(w.T) if transposed else w), transposed)
    assert n == 3 * 5 * 32 and (dst[n:] == -1).all()
    strips = dst[:n].reshape(3, 5, 32)
    np.testing.assert_array_equal(strips[0], w[:, :32])
    np.testing.assert_array_equal(strips[2, :, :6], w[:, 64:])
    assert (strips[2, :, 6:] == 0).all()


def test_packed_buffer_is_aligned_for_huge_pages(model):
    fused = FusedDecoder.for_model(model)
    assert fused.packed.buf.ctypes.data % (2 << 20) == 0
    assert all(a % 128 == 0 for a in fused.packed.block_addr)


def test_the_thread_choice_outlives_one_search(model):
    first, second = FusedDecoder.for_model(model), FusedDecoder.for_model(model)
    assert first.chooser is second.chooser


def test_thread_choice(monkeypatch):
    monkeypatch.setenv("JT_LORA_DECODE_THREADS", "3")
    assert decode_block.decode_threads() == 3
    monkeypatch.delenv("JT_LORA_DECODE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert decode_block.decode_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert decode_block.decode_threads() == len(os.sched_getaffinity(0))


def _drive(chooser, times, steps):
    used = []
    for _ in range(steps):
        used.append(chooser.threads)
        chooser.record(times[chooser.threads])
    return used


def test_online_calibration_keeps_the_faster_count():
    tc = decode_block.ThreadChooser
    c = tc()
    c.fixed, c.max_threads, c.threads = False, 2, 2
    used = _drive(c, {2: 0.05, 1: 0.02}, 200)   # one thread is faster (an oversubscribed machine)
    assert used[:3] == [2, 2, 1]                 # warm-up, then one probe each: clearly slower
    assert set(used[3:3 + tc.FIRST_WINDOW]) == {1}
    assert used.count(2) <= 6 and c.window > tc.FIRST_WINDOW   # probes get rarer while the choice holds
    c2 = tc()
    c2.fixed, c2.max_threads, c2.threads = False, 2, 2
    used = _drive(c2, {2: 0.020, 1: 0.021}, 1 + 2 * tc.PROBES + 5)   # close: all probes, then the faster
    assert used[1:1 + 2 * tc.PROBES].count(1) == tc.PROBES and set(used[1 + 2 * tc.PROBES:]) == {2}
    c3 = tc()
    c3.fixed = True
    c3.threads = 2
    assert set(_drive(c3, {2: 1.0, 1: 0.01}, 20)) == {2}   # JT_LORA_DECODE_THREADS: never changes


# ----------------------------------------------------------------------------------------------
# pack_model: the packed strips as the model's only copy of the block weights

def test_packed_model_searches_as_the_fp32_model():
    """A converted model gives the unconverted model's prompt keys and values bit for bit (the
    prompt pass unpacks each weight and takes the model's own product), its first logits to float
    rounding (the head reads the strips) and the same beams and scores."""
    plain, packed = _model(seed=6), _model(seed=6)
    summary = decode_block.pack_model(packed, rows=40)
    assert summary["blocks"] == TINY["n_layer"]
    for block in packed.transformer.h:
        assert isinstance(block.attn.c_attn, decode_block.PackedLinear)
        assert isinstance(block.mlp.c_proj, decode_block.PackedLinear)
    names = {n for n, _ in packed.named_parameters()}
    assert not any(".attn.c_attn." in n or ".mlp.c_fc." in n or "wte" in n for n in names)   # fp32 copies gone
    presents_ref, mask, _ = _prompt_pass(plain, 2, padded=True)
    presents_new, _, _ = _prompt_pass(packed, 2, padded=True)
    for (k_ref, v_ref), (k_new, v_new) in zip(presents_ref, presents_new):
        assert np.array_equal(k_ref.numpy(), k_new.numpy()) and np.array_equal(v_ref.numpy(), v_new.numpy())
    from jt_lora.generation.steppers import make_stepper
    ids = np.array([[3, 4, 5, 6], [0, 0, 7, 8]], np.int32)
    mask = (ids > 0).astype(np.float32)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    first = [make_stepper(True, m, ids, mask, pos, True, 8, 3).first_logits for m in (plain, packed)]
    np.testing.assert_allclose(first[1], first[0], rtol=1e-5, atol=1e-5 * np.abs(first[0]).max())
    assert FusedDecoder.for_model(packed, rows=40).packed is packed.decode_packed
    assert packed not in decode_block._PACKED                    # no second copy
    worst, _ = _compare_steps(plain, FusedDecoder.for_model(packed), 4, 10, True)
    assert worst < 1e-5
    prompts = [[3, 9, 14, 7], [22, 5], [40, 41, 42, 43, 44, 45]]
    kw = dict(beam=4, max_new_tokens=10, batch_size=3, eos_token_ids=(), return_scores=True)
    ref, s_ref = beam_search(plain, prompts, **kw)
    got, s_got = beam_search(packed, prompts, **kw)
    assert got == ref
    np.testing.assert_allclose(s_got, s_ref, atol=1e-5)
    assert decode_block.pack_model(packed)["already"]


def test_packed_model_is_inference_only_and_refusals_leave_the_model():
    m = _model(seed=7)
    decode_block.pack_model(m)
    m.train()
    with pytest.raises(RuntimeError, match="inference only"):
        m(jt.array(np.array([[1, 2, 3]], np.int32)))
    m.eval()
    with pytest.raises(RuntimeError, match="inference only"):   # the full logits need wte
        m(jt.array(np.array([[1, 2, 3]], np.int32)))
    ina = _model(seed=1, adapter="ina", lora_inhibition=0.3)
    assert decode_block.pack_model(ina) is None                  # InA never merges: nothing packed
    assert not isinstance(ina.transformer.h[0].attn.c_attn, decode_block.PackedLinear)
    lora = _model(seed=1)
    assert decode_block.pack_model(lora, rows=65) is None        # more rows than the fused step takes


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS")
def test_packing_in_place_costs_no_second_copy():
    """~113 MB of block weights: the copy mode adds about that much resident memory, pack_model
    about none (each block's fp32 tensors are freed and returned to the OS as it goes)."""
    kw = dict(seed=8, std=0.05, n_embd=768, n_head=12, n_layer=4, vocab_size=100)
    block_mb = 4 * 12 * 768 * 768 * 4 / 2 ** 20
    copy = _model(**kw)
    jt.sync_all()
    release_freed_memory()
    before = _rss_mb()
    assert FusedDecoder.for_model(copy) is not None
    grown = _rss_mb() - before
    assert grown > 0.8 * block_mb                                # the copy mode: a second copy
    del copy
    release_freed_memory()
    m = _model(**kw)
    jt.sync_all()
    release_freed_memory()
    before = _rss_mb()
    decode_block.pack_model(m)
    assert _rss_mb() - before < 0.25 * block_mb, (_rss_mb() - before, block_mb)


# ----------------------------------------------------------------------------------------------
# --precision int8: the same fused block over the quantized strips

def test_int8_fused_steps_equal_the_int8_model_path(monkeypatch):
    """The int8 block and head ops (nn.quant's strips read in place) give the quantized model's own
    path (its QuantizedLinear and QuantizedHead kernels) to float rounding, and the same beams."""
    from jt_lora.nn.quant import quantize_model
    m = _model(seed=9)
    quantize_model(m)
    fused = FusedDecoder.for_model(m, rows=40)
    assert fused is not None and isinstance(fused.packed, decode_block.Int8Blocks)
    for prompts, beam, padded in ((1, 10, False), (4, 10, True), (2, 7, True)):
        worst, _ = _compare_steps(m, fused, prompts, beam, padded)
        assert worst < 1e-5
    prompts = [[3, 9, 14, 7], [22, 5], [40, 41, 42, 43, 44, 45]]
    kw = dict(beam=4, max_new_tokens=10, batch_size=3, eos_token_ids=(), return_scores=True)
    got, s_got = beam_search(m, prompts, **kw)
    monkeypatch.setenv("JT_LORA_FUSED_DECODE", "0")
    ref, s_ref = beam_search(m, prompts, **kw)
    assert got == ref
    np.testing.assert_allclose(s_got, s_ref, atol=1e-5)


def test_int8_without_its_head_or_with_ina_keeps_the_model_path():
    from jt_lora.nn.quant import quantize_model
    m = _model(seed=9)
    quantize_model(m, head=False)
    assert FusedDecoder.for_model(m) is None
    ina = _model(seed=1, adapter="ina", lora_inhibition=0.3)
    quantize_model(ina)                                   # InA keeps an fp32 low-rank path on top
    assert FusedDecoder.for_model(ina) is None
