"""attnlib.integrations.diffusers on tiny, randomly initialised diffusers models (CPU, nothing downloaded)."""
import copy
import inspect
import io
import sys
import types
import weakref

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models import attention_processor  # noqa: E402
from diffusers.models.transformers import transformer_flux, transformer_wan  # noqa: E402

from attnlib.integrations import diffusers as attnlib_diffusers  # noqa: E402
from attnlib.integrations import sdpa as attnlib_sdpa  # noqa: E402
from attnlib.testing import assert_verbose_allclose, metrics  # noqa: E402
from conftest import TORCH_CPU_SDPA_DIES_ON_ZERO_HEADS  # noqa: E402

# flash in fp32 against diffusers' native SDPA: the same math, different summation order
FLASH_ATOL, FLASH_RTOL = 2e-5, 1e-5
# sage's contract (tests/test_reference_sage.py), here on the model's final output
SAGE_COS_MIN, SAGE_REL_L1_MAX = 0.999, 3e-2
# sla with half the key blocks critical and the rest on the linear branch (block 16, so
# these 32-72 token sequences have 2-5 blocks and the linear branch really runs); its error
# passes through the residual stream, so the bound is on the final output
SLA_OPTIONS = dict(critical=0.5, negligible=0.0, block_size=(16, 16))
SLA_COS_MIN = 0.99

ORIGINAL_DISPATCH = transformer_wan.dispatch_attention_fn


def tiny_wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 12, 16, generator=g), return_dict=False)
    return model.eval(), inputs, 4  # 2 blocks x (self-attention, cross-attention)


def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 64, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(64, 3, generator=g), txt_ids=torch.zeros(8, 3), return_dict=False)
    return model.eval(), inputs, 2  # 1 joint (text+image) block + 1 single block


MODELS = {"wan": tiny_wan, "flux": tiny_flux}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    model, inputs, n_attn = MODELS[request.param]()
    with torch.no_grad():
        native = model(**inputs)[0]
    return model, inputs, n_attn, native


@pytest.fixture
def attnlib_calls(monkeypatch):
    """Counts the calls that reach attnlib, so a test cannot pass by never switching anything."""
    calls = []
    real = attnlib_sdpa._route  # the routers' entry (options were checked by apply)

    def spy(*args, **kwargs):
        calls.append(args[8])  # method
        return real(*args, **kwargs)

    monkeypatch.setattr(attnlib_sdpa, "_route", spy)
    return calls


def processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


def classes_of(model):
    return {name: type(p) for name, p in processors(model).items()}


def is_switched(processor):
    return "_attnlib_original_class" in type(processor).__dict__


def run(model, inputs):
    with torch.no_grad():  # sage has no backward
        return model(**inputs)[0]


def assert_restored(model, inputs, native, before, classes):
    assert processors(model) == before and all(p is before[n] for n, p in processors(model).items())
    assert classes_of(model) == classes
    # nothing module-level is ever patched
    assert transformer_wan.dispatch_attention_fn is ORIGINAL_DISPATCH
    assert transformer_flux.dispatch_attention_fn is ORIGINAL_DISPATCH
    assert attention_processor.F is torch.nn.functional
    assert not [m for m in sys.modules if m.startswith(attnlib_diffusers.__name__ + ".")]  # shadow modules gone
    assert torch.equal(run(model, inputs), native)  # bit for bit


