"""Trained weights are never lost to the output location: an unusable output_dir is refused before
the model is loaded, and a final save that fails writes the weights elsewhere and says where."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.training import checkpoint as ckpt
from fastpeft.training import recipe
from fastpeft.training.model_setup import build_model
from fastpeft.training.recipe import RecipeConfig, RunContext, save_final
from fastpeft.training.sft import SFTConfig, train


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(recipe, "build_model", refuse)  # every recipe builds its model there


@pytest.mark.parametrize("where", ["file", "under_a_file", "adapter_is_a_file"])
def test_unusable_output_dir_is_refused_before_loading(where, tmp_path, tiny_llama, monkeypatch):
    _no_model_load(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = {"file": blocker, "under_a_file": blocker / "run", "adapter_is_a_file": tmp_path / "run"}[where]
    if where == "adapter_is_a_file":
        out.mkdir()
        (out / "adapter").write_text("x")
    for run in (
        lambda: train(SFTConfig(model_config=tiny_llama(), train_data=[{"text": "a"}], output_dir=str(out))),
        lambda: recipe.setup_run(RecipeConfig(model_config=tiny_llama(), output_dir=str(out))),
    ):
        with pytest.raises(ValueError, match=r"^output_dir: .* exists and is not a directory$"):
            run()


def test_a_failed_final_save_rescues_the_trained_adapter(tmp_path, tiny_llama, arithmetic_records):
    out = tmp_path / "run"
    model = build_model(None, tiny_llama(), seed=0)

    def block_the_adapter_dir(step, record):  # something takes the final adapter's path mid-run
        if step == 2:
            (out / "adapter").write_text("in the way")

    config = SFTConfig(
        model_config=tiny_llama(),
        finetune="lora",
        lora={"r": 4},
        train_data=arithmetic_records[:8],
        max_steps=2,
        micro_batch_size=4,
        output_dir=str(out),
        progress=False,
        plot=False,
    )
    with pytest.raises(ckpt.FinalSaveError) as err:
        train(config, model=model, callbacks=[block_the_adapter_dir])
    message = str(err.value)
    assert "\n" not in message and f"could not save the adapter to {out / 'adapter'}" in message
    rescued = message.rsplit("it was saved to ", 1)[1].removesuffix(" instead")
    assert rescued.startswith(str(out / "adapter.rescued-"))
    saved = load_file(f"{rescued}/adapter_model.safetensors")
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(float(p.detach().abs().max()) > 0 for p in trained.values())  # it did train
    for name, param in trained.items():
        key = "base_model.model." + name.replace(".adapters.default", "").replace(".lora_B", ".lora_B.weight")
        torch.testing.assert_close(saved[key], param.detach())


def test_rl_final_save_falls_back_to_the_temp_dir(tmp_path, tiny_llama, monkeypatch):
    model = build_model(None, tiny_llama(), seed=0)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter").write_text("in the way")
    monkeypatch.setattr(ckpt.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_save = fastpeft.save_adapter
    monkeypatch.setattr(
        fastpeft,
        "save_adapter",
        lambda m, d: (_ for _ in ()).throw(OSError("disk full")) if str(d).startswith(str(out)) else real_save(m, d),
    )
    ctx = RunContext(0, 1, torch.device("cpu"), False, None, model, True, out)
    with pytest.raises(ckpt.FinalSaveError, match=f"saved to {tmp_path / 'tmp'}/fastpeft-final-weights-rescued-"):
        save_final(ctx, extra={"head": torch.ones(2)})
    (rescued,) = (tmp_path / "tmp").iterdir()
    assert (rescued / "adapter_model.safetensors").is_file() and (rescued / "head.safetensors").is_file()


def test_save_pretrained_refuses_a_file_instead_of_logging(tmp_path, tiny_llama):
    target = tmp_path / "model"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        ckpt.save_pretrained(build_model(None, tiny_llama(), seed=0), target)
    with pytest.raises(NotADirectoryError, match=r"save_adapter: .* is not a directory"):
        model = build_model(None, tiny_llama(), seed=0)
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
        fastpeft.save_adapter(model, target)
