"""fastpeft.patch_peft_model on real PEFT models: the logits and gradients PEFT itself computes, the
fused op really running, PEFT's features intact, bitsandbytes' CPU repack handled, bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft.peft_patch import is_patched

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*lora_bias=True.*"),
    pytest.mark.filterwarnings("ignore:.*gemv_4bit. an autograd kernel.*:UserWarning"),
]

VARIANTS = ("lora", "rslora", "dora", "lora_bias", "dropout")


def lora_config(kit, variant: str = "lora", **kw) -> peft.LoraConfig:
    kw.setdefault("target_modules", kit.LLAMA_LINEARS)
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
        lora_bias=variant == "lora_bias",
        lora_dropout=0.1 if variant == "dropout" else 0.0,
        init_lora_weights=False,
        **kw,
    )


def train_step(kit, model, ids: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every gradient of one training forward/backward (same dropout masks for all models)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), kit.grads_by_name(model)


def assert_same_step(kit, model, reference, ids: torch.Tensor, atol: float = 1e-5) -> None:
    logits, grads = train_step(kit, model, ids)
    want_logits, want_grads = train_step(kit, reference, ids)
    torch.testing.assert_close(logits, want_logits, atol=atol, rtol=1e-5)
    assert grads and grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def forward_calls(kit, model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        return kit.fused_op_calls(lambda: model(input_ids=ids))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, peft_kit):
    """A saved tiny Llama for the bitsandbytes 4-bit loads."""
    path = tmp_path_factory.mktemp("llama")
    peft_kit.tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_patched_equals_peft(peft_kit, variant):
    model = peft.get_peft_model(peft_kit.tiny_llama(), lora_config(peft_kit, variant))
    peft_kit.randomize_lora(model)
    reference = copy.deepcopy(model)
    assert fastpeft.patch_peft_model(model) is model
    report = model.fastpeft_patch_report
    assert len(report.patched) == 14 and not report.skipped and "14 of 14" in str(report)
    ids = peft_kit.token_ids()
    model.train()
    assert peft_kit.fused_op_calls(lambda: model(input_ids=ids)) == 14  # one fused call per layer
    assert peft_kit.fused_op_calls(lambda: reference(input_ids=ids)) == 0
    assert_same_step(peft_kit, model, reference, ids)


NF4_CASES = [(dq, repack, "lora") for dq in (True, False) for repack in ("never", "before_peft", "after_peft")]
NF4_CASES += [(True, "never", "dora"), (False, "after_peft", "dora")]


@pytest.mark.parametrize("double_quant,repack,variant", NF4_CASES)
def test_nf4_patched_equals_peft(peft_kit, llama_dir, variant, repack, double_quant):
    """NF4 ± double quant, with bnb's CPU repack before wrapping, after wrapping, or never. After a
    repack the reference is unpatched PEFT on an untouched copy whose block scales are rounded to
    bf16 as bnb's repack rounds them (bnb's repacked CPU kernel itself computes in bf16 and passes
    no gradient to its input, so it cannot be the reference)."""
    ids = peft_kit.token_ids()
    config = lora_config(peft_kit, variant)
    base = peft_kit.load_4bit(llama_dir, double_quant)
    if repack == "before_peft":
        reference = peft.get_peft_model(peft_kit.bf16_scale_reference(base), copy.deepcopy(config))
        peft_kit.repack_like_bitsandbytes(base, ids)
        model = peft.get_peft_model(base, config)
    else:
        model = peft.get_peft_model(base, config)
    peft_kit.randomize_lora(model if repack != "before_peft" else reference)
    if repack == "before_peft":  # same adapter tensors in both (DoRA's init read the repacked bytes)
        lora_state = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
        assert not model.load_state_dict(lora_state, strict=False).unexpected_keys
    elif repack == "after_peft":
        reference = peft_kit.bf16_scale_reference(model)
        peft_kit.repack_like_bitsandbytes(model, ids)
    else:
        reference = peft_kit.no_repack(copy.deepcopy(model))
    fastpeft.patch_peft_model(model)
    assert not any(peft_kit.is_repacked(m) for m in peft_kit.linear4bits(model))
    assert forward_calls(peft_kit, model, ids) == 14
    assert not any(peft_kit.is_repacked(m) for m in peft_kit.linear4bits(model))  # kept
    assert_same_step(peft_kit, model, reference, ids)


def test_peft_features_keep_working(peft_kit, tmp_path):
    ids = peft_kit.token_ids()
    base = peft_kit.tiny_llama()
    plain = copy.deepcopy(base).eval()
    model = peft.get_peft_model(base, lora_config(peft_kit, modules_to_save=["lm_head"]))
    peft_kit.randomize_lora(model)
    fastpeft.patch_peft_model(model)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base_logits = plain(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
    with model.disable_adapter():
        assert forward_calls(peft_kit, model, ids) == 0  # PEFT's own forward: base layers only

    # save_pretrained is PEFT's: a plain PeftModel.from_pretrained reproduces the patched logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)

    # merge / unmerge: merged runs PEFT's base path, unmerged is fused again
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
    assert forward_calls(peft_kit, model, ids) == 0
    model.unmerge_adapter()
    assert forward_calls(peft_kit, model, ids) == 14

    # an adapter added after patching runs fused in the patched layers; set_adapter switches
    reference = peft.get_peft_model(copy.deepcopy(plain), lora_config(peft_kit, modules_to_save=["lm_head"]))
    reference.load_state_dict(model.state_dict())
    for target in (model, reference):
        target.add_adapter("second", lora_config(peft_kit, target_modules=["q_proj", "v_proj"]))
        target.set_adapter("second")
    peft_kit.randomize_lora(model, seed=3)
    reference.load_state_dict(model.state_dict())
    assert forward_calls(peft_kit, model, ids) == 4  # q_proj and v_proj of 2 blocks
    assert_same_step(peft_kit, model, reference, ids)
    model.set_adapter("default")
    reference.set_adapter("default")
    assert_same_step(peft_kit, model, reference, ids)  # modules_to_save copy of lm_head trains too
    assert "base_model.model.lm_head.modules_to_save.default.weight" in peft_kit.grads_by_name(model)

    # patching again is a no-op; unpatching gives PEFT's forward back
    fastpeft.patch_peft_model(model)
    assert forward_calls(peft_kit, model, ids) == 14
    fastpeft.unpatch_peft_model(model)
    assert forward_calls(peft_kit, model, ids) == 0 and not any(is_patched(m) for m in model.modules())
    assert_same_step(peft_kit, model, reference, ids)


def test_report_names_layers_that_stay_peft(peft_kit):
    config = lora_config(peft_kit, target_modules=[*peft_kit.LLAMA_LINEARS, "embed_tokens"])
    model = fastpeft.patch_peft_model(peft.get_peft_model(peft_kit.tiny_llama(), config))
    report = model.fastpeft_patch_report
    assert len(report.patched) == 14
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]
    assert "14 of 15" in str(report) and "1 not patched" in str(report)


def test_bad_input_one_line_errors(peft_kit):
    with pytest.raises(TypeError, match=r"expects a peft\.PeftModel") as err:
        fastpeft.patch_peft_model(peft_kit.tiny_llama())
    assert "\n" not in str(err.value)
    ia3 = peft.get_peft_model(
        peft_kit.tiny_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    with pytest.raises(ValueError, match="IA3 is not supported") as err:
        fastpeft.patch_peft_model(ia3)
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match=r"expects a peft\.PeftModel"):
        fastpeft.unpatch_peft_model(torch.nn.Linear(2, 2))


def test_prefix_tuning_runs_the_prefix_kernel_like_peft(peft_kit, monkeypatch):
    import fastpeft.kernels.prefix_attention as kernel
    import fastpeft.prefix_attention_hf as hf

    calls = []
    original = hf.prefix_attention
    monkeypatch.setattr(hf, "prefix_attention", lambda *a, **k: calls.append(a[3] is not None) or original(*a, **k))
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24
    )
    base = peft_kit.tiny_llama()
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, config)
    reference = copy.deepcopy(model)
    fastpeft.patch_peft_model(model)
    assert model.fastpeft_patch_report.prefix_attention
    assert model.get_base_model().config._attn_implementation == "fastpeft_prefix"
    ids = peft_kit.token_ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for target in (model, reference):
        target.train()
        target.zero_grad()
        out = target(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append((out.logits.detach(), peft_kit.grads_by_name(target)))
    assert calls == [True, True]  # both layers, each with its prefix
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=2e-5, rtol=1e-4)
    assert losses[0][1].keys() == losses[1][1].keys() and losses[0][1]
    for name, want in losses[1][1].items():
        torch.testing.assert_close(losses[0][1][name], want, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(
            model(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, atol=2e-5, rtol=1e-4
        )
    with torch.no_grad():  # generate: PEFT's cache path, our attention function as plain attention
        greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(
            model.generate(input_ids=ids[1:], **greedy), reference.eval().generate(input_ids=ids[1:], **greedy)
        )
    fastpeft.unpatch_peft_model(model)
    assert model.get_base_model().config._attn_implementation != "fastpeft_prefix"
    assert kernel.prefix_attention is not None


def test_prefix_tuning_on_unsupported_architecture_is_refused(lm):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = peft.get_peft_model(lm.build("gpt2"), config)
    with pytest.raises(ValueError, match="gpt2") as err:
        fastpeft.patch_peft_model(model)
    assert "\n" not in str(err.value)


@pytest.mark.triton
def test_nf4_patched_runs_triton_kernels_in_interpreter(peft_kit, llama_dir):
    ids = peft_kit.token_ids(batch=1, seq=5)
    model = peft.get_peft_model(peft_kit.load_4bit(llama_dir, True), lora_config(peft_kit))
    peft_kit.randomize_lora(model)
    reference = peft_kit.no_repack(copy.deepcopy(model)).eval()
    fastpeft.patch_peft_model(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_base_with_fp32_adapters(peft_kit, autocast):
    """PEFT keeps adapters in fp32 on a bf16 base: the fused op computes in one dtype (bf16, or the
    autocast dtype), within bf16 rounding of PEFT's mixed-precision result."""
    base = peft_kit.tiny_llama().to(torch.bfloat16)
    model = peft.get_peft_model(base, lora_config(peft_kit))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    peft_kit.randomize_lora(model)
    reference = copy.deepcopy(model)
    fastpeft.patch_peft_model(model)
    ids = peft_kit.token_ids()
    outs = []
    for target in (model, reference):
        target.train()
        target.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = target(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.float().detach(), peft_kit.grads_by_name(target)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=5e-2, rtol=5e-2)
    for name, want in outs[1][1].items():
        got = outs[0][1][name]
        assert got.dtype == want.dtype == torch.float32  # fp32 adapters keep fp32 gradients
        assert (got - want).norm() <= 5e-2 * want.norm() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 40)])  # the decode kernel (M <= 16) and the training path
