"""AdaLoRA: fused forward and gradients (incl. E) vs float64, schedule / EMA / masking / orthogonal
penalty vs hand-computed values, and PEFT 0.21 parity (training with pruning, files both ways)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastpeft import LoraConfig, LoRALinear, inject, load_adapter, save_adapter
from fastpeft.adalora import (
    AdaLoraAdapter,
    AdaLoraSettings,
    RankAllocator,
    orthogonal_regularization,
    update_and_allocate,
)
from fastpeft.qlora_linear import QLoRALinear

peft = pytest.importorskip("peft")
# PEFT warns about its own AdaLoRA files too: a fully pruned layer's zero-size tensors, and
# rank_pattern keys (".lora_E") that its generic LoRA rank_pattern check does not recognise
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
]

TARGETS = ["q_proj", "v_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=7, deltaT=1)


def _config(**settings) -> LoraConfig:
    return LoraConfig(lora_alpha=8, target_modules=TARGETS, variant="adalora", variant_config={**SCHEDULE, **settings})


def _layer(in_f: int, out_f: int, r: int, dtype=torch.float32, nf4: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, dtype=dtype)
    layer = QLoRALinear.quantize_linear(linear) if nf4 else LoRALinear.wrap(linear)
    layer.add_adapter("default", r, 5.0, variant="adalora", init_lora_weights=False)
    return layer


# -- forward and gradients -----------------------------------------------------------------------

TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def _check_against_float64(layer, x, tol):
    adapter = layer.adapters["default"]
    params = [adapter.lora_A, adapter.lora_E, adapter.lora_B]
    x = x.requires_grad_(True)
    grad_y = torch.randn(x.shape[0], layer.out_features, dtype=x.dtype)
    y = layer(x)
    y.backward(grad_y)

    w = layer.dense_weight(torch.float32).double()
    x64 = x.detach().double().requires_grad_(True)
    a, e, b = (p.detach().double().requires_grad_(True) for p in params)
    s = 5.0 / (adapter.r + 1e-5)  # PEFT's alpha / (ranknum + 1e-5)
    y64 = x64 @ w.t() + layer.bias.double() + s * (x64 @ (a * e).t()) @ b.t()
    y64.backward(grad_y.double())
    atol, rtol = tol
    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
    for got, want in zip([x.grad, *(p.grad for p in params)], [x64.grad, a.grad, e.grad, b.grad]):
        assert got is not None and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol * 10, rtol=rtol * 10)
    assert adapter.lora_E.grad.abs().sum() > 0  # the gradient reaches E through A ⊙ E


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("m,in_f,out_f,r", [(1, 13, 7, 3), (3, 24, 17, 5), (17, 9, 33, 1)])
def test_forward_and_grads_match_float64(m, in_f, out_f, r, dtype):
    layer = _layer(in_f, out_f, r, dtype, seed=m)
    _check_against_float64(layer, torch.randn(m, in_f, dtype=dtype), TOLERANCES[dtype])


def test_nf4_base_forward_and_grads():
    layer = _layer(64, 24, 4, nf4=True)
    _check_against_float64(layer, torch.randn(5, 64), (2e-5, 2e-5))


@pytest.mark.triton
@pytest.mark.parametrize("m", [3, 17])  # decode kernel (M <= 16) and the training path
def test_triton_path_grads_match_float64(m):
    layer = _layer(32, 16, 3, seed=m)
    _check_against_float64(layer, torch.randn(m, 32), (1e-4, 1e-4))


def test_merge_unmerge_and_scaling():
    layer = _layer(11, 6, 3)
    x = torch.randn(4, 11)
    w0, y = layer.weight.detach().clone(), layer(x)
    assert layer.scaling == pytest.approx(5.0 / (3 + 1e-5))
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)


def test_injection_leaves_outputs_unchanged(lm):
    model, ids = lm.build("llama"), lm.ids()
    before = lm.logits(model, ids)
    inject(model, _config())
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert isinstance(adapter, AdaLoraAdapter) and adapter.r == 4
    assert torch.equal(adapter.lora_E, torch.zeros(4, 1)) and 0.005 < adapter.lora_A.std() < 0.05
    torch.testing.assert_close(lm.logits(model, ids), before)


# -- schedule, importance, masking, orthogonal penalty --------------------------------------------


def _allocator(n_layers: int, r: int, **settings) -> RankAllocator:
    adapters = {f"layer{i}": AdaLoraAdapter(4, 3, r, 1.0, init_lora_weights=False) for i in range(n_layers)}
    return RankAllocator(adapters, AdaLoraSettings(init_r=r, **settings))


def test_budget_follows_cubic_schedule():
    alloc = _allocator(2, 6, target_r=2, tinit=2, tfinal=3, total_step=15, deltaT=2)
    assert (alloc.init_budget, alloc.target_budget) == (12, 4)
    # b(t) = floor(8·(1 − (t − 2)/10)³ + 4), masking when t % 2 == 0 inside the cubic phase
    expected = {
        0: (12, False),
        2: (12, False),
        3: (9, False),
        4: (8, True),
        7: (5, False),
        11: (4, False),
        12: (4, True),
        13: (4, True),
        15: (4, True),
    }
    assert {t: alloc.budget_schedule(t) for t in expected} == expected


def test_importance_ema_hand_computed():
    alloc = _allocator(1, 2, target_r=1, total_step=10, beta1=0.8, beta2=0.9)
    adapter = alloc.adapters["layer0"]
    with torch.no_grad():
        adapter.lora_A.fill_(2.0)
        adapter.lora_B.fill_(1.0)
        adapter.lora_E.copy_(torch.tensor([[2.0], [-1.0]]))
    adapter.lora_A.grad = torch.full((2, 4), 0.5)  # I = 1
    adapter.lora_B.grad = torch.full((3, 2), -1.0)  # I = 1
    adapter.lora_E.grad = torch.tensor([[0.25], [1.0]])  # I = [0.5, 1]
    alloc.update_importance()
    key = ("layer0", "lora_A")
    # Ī = 0.2·1 = 0.2; Ū = 0.1·|1 − 0.2| = 0.08
    torch.testing.assert_close(alloc.exp_avg_ipt[key], torch.full((2, 4), 0.2))
    torch.testing.assert_close(alloc.exp_avg_unc[key], torch.full((2, 4), 0.08))
    # E: Ī = [0.1, 0.2], Ū = [0.04, 0.08] -> S_E = [0.004, 0.016]; S_A = S_B = 0.016 per entry
    torch.testing.assert_close(alloc.triplet_scores()["layer0"], torch.tensor([0.004 + 0.032, 0.016 + 0.032]))
    adapter.lora_A.grad = torch.full((2, 4), -1.0)  # I = 2
    alloc.update_importance()
    # Ī = 0.8·0.2 + 0.2·2 = 0.56; Ū = 0.9·0.08 + 0.1·|2 − 0.56| = 0.216
    torch.testing.assert_close(alloc.exp_avg_ipt[key], torch.full((2, 4), 0.56))
    torch.testing.assert_close(alloc.exp_avg_unc[key], torch.full((2, 4), 0.216))


def test_masking_keeps_exactly_the_budget():
    alloc = _allocator(3, 5, target_r=1, total_step=10)
    generator = torch.Generator().manual_seed(0)
    for path, adapter in alloc.adapters.items():
        for name in ("lora_A", "lora_B", "lora_E"):
            shape = getattr(adapter, name).shape
            alloc.exp_avg_ipt[(path, name)] = torch.rand(shape, generator=generator) + 0.1
            alloc.exp_avg_unc[(path, name)] = torch.rand(shape, generator=generator) + 0.1
    scores = torch.cat(list(alloc.triplet_scores().values()))
    for budget in (13, 9, 4):
        with torch.no_grad():
            for adapter in alloc.adapters.values():
                adapter.lora_E.copy_(torch.rand(5, 1, generator=generator) + 0.5)
        pattern = alloc.mask_to_budget(budget)
        kept = torch.cat([a.lora_E.view(-1) != 0 for a in alloc.adapters.values()])
        assert int(kept.sum()) == budget == sum(sum(m) for m in pattern.values())
        assert set(kept.nonzero().view(-1).tolist()) == set(scores.topk(budget).indices.tolist())


def test_orthogonal_regularization_hand_computed():
    layers = nn.ModuleList(LoRALinear.wrap(nn.Linear(3, 2)) for _ in range(2))
    for layer in layers:
        layer.add_adapter("default", 2, 1.0, variant="adalora")
    values = [  # (A, B): ‖AAᵀ − I‖, ‖BᵀB − I‖
        ([[1, 0, 0], [0, 2, 0]], [[1, 1], [0, 1]]),  # diag(0, 3) -> 3; [[0, 1], [1, 1]] -> √3
        ([[1, 1, 0], [0, 0, 0]], [[1, 0], [0, 1]]),  # diag(1, −1) -> √2; 0 -> 0
    ]
    with torch.no_grad():
        for layer, (a, b) in zip(layers, values):
            layer.adapters["default"].lora_A.copy_(torch.tensor(a, dtype=torch.float32))
            layer.adapters["default"].lora_B.copy_(torch.tensor(b, dtype=torch.float32))
    total = 3 + math.sqrt(3) + math.sqrt(2)
    mean = orthogonal_regularization(layers, "default", weight=0.5)
    assert mean.item() == pytest.approx(0.5 * total / 4, rel=1e-6)
    assert orthogonal_regularization(layers, "default", weight=0.5, reduction="sum").item() == pytest.approx(
        0.5 * total, rel=1e-6
    )
    mean.backward()
    assert layers[0].adapters["default"].lora_A.grad.abs().sum() > 0


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"total_step": None}, "total_step"),
        ({"tinit": 5, "tfinal": 2}, "no budgeting phase"),
        ({"target_r": 9}, "target_r"),
        ({"deltaT": 0}, "deltaT"),
        ({"beta1": 1.0}, "beta1"),
        ({"orth_reg_weight": -1}, "orth_reg_weight"),
        ({"tinitt": 1}, "unknown keys"),
        ({"rank_pattern": {"x.lora_E": [True]}}, "rank_pattern entry"),
    ],
)
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        _config(**settings)


def test_config_init_r_sets_r_and_rslora_refused():
    assert _config(init_r=6).r == 6
    config = LoraConfig(r=5, variant="adalora", variant_config={"total_step": 3, "target_r": 2})
    assert config.variant_config["init_r"] == 5
    with pytest.raises(ValueError, match="use_rslora"):
        LoraConfig(variant="adalora", use_rslora=True, variant_config={"total_step": 3})


# -- PEFT parity --------------------------------------------------------------------------------------


def _train(model, step_fn, ids, steps):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        loss = step_fn(model, ids)
        loss.backward()
        optimizer.step()
        yield step
        optimizer.zero_grad()


def test_training_and_files_match_peft(lm, tmp_path):
    ids = lm.ids(batch=2, seq=6)
    peft_config = peft.AdaLoraConfig(lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **SCHEDULE)
    theirs = peft.get_peft_model(lm.build("llama"), peft_config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in theirs.named_parameters():
            if "lora_E" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    theirs.save_pretrained(tmp_path / "peft_init")
    ours = load_adapter(lm.build("llama"), tmp_path / "peft_init", is_trainable=True)
    torch.testing.assert_close(lm.logits(ours, ids), lm.logits(theirs, ids), atol=1e-5, rtol=1e-5)

    # PEFT adds the orthogonal penalty inside forward; we add it in the loop
    for step in _train(theirs, lambda m, i: m(input_ids=i, labels=i).loss, ids, SCHEDULE["total_step"]):
        theirs.base_model.update_and_allocate(step)
    budgets = [
        update_and_allocate(ours, step)
        for step in _train(
            ours, lambda m, i: m(input_ids=i, labels=i).loss + orthogonal_regularization(m), ids, SCHEDULE["total_step"]
        )
    ]
    # 4 layers: 16 -> 8; steps 2..4: floor(8·(1 − (t − 1)/4)³ + 8) = 11, 9, 8; final at t = 5
    assert budgets == [16, 16, 11, 9, 8, 8, 8]
    pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    ours_pattern = ours.fastpeft_adapter_configs["default"].variant_config["rank_pattern"]
    assert ours_pattern == pattern and sum(map(sum, pattern.values())) == 8
    expected = lm.logits(theirs, ids)
    torch.testing.assert_close(lm.logits(ours, ids), expected, atol=1e-4, rtol=1e-4)

    # files both ways, pruned triplets dropped on disk as PEFT does
    theirs.save_pretrained(tmp_path / "peft_trained")
    save_adapter(ours, tmp_path / "ours_trained")
    peft_json = json.loads((tmp_path / "peft_trained/adapter_config.json").read_text())
    our_json = json.loads((tmp_path / "ours_trained/adapter_config.json").read_text())
    assert set(peft_json) - {"peft_version"} == set(our_json)
    for key in ("peft_type", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "total_step", "rank_pattern"):
        assert our_json[key] == peft_json[key], key
    peft_tensors = load_file(str(tmp_path / "peft_trained/adapter_model.safetensors"))
    our_tensors = load_file(str(tmp_path / "ours_trained/adapter_model.safetensors"))
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    from_peft = load_adapter(lm.build("llama"), tmp_path / "peft_trained")
    torch.testing.assert_close(lm.logits(from_peft, ids), expected, atol=1e-4, rtol=1e-4)
    into_peft = peft.PeftModel.from_pretrained(lm.build("llama"), tmp_path / "ours_trained").eval()
    torch.testing.assert_close(lm.logits(into_peft, ids), expected, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_and_bad_files(lm, tmp_path):
    ids = lm.ids()
    model = inject(lm.build("llama"), _config(total_step=3, tinit=0, tfinal=0, target_r=1))
    lm.randomize(model, seed=2)
    for step in _train(model, lambda m, i: m(input_ids=i, labels=i).loss, ids, 2):
        update_and_allocate(model, step)
    expected = lm.logits(model, ids)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(lm.build("llama"), tmp_path / "a")
    torch.testing.assert_close(lm.logits(loaded, ids), expected)
    config = loaded.fastpeft_adapter_configs["default"]
    assert config.variant == "adalora" and config.r == 4 and config.variant_config["total_step"] == 3
    saved_pattern = model.fastpeft_adapter_configs["default"].variant_config["rank_pattern"]
    assert config.variant_config["rank_pattern"] == saved_pattern and saved_pattern

    data = json.loads((tmp_path / "a/adapter_config.json").read_text())
    key = next(iter(data["rank_pattern"]))
    data["rank_pattern"][key] = [True] * 4  # the file holds fewer triplets than this claims
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(data))
    fresh = lm.build("llama")
    with pytest.raises(ValueError, match=r"lora_\w: shape .* does not hold the 4 triplets"):
        load_adapter(fresh, tmp_path / "a")
    assert not fresh.__dict__.get("fastpeft_adapter_configs")