def test_flash_matches_native_and_remove_restores(case, attnlib_calls):
    model, inputs, n_attn, native = case
    before, classes = processors(model), classes_of(model)
    signatures = {n: inspect.signature(p.__call__) for n, p in before.items()}
    assert attnlib_diffusers.apply(model, method="flash") == n_attn
    try:
        for name, proc in processors(model).items():
            assert proc is before[name] and isinstance(proc, classes[name]) and type(proc) is not classes[name]
            # diffusers drops kwargs that the processor's __call__ does not name
            assert inspect.signature(proc.__call__) == signatures[name]
        out = run(model, inputs)
        assert attnlib_calls == ["flash"] * n_attn
        assert_verbose_allclose(out, native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    finally:
        assert attnlib_diffusers.remove(model) == n_attn
    attnlib_calls.clear()
    assert_restored(model, inputs, native, before, classes)
    assert attnlib_calls == []


def test_sage_within_contract(case, attnlib_calls):
    model, inputs, n_attn, native = case
    before, classes = processors(model), classes_of(model)
    assert attnlib_diffusers.apply(model, method="sage", smooth_k=True) == n_attn
    try:
        m = metrics(run(model, inputs), native)
    finally:
        attnlib_diffusers.remove(model)
    assert attnlib_calls == ["sage"] * n_attn
    assert m["finite"] and m["cos_sim"] > SAGE_COS_MIN and m["rel_l1"] < SAGE_REL_L1_MAX, m
    assert_restored(model, inputs, native, before, classes)


def test_sla_within_contract(case, attnlib_calls):
    model, inputs, n_attn, native = case
    before, classes = processors(model), classes_of(model)
    assert attnlib_diffusers.apply(model, method="sla", **SLA_OPTIONS) == n_attn
    try:
        m = metrics(run(model, inputs), native)
    finally:
        attnlib_diffusers.remove(model)
    assert attnlib_calls == ["sla"] * n_attn
    assert m["finite"] and m["cos_sim"] > SLA_COS_MIN, m
    assert m["max_abs"] > 0, "sla with half the blocks on the linear branch should not be exact"
    assert_restored(model, inputs, native, before, classes)


def test_pipeline_components_and_reapply(attnlib_calls):
    wan, wan_in, n_wan = tiny_wan()
    flux, flux_in, n_flux = tiny_flux()
    untouched, _, _ = tiny_wan()  # same processor class and module, not part of the pipeline
    native = {"wan": run(wan, wan_in), "flux": run(flux, flux_in)}
    vae_like = attention_processor.Attention(query_dim=32, heads=2, dim_head=16)
    pipe = types.SimpleNamespace(transformer=wan, transformer_2=flux, vae=vae_like, scheduler=object())
    before = {"wan": processors(wan), "flux": processors(flux), "vae": processors(vae_like)}
    classes = {"wan": classes_of(wan), "flux": classes_of(flux), "vae": classes_of(vae_like)}

    assert attnlib_diffusers.apply(pipe, method="flash") == n_wan + n_flux
    assert attnlib_diffusers.apply(pipe, method="sage") == n_wan + n_flux  # re-apply replaces the method
    try:
        assert not is_switched(vae_like.processor)  # not a transformer/unet component
        run(wan, wan_in)
        run(flux, flux_in)
        assert attnlib_calls == ["sage"] * (n_wan + n_flux)
        attnlib_calls.clear()
        run(untouched, wan_in)  # its processors see the module-level router but are not routed
        assert attnlib_calls == []
    finally:
        assert attnlib_diffusers.remove(pipe) == n_wan + n_flux
    assert attnlib_diffusers.remove(pipe) == 0
    assert_restored(wan, wan_in, native["wan"], before["wan"], classes["wan"])
    assert_restored(flux, flux_in, native["flux"], before["flux"], classes["flux"])
    assert classes_of(vae_like) == classes["vae"]


@pytest.fixture
def key_masks_seen(monkeypatch):
    """The key_mask option of every call attnlib's dispatcher selects a kernel for (None: none)."""
    from attnlib import dispatch

    seen = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda inp, backend="auto": seen.append(
        inp.options.get("key_mask")) or real(inp, backend))
    return seen


def run_switched(model, inputs, method, **options):
    """The model's output with its attention on attnlib (apply ... remove around one run)."""
    attnlib_diffusers.apply(model, method=method, **options)
    try:
        return run(model, inputs)
    finally:
        attnlib_diffusers.remove(model)