def test_nf4_patched_on_cuda_equals_peft(peft_kit, llama_dir, batch, seq):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    model = peft.get_peft_model(base, lora_config(peft_kit))
    peft_kit.randomize_lora(model)
    reference = copy.deepcopy(model)
    fastpeft.patch_peft_model(model)
    ids = peft_kit.token_ids(batch=batch, seq=seq).cuda()
    results = []
    for target in (model, reference):
        target.train()
        target.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            out = target(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.float().detach(), peft_kit.grads_by_name(target)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=6e-2, rtol=6e-2)
    for name, want in results[1][1].items():
        assert (results[0][1][name] - want).norm() <= 6e-2 * want.norm() + 1e-6, name


@pytest.mark.slow
def test_patched_peft_model_compiles_without_graph_breaks(peft_kit):
    """torch.compile traces the patched forwards (one block, q/v on NF4 and dense bases) without a
    single graph break: the fused path is the fastpeft:: custom ops, which Dynamo does not enter."""
    import bitsandbytes as bnb

    torch._dynamo.reset()
    model = peft_kit.tiny_llama(num_hidden_layers=1)
    attention = model.model.layers[0].self_attn
    q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(attention.q_proj.weight.data.clone(), requires_grad=False, quant_type="nf4")
    attention.q_proj = peft_kit.no_repack(q.to("cpu"))
    model.is_loaded_in_4bit = True  # so PEFT wraps the Linear4bit in its 4-bit LoRA layer
    model = fastpeft.patch_peft_model(
        peft.get_peft_model(model, lora_config(peft_kit, target_modules=["q_proj", "v_proj"]))
    )
    assert len(model.fastpeft_patch_report.patched) == 2
    ids = peft_kit.token_ids(batch=1, seq=4)
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
