"""GRPO on a tiny model with the real sampler: steps run, the adapter moves, failing rewards are
skipped and counted, β = 0 skips the reference pass, truncated completions can be masked."""

import json
import math
import warnings

import pytest
import torch

import fastpeft
from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.reasoning.types import Completion
from fastpeft.training import grpo
from fastpeft.training.grpo import GRPOConfig, train
from fastpeft.training.rewards import MultiObjectiveReward, arithmetic_reward
from fastpeft.training.rollout import layout

RECORDS = make_arithmetic_dataset(8, seed=2)


def _config(model_config, tmp_path, **kw):
    base = dict(
        model_config=model_config,
        train_data=RECORDS,
        eval_data=RECORDS[:2],
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=8,
        max_seq_len=64,
        lr=1e-2,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / "grpo"),
        progress=False,
        plot=False,
        device="cpu",
        eval_max_examples=2,
    )
    return GRPOConfig(**{**base, **kw})


def _length(p, c, r):  # a dense, learnable signal for a random tiny model
    return len(c) / 8.0


def _flaky(p, c, r):
    if len(c) % 3 == 0:
        raise RuntimeError("judge unavailable")
    return math.nan if len(c) % 3 == 1 and len(c) > 4 else 1.0


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(config, reward, model=None, sampler=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(config, model=model, reward=reward, sampler=sampler)


def test_layout_puts_every_completion_at_the_same_column():
    ids, _mask, pos, comp, lp = layout([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert lp == 3 and ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert pos[1, 2:].tolist() == [0, 1, 2, 3] and comp.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_grpo_steps_update_the_adapter_and_count_skipped_rewards(tmp_path, monkeypatch, tiny_config):
    calls = []
    real = fastpeft.disable_adapters
    monkeypatch.setattr(grpo.fastpeft, "disable_adapters", lambda m: calls.append(1) or real(m))
    from fastpeft.training.model_setup import build_model

    model = build_model(None, tiny_config, seed=0)
    reward = MultiObjectiveReward({"len": _length, "flaky": _flaky, "correct": arithmetic_reward})
    result = _run(_config(tiny_config, tmp_path, beta=0.1, num_iterations=2), reward, model)
    records = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["reward_skipped_total"] == sum(r["reward_skipped"] for r in steps) > 0
    assert all("kl" in r and "clip_fraction" in r for r in steps)
    assert len(calls) == 2  # one reference pass per step
    assert records[1]["step"] == 0 and "exact_match" in records[1] and "exact_match" in result.eval
    # the adapter moved away from its zero-initialised B
    moved = [float(p.abs().max()) for n, p in _lora_state(model).items() if "lora_B" in n]
    assert max(moved) > 0
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("aggregation", ["dr_grpo", "dapo"])
def test_beta_zero_skips_the_reference_pass(tmp_path, monkeypatch, aggregation, tiny_config):
    monkeypatch.setattr(grpo.fastpeft, "disable_adapters", lambda m: pytest.fail("reference pass with beta=0"))
    result = _run(
        _config(
            tiny_config,
            tmp_path,
            beta=0.0,
            max_steps=1,
            loss_aggregation=aggregation,
            advantage_scale="none",
            eval_data=None,
        ),
        MultiObjectiveReward({"len": _length}),
    )
    assert result.steps == 1 and math.isfinite(result.history[-1]["loss"])


class TruncatingGenerator:
    """A Generator whose every completion hits the length budget (finish_reason "length")."""

    def generate_ids(self, prompt_ids, params, n=1, adapters=None):
        gen = torch.Generator().manual_seed(params.seed or 0)
        out = []
        for _ in prompt_ids:
            rows = torch.randint(10, 100, (n, params.max_new_tokens), generator=gen).tolist()
            out.append([Completion("x" * (1 + sum(r) % 7), r, [-1.0] * len(r), "length") for r in rows])
        return out


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_masked_truncated_completions_give_no_gradient(tmp_path, mask_truncated, tiny_config):
    from fastpeft.training.model_setup import build_model

    model = build_model(None, tiny_config, seed=0)
    config = _config(
        tiny_config, tmp_path, max_new_tokens=3, mask_truncated=mask_truncated, max_steps=1, eval_data=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(
            config, model=model, reward=MultiObjectiveReward({"len": _length}), sampler=TruncatingGenerator()
        )
    rec = result.history[-1]
    assert rec["truncated_frac"] == 1.0 and rec["reward_std"] > 0
    lora_b = [float(p.abs().max()) for n, p in _lora_state(model).items() if "lora_B" in n]
    if mask_truncated:
        assert rec["loss"] == 0.0 and rec["grad_norm"] == 0.0 and max(lora_b) == 0.0
    else:
        assert rec["grad_norm"] > 0.0 and max(lora_b) > 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=0)
    with pytest.raises(ValueError, match="temperature"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        GRPOConfig(beta=-0.1)


def test_no_reward_configured_says_so_in_one_line(tmp_path, tiny_config, capsys):
    with pytest.raises(ValueError, match="no reward configured") as err:
        train(_config(tiny_config, tmp_path, max_steps=1))  # rewards: none, and no reward= given
    assert "\n" not in str(err.value) and "rewards.answer" in str(err.value)
    from fastpeft.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    for command in ("grpo", "ppo"):
        assert main([command, "--train_data", str(data), "--model_config", json.dumps(tiny_config)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fastpeft {command}: error: no reward configured") and "\n" not in err


def test_answer_reward_is_the_built_in_name(tiny_config):
    from fastpeft.training.rewards import build_reward

    record = {"answer": "12"}
    for name in ("answer", "arithmetic"):  # the old name still reads
        reward = build_reward({name: 1.0})
        assert reward(["Q"], ["so answer 12"], [record]).totals == [1.0]
    with pytest.raises(ValueError, match="built-in rewards"):
        build_reward({"nope": 1.0})


def test_sampling_never_holds_the_previous_backward(tmp_path, tiny_config):
    """Every tensor autograd saves for a backward is counted from its save until it is freed: when
    the sampler runs (steps 2 and 3) none is alive, and no gradient is held either."""
    import weakref

    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.training.model_setup import build_model
    from fastpeft.training.tokenizer import load_char_tokenizer

    alive: set[int] = set()

    class Saved:
        def __init__(self, tensor):
            self.tensor = tensor
            alive.add(id(self))
            weakref.finalize(self, alive.discard, id(self))

    model = build_model(None, tiny_config, seed=0)
    seen = []

    class CheckingSampler:
        def __init__(self):
            self.sampler = None

        def generate_ids(self, prompt_ids, params, n=1, adapters=None):
            self.sampler = self.sampler or Sampler(model, load_char_tokenizer(), max_seq_len=64)
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            seen.append((len(alive), sum(g is not None for g in grads)))
            return self.sampler.generate_ids(prompt_ids, params, n)

    config = _config(tiny_config, tmp_path, max_steps=3, eval_data=None, beta=0.1)
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        _run(config, MultiObjectiveReward({"len": _length}), model, CheckingSampler())
    assert seen == [(0, 0)] * 3


def test_qlora_policy_samples_and_trains_on_the_same_nf4_weights(tmp_path, tiny_config):
    """The sampler (inference mode) and the update share the NF4 weights and their dequantization
    workspace: a buffer first made while sampling is written again by the training forward."""
    from fastpeft.kernels.workspace import clear_workspaces

    clear_workspaces()  # the first dequantization of this test happens inside the sampler
    result = _run(
        _config(tiny_config, tmp_path, finetune="qlora", max_steps=2, eval_data=None, beta=0.1),
        MultiObjectiveReward({"len": _length}),
    )
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