def test_key_masks_run_on_attnlib_other_methods_leave_them_to_diffusers(attnlib_calls, caplog, key_masks_seen):
    """A 2-D (B, N) key mask (diffusers' convention; hiding prompt tokens from Flux's joint
    attention) runs on attnlib's flash kernels as key_mask, with native's answer; method sla
    takes no mask, so there diffusers' own backends serve the masked calls, bit for bit."""
    model, inputs, n_attn = tiny_flux()
    mask = torch.ones(1, 8 + 64, dtype=torch.bool)
    mask[:, 5:8] = False  # hide three text tokens
    inputs = dict(inputs, joint_attention_kwargs={"attention_mask": mask})
    native = run(model, inputs)
    out = run_switched(model, inputs, "flash")
    assert attnlib_calls == ["flash"] * n_attn
    assert len(key_masks_seen) >= n_attn and all(m is not None and torch.equal(m, mask) for m in key_masks_seen)
    assert_verbose_allclose(out, native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    attnlib_calls.clear()
    key_masks_seen.clear()
    with caplog.at_level("INFO", logger="attnlib"):
        out = run_switched(model, inputs, "sla", **SLA_OPTIONS)
    assert key_masks_seen == []
    assert torch.equal(out, native)
    assert "attn_mask" in caplog.text or any("attn_mask" in r for r in attnlib_sdpa._logged_reasons)


def test_hunyuan_video_padded_prompt_runs_on_attnlib(key_masks_seen):
    """HunyuanVideo's joint attention hides each prompt's padding with a (B, 1, 1, N) bool mask:
    those calls run on attnlib's flash kernels (as key_mask), with native's answer, for a batch
    of two prompts of different lengths."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    prompt_mask = torch.ones(2, 10, dtype=torch.long)
    prompt_mask[1, 6:] = 0  # the second prompt has 6 tokens
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 10, 32, generator=g), encoder_attention_mask=prompt_mask,
                  pooled_projections=torch.randn(2, 16, generator=g), guidance=torch.tensor([3000.0, 3000.0]),
                  return_dict=False)
    native = run(model, inputs)
    out = run_switched(model, inputs, "flash")
    keyed = [m for m in key_masks_seen if m is not None]
    assert len(keyed) >= 2 and all(tuple(m.shape) == (2, 2 * 4 * 4 + 10) for m in keyed)  # latent + prompt
    assert all(not m[1, -4:].any() and m[0].all() for m in keyed)  # the second prompt's padding is hidden
    assert_verbose_allclose(out, native, atol=FLASH_ATOL, rtol=FLASH_RTOL)


def test_ltx_video_cross_attention_prompt_mask_runs_on_attnlib(key_masks_seen):
    """LTX-Video's cross-attention hides each prompt's padding with an additive mask that
    Attention.prepare_attention_mask repeats per head, (B, H, 1, N): those calls run on attnlib's
    flash kernels as a per-head key_mask, with native's answer, for two prompts of different
    lengths."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, caption_channels=24).eval()
    g = torch.Generator().manual_seed(2)
    prompt_mask = torch.ones(2, 9, dtype=torch.long)
    prompt_mask[1, 5:] = 0  # the second prompt has 5 tokens
    inputs = dict(hidden_states=torch.randn(2, 2 * 4 * 4, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 9, 24, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_attention_mask=prompt_mask, num_frames=2, height=4, width=4, return_dict=False)
    native = run(model, inputs)
    out = run_switched(model, inputs, "flash")
    keyed = [m for m in key_masks_seen if m is not None]
    assert keyed and all(tuple(m.shape) == (2, 2, 9) for m in keyed)  # per head; the self-attention has none
    assert all((m[1, :, 5:] <= -1e4).all() and (m[1, :, :5] == 0).all() and (m[0] == 0).all() for m in keyed)
    assert_verbose_allclose(out, native, atol=FLASH_ATOL, rtol=FLASH_RTOL)


def test_torch_compile_traces_the_routed_processors(attnlib_calls):
    model, inputs, n_attn = tiny_flux()
    native = run(model, inputs)
    attnlib_diffusers.apply(model, method="sla", **SLA_OPTIONS)
    try:
        eager = run(model, inputs)
        torch._dynamo.reset()
        compiled = run(torch.compile(model, backend="eager"), inputs)
    finally:
        attnlib_diffusers.remove(model)
        torch._dynamo.reset()
    assert attnlib_calls == ["sla"] * (2 * n_attn)
    assert not torch.equal(eager, native)  # routed, not the native path
    assert_verbose_allclose(compiled, eager, atol=FLASH_ATOL, rtol=FLASH_RTOL)


def test_compiled_fullgraph_masked_call(monkeypatch):
    """A key-masked call (attnlib's flash with key_mask) compiles with fullgraph=True, with
    native's answer; the once-per-reason INFO log of what goes to diffusers is skipped while
    tracing."""
    model, inputs, _ = tiny_flux()
    mask = torch.ones(1, 8 + 64, dtype=torch.bool)
    mask[:, 5:8] = False
    masked = dict(inputs, joint_attention_kwargs={"attention_mask": mask})
    native = run(model, masked)
    monkeypatch.setattr(attnlib_diffusers, "_logged", set())
    attnlib_diffusers.apply(model, method="flash")
    try:
        torch._dynamo.reset()
        compiled = run(torch.compile(model, backend="eager", fullgraph=True), masked)
    finally:
        attnlib_diffusers.remove(model)
        torch._dynamo.reset()
    assert_verbose_allclose(compiled, native, atol=1e-6, rtol=1e-6)


def test_legacy_attention_processor_via_functional(attnlib_calls):
    """Legacy diffusers Attention (UNets, VAEs) calls F.scaled_dot_product_attention in its module."""
    torch.manual_seed(0)
    attn = attention_processor.Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24).eval()
    proc = attn.processor
    x, ctx = torch.randn(2, 20, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        native = attn(x, encoder_hidden_states=ctx)
        assert attnlib_diffusers.apply(attn, method="flash") == 1
        try:
            assert is_switched(attn.processor)
            out = attn(x, encoder_hidden_states=ctx)
            assert attnlib_calls == ["flash"]
        finally:
            attnlib_diffusers.remove(attn)
        assert attn.processor is proc and type(proc) is attention_processor.AttnProcessor2_0
        assert_verbose_allclose(out, native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
        assert torch.equal(attn(x, encoder_hidden_states=ctx), native)


def test_processors_that_attend_in_a_module_helper_are_routed(attnlib_calls):
    """Flux2's KV-cache processors call attention in a module-level function
    (_flux2_kv_causal_attention), not in __call__: apply() used to count them as switched while
    every such call stayed native, without a word."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.models.transformers import transformer_flux2

    helper = transformer_flux2._flux2_kv_causal_attention
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                    timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()
    model.transformer_blocks[0].attn.set_processor(transformer_flux2.Flux2KVAttnProcessor())
    model.single_transformer_blocks[0].attn.set_processor(transformer_flux2.Flux2KVParallelSelfAttnProcessor())
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 20, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 6, 24, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.randn(20, 4, generator=g), txt_ids=torch.zeros(6, 4),
                  guidance=torch.tensor([3.0]), return_dict=False)
    extract = dict(inputs, kv_cache_mode="extract", num_ref_tokens=4)

    def both_modes():
        with torch.no_grad():
            out, cache = model(**extract)
            return out, model(**dict(inputs, kv_cache_mode="cached", kv_cache=cache))[0]

    native = both_modes()
    assert attnlib_diffusers.apply(model, method="flash") == 2
    try:
        routed = both_modes()
        # extract: (text + image, reference) per block; cached: one call per block
        assert attnlib_calls == ["flash"] * 6
    finally:
        attnlib_diffusers.remove(model)
    assert transformer_flux2._flux2_kv_causal_attention is helper  # the module itself is untouched
    for got, want in zip(routed, native):
        assert_verbose_allclose(got, want, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    assert all(torch.equal(a, b) for a, b in zip(both_modes(), native))


def test_modules_attending_outside_a_processor_are_named(caplog, monkeypatch):
    """Mochi's attention pool calls SDPA in its own forward: apply() cannot switch it, and says so
    (once, at INFO) instead of leaving those calls on torch without a word."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=24, time_embed_dim=8,
                                    max_sequence_length=8).eval()
    monkeypatch.setattr(attnlib_diffusers, "_logged", set())
    with caplog.at_level("INFO", logger="attnlib"):
        assert attnlib_diffusers.apply(model, method="flash") == 1
    attnlib_diffusers.remove(model)
    assert "module MochiAttentionPool (x1) left as is" in caplog.text
    assert "MochiAttention " not in caplog.text  # the processor's module is switched, not named


def test_bad_arguments_switch_nothing():
    model, _, _ = tiny_flux()
    before = processors(model)
    with pytest.raises(ValueError, match="method"):
        attnlib_diffusers.apply(model, method="nope")
    with pytest.raises(ValueError, match="method"):
        attnlib_diffusers.apply(model, method="block_sparse")  # needs a per-shape block mask
    with pytest.raises(TypeError, match="unknown option"):
        attnlib_diffusers.apply(model, method="sage", critical=0.5)
    # option values too, at apply() rather than at the first forward
    with pytest.raises(ValueError, match="critical"):
        attnlib_diffusers.apply(model, method="sla", critical=5.0)
    with pytest.raises(ValueError, match="critical \\+ negligible"):
        attnlib_diffusers.apply(model, method="sla", critical=0.7, negligible=0.7)
    with pytest.raises(ValueError, match="pv"):
        attnlib_diffusers.apply(model, method="sage", pv="bad")
    with pytest.raises(TypeError, match="proj_weight"):
        attnlib_diffusers.apply(model, method="sla", proj_weight="x")
    with pytest.raises(TypeError, match="pipeline"):
        attnlib_diffusers.apply(types.SimpleNamespace(vae=model), method="flash")
    with pytest.raises(ValueError, match="no attention module"):
        attnlib_diffusers.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), method="flash")
    assert processors(model) == before and not any(map(is_switched, before.values()))


