"""N AdamW steps of QLoRA on a tiny Llama: fastpeft follows PEFT + bitsandbytes step for step.

The same NF4 base (bitsandbytes quantizes it; fastpeft's own quantization gives the same bytes), the
same initial adapter (PEFT's, saved and loaded), the same batches and optimizer: the loss at every
step and the adapter weights after the last one must agree to fp32 rounding, as Liger-Kernel's
convergence tests check its kernels against the Hugging Face ones.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft import load_adapter

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS, LR = 4, 2e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train(model, batches) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _peft_adapters(model) -> dict[str, torch.Tensor]:
    """{"<module path>.lora_A" / ".lora_B": weight} from a PeftModel."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:  # base_model.model.<path>.lora_A.default.weight
            path, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
            out[f"{path}.lora_{rest.split('.')[0]}"] = param.detach()
    return out


def _our_adapters(model) -> dict[str, torch.Tensor]:
    from fastpeft.lora_linear import iter_adapter_layers

    return {
        f"{path}.{name}": getattr(layer.adapters["default"], name).detach()
        for path, layer in iter_adapter_layers(model)
        if "default" in layer.adapters
        for name in ("lora_A", "lora_B")
    }


@pytest.mark.slow  # bitsandbytes' CPU 4-bit matmul takes ~1 s per step here
def test_qlora_training_trajectory_matches_peft_and_bitsandbytes(lm, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lm.build("llama", intermediate_size=128).save_pretrained(tmp_path / "base")  # bnb's CPU matmul: in % 64 == 0
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )

    def bnb_model():
        # train mode throughout: bnb's eval-mode CPU kernel rounds absmax to bf16
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quant, device_map="cpu"
        ).train()

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(bnb_model(), config)
    reference.save_pretrained(tmp_path / "init")  # PEFT's initial adapter (kaiming A, zero B), for every run
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 12), generator=generator) for _ in range(STEPS)]

    expected_losses = _train(reference, batches)
    expected = _peft_adapters(reference)
    # it learns (and B moved off its zero init): the comparison is not of a no-op
    assert expected_losses[-1] < expected_losses[0]
    assert min(w.abs().max() for k, w in expected.items() if k.endswith("lora_B")) > 0.01

    on_bnb = load_adapter(bnb_model(), tmp_path / "init", is_trainable=True)  # wraps bnb's NF4 bytes in place
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "base").train()
    load_adapter(native, tmp_path / "init", is_trainable=True, quantize="nf4")  # fastpeft quantizes the base
    for ours in (on_bnb, native):
        assert type(ours.model.layers[1].mlp.down_proj).__name__ == "QLoRALinear"
        losses = _train(ours, batches)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-5)
        got = _our_adapters(ours)
        assert got.keys() == expected.keys() and len(got) == 2 * len(TARGETS) * 2
        for key, want in expected.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)