def test_unsupported_diffusers_version_is_refused(monkeypatch):
    model, _, _ = tiny_flux()
    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"supports diffusers 0\.42\.x, found 0\.99\.0"):
        attnlib_diffusers.apply(model)
    assert not any(map(is_switched, processors(model).values()))


def _bshd_qkv():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(1, 8, 2, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_dispatch_router_leaves_what_attnlib_refuses_to_diffusers(scale):
    """A scale torch computes but attnlib refuses: diffusers' own dispatch serves it (so a backend set
    with set_attention_backend still applies), with the bshd tensors it was called with."""
    from diffusers.models import attention_dispatch
    seen = []

    def original(query, *args, **kwargs):
        seen.append(query.shape)
        return attention_dispatch.dispatch_attention_fn(query, *args, **kwargs)

    def torch_bshd(q, k, v, scale):
        return attnlib_sdpa.TORCH_SDPA(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       scale=scale).transpose(1, 2)

    router = attnlib_diffusers._dispatch_router(original, attnlib_diffusers._Route("flash", "auto"))
    q, k, v = _bshd_qkv()
    assert_verbose_allclose(router(q, k, v, scale=scale), torch_bshd(q, k, v, scale), atol=1e-6, rtol=1e-5)
    assert seen == [q.shape]
    assert_verbose_allclose(router(q, k, v, scale=0.3), torch_bshd(q, k, v, 0.3), atol=2e-6, rtol=1e-5)
    assert seen == [q.shape]  # a scale attnlib serves stays with attnlib


@pytest.mark.parametrize("kw", [dict(scale=0.0), dict(scale=-0.5), dict(dropout_p=0.0, is_causal=False)])
def test_functional_router_computes_what_torch_computes(kw):
    router = attnlib_diffusers._functional_router(torch.nn.functional, attnlib_diffusers._Route("flash", "auto"))
    q, k, v = (t.transpose(1, 2) for t in _bshd_qkv())
    assert_verbose_allclose(router.scaled_dot_product_attention(q, k, v, **kw), attnlib_sdpa.TORCH_SDPA(q, k, v, **kw),
                            atol=2e-6, rtol=1e-5)
    if TORCH_CPU_SDPA_DIES_ON_ZERO_HEADS:
        return
    empty = q[:, :0]  # zero heads: torch returns an empty result
    assert router.scaled_dot_product_attention(empty, empty, empty, **kw).shape == empty.shape


# --------------------------------------------------------------------------- pickling, deepcopy, set_attn_processor

def shadow_modules():
    return [m for m in sys.modules if m.startswith(attnlib_diffusers.__name__ + ".")]


def fresh_inputs(inputs, seed):
    """The model's inputs with new random activations (ids, timestep and flags kept)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if k in ("hidden_states", "encoder_hidden_states") else v
            for k, v in inputs.items()}


def attention_module_classes(model):
    return {name: type(m) for name, m in model.named_modules() if hasattr(m, "set_processor")}


def pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpickled(data):
    return torch.load(io.BytesIO(data), weights_only=False)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fresh_process", [False, True], ids=["same_process", "fresh_process"])
def test_torch_save_load_keeps_the_model_on_attnlib(name, fresh_process, attnlib_calls, monkeypatch):
    """torch.save(model) after apply() used to raise PicklingError (the routed processor classes are
    made at run time and cannot be looked up by name). The loaded model routes through attnlib and
    computes what the saved one did."""
    model, inputs, n_attn = MODELS[name]()
    module_classes = attention_module_classes(model)
    assert attnlib_diffusers.apply(model, method="sla", **SLA_OPTIONS) == n_attn
    x = fresh_inputs(inputs, seed=7)
    routed_out = run(model, x)
    data = pickled(model)
    if fresh_process:  # nothing of the saving process left: the loader builds the routed classes again
        assert attnlib_diffusers.remove(model) == n_attn
        del model
        monkeypatch.setattr(attnlib_diffusers, "_routed_classes", weakref.WeakValueDictionary())
        assert shadow_modules() == []
    attnlib_calls.clear()
    loaded = unpickled(data)
    try:
        procs = processors(loaded)
        assert len(procs) == n_attn and all(map(is_switched, procs.values()))
        for p in procs.values():  # registered where torch.compile looks the routed globals up
            assert sys.modules[type(p)._attnlib_shadow.__name__] is type(p)._attnlib_shadow
        out = run(loaded, x)
        assert attnlib_calls == ["sla"] * n_attn
        assert torch.equal(out, routed_out)
    finally:
        assert attnlib_diffusers.remove(loaded) == n_attn
        if not fresh_process:
            assert attnlib_diffusers.remove(model) == n_attn
    assert shadow_modules() == []
    assert attention_module_classes(loaded) == module_classes
    assert not any(map(is_switched, processors(unpickled(pickled(loaded))).values()))


def test_deepcopy_and_state_dict_after_apply(attnlib_calls):
    model, inputs, n_attn = tiny_flux()
    native = run(model, inputs)
    attnlib_diffusers.apply(model, method="sla", **SLA_OPTIONS)
    routed = run(model, inputs)
    twin = copy.deepcopy(model)
    assert model.state_dict().keys() == twin.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert all(is_switched(p) and p is not processors(model)[n] for n, p in processors(twin).items())
    attnlib_calls.clear()
    assert torch.equal(run(twin, inputs), routed)
    assert attnlib_calls == ["sla"] * n_attn
    assert attnlib_diffusers.remove(model) == n_attn
    assert shadow_modules()  # still used by the copy
    attnlib_calls.clear()
    assert torch.equal(run(twin, inputs), routed) and attnlib_calls == ["sla"] * n_attn
    assert attnlib_diffusers.remove(twin) == n_attn
    assert shadow_modules() == []
    assert torch.equal(run(model, inputs), native) and torch.equal(run(twin, inputs), native)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_set_attn_processor_after_apply_undoes_it(name, attnlib_calls):
    """Replacing processors with diffusers' set_attn_processor used to leave the replaced processors
    switched and their shadow modules in sys.modules."""
    model, inputs, n_attn = MODELS[name]()
    native = run(model, inputs)
    before, classes = processors(model), classes_of(model)
    module_classes = attention_module_classes(model)
    assert attnlib_diffusers.apply(model, method="flash") == n_attn
    saved = model.attn_processors
    model.set_attn_processor({k: type(p)._attnlib_original_class() for k, p in saved.items()})
    assert shadow_modules() == []
    assert not any(map(is_switched, before.values())) and classes_of(model) == classes
    assert attention_module_classes(model) == module_classes
    assert torch.equal(run(model, inputs), native) and attnlib_calls == []
    model.set_attn_processor(saved)  # the processors apply() switched, put back: native now
    assert processors(model) == before and classes_of(model) == classes
    assert torch.equal(run(model, inputs), native) and attnlib_calls == []

    assert attnlib_diffusers.apply(model, method="flash") == n_attn  # and apply works again
    try:
        assert_verbose_allclose(run(model, inputs), native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
        assert attnlib_calls == ["flash"] * n_attn
    finally:
        assert attnlib_diffusers.remove(model) == n_attn
    assert attnlib_diffusers.remove(model) == 0
    attnlib_calls.clear()
    assert_restored(model, inputs, native, before, classes)
    assert attention_module_classes(model) == module_classes and attnlib_calls == []


def test_set_processor_on_legacy_attention_after_apply():
    attn = attention_processor.Attention(query_dim=32, heads=2, dim_head=16).eval()
    proc = attn.processor
    attnlib_diffusers.apply(attn, method="flash")
    assert shadow_modules() and type(attn) is not attention_processor.Attention
    attn.set_processor(attention_processor.AttnProcessor())
    assert shadow_modules() == []
    assert type(attn) is attention_processor.Attention and type(proc) is attention_processor.AttnProcessor2_0
    assert attnlib_diffusers.remove(attn) == 0


def test_models_without_apply_pickle_as_before():
    model, inputs, _ = tiny_flux()
    classes, module_classes = classes_of(model), attention_module_classes(model)
    loaded = unpickled(pickled(model))
    twin = copy.deepcopy(model)
    for m in (model, loaded, twin):
        assert classes_of(m) == classes and attention_module_classes(m) == module_classes
    assert shadow_modules() == []
    assert torch.equal(run(loaded, inputs), run(model, inputs))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_set_attn_processor_round_trip_keeps_attnlib(name, attnlib_calls):
    """diffusers' PAG pipelines save model.attn_processors, assign their own processor to a few
    modules, and put the saved ones back after every call: the model must stay on attnlib. apply()
    switches processors in place, so processors saved *before* apply() are the same objects and
    putting them back does not undo it either (the module docstring says why); remove() does."""
    model, inputs, n_attn = MODELS[name]()
    native = run(model, inputs)
    before, classes = processors(model), classes_of(model)
    saved_before = model.attn_processors
    assert attnlib_diffusers.apply(model, method="flash") == n_attn
    saved = model.attn_processors
    assert all(p is saved_before[n] for n, p in saved.items())
    name0, module0 = next((n, m) for n, m in model.named_modules() if hasattr(m, "set_processor"))
    module0.processor = type(module0.processor)._attnlib_original_class()  # as PAG assigns its own
    run(model, inputs)
    assert attnlib_calls == ["flash"] * (n_attn - 1)
    model.set_attn_processor(saved)
    assert all(map(is_switched, processors(model).values()))
    attnlib_calls.clear()
    assert_verbose_allclose(run(model, inputs), native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    assert attnlib_calls == ["flash"] * n_attn
    model.set_attn_processor(saved_before)  # the same objects: still on attnlib
    assert all(map(is_switched, processors(model).values()))
    assert attnlib_diffusers.remove(model) == n_attn
    attnlib_calls.clear()
    assert_restored(model, inputs, native, before, classes)
    assert attnlib_calls == []


def test_sdpa_kernel_math_leaves_the_calls_to_diffusers(monkeypatch):
    """sdpa_kernel(SDPBackend.MATH) around a model apply() switched: torch's math path, through
    diffusers' own dispatch (attnlib's flash stood in for it before)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnlib.testing import spy_attnlib_calls

    served = spy_attnlib_calls(monkeypatch)
    model, inputs, n_attn = tiny_flux()
    with sdpa_kernel(SDPBackend.MATH):
        native = run(model, inputs)
    attnlib_diffusers.apply(model, method="flash")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out = run(model, inputs)
        assert served == [] and torch.equal(out, native)
        run(model, inputs)
        assert served == ["flash"] * n_attn
    finally:
        attnlib_diffusers.remove(model)


def test_set_default_attn_processor_after_apply_on_a_unet(attnlib_calls):
    """UNets and VAEs check ``proc.__class__ in CROSS_ATTENTION_PROCESSORS`` in
    set_default_attn_processor, which raised ValueError after apply() (the routed subclass is not in
    that set); it must replace the processors and so undo apply()."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g), return_dict=False)
    native = run(unet, inputs)
    n_attn = attnlib_diffusers.apply(unet, method="flash")
    assert n_attn == len(unet.attn_processors)
    assert_verbose_allclose(run(unet, inputs), native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    assert attnlib_calls == ["flash"] * n_attn
    for p in processors(unet).values():  # __class__ reads as the original class, type() is the routed one
        assert p.__class__ is attention_processor.AttnProcessor2_0 and is_switched(p)
    unet.set_default_attn_processor()
    assert {type(p) for p in processors(unet).values()} == {attention_processor.AttnProcessor}
    assert shadow_modules() == [] and attnlib_diffusers.remove(unet) == 0
    attnlib_calls.clear()
    assert_verbose_allclose(run(unet, inputs), native, atol=FLASH_ATOL, rtol=FLASH_RTOL)
    assert attnlib_calls == []


def test_every_pickle_protocol_keeps_the_model_on_attnlib():
    """Protocols 0 and 1 reduce an object by its __class__, which a routed processor reads as its
    original class: the reduction must still be recognised as the routed class's."""
    import pickle

    model, _, n_attn = tiny_flux()
    attnlib_diffusers.apply(model, method="flash")
    try:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            loaded = pickle.loads(pickle.dumps(model, protocol=protocol))
            assert all(map(is_switched, processors(loaded).values())), protocol
            assert attnlib_diffusers.remove(loaded) == n_attn
    finally:
        attnlib_diffusers.remove(model)
    assert shadow_modules() == []
