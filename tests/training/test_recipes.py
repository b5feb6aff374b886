"""The one recipe core under all five recipes (SFT, reward model, DPO, GRPO, PPO): exact resume after
SIGKILL, bf16 autocast tracking fp32, gradient checkpointing equal to none, and 2 gloo ranks equal
to one process with the same global batch (DPO and GRPO; FSDP2 rollouts equal DDP's)."""

from __future__ import annotations

import json
import subprocess
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.reasoning.types import Completion
from fastpeft.training import dpo, grpo, ppo, reward_model, sft
from fastpeft.training.distributed import launch_local
from fastpeft.training.metrics import read_metrics

RECIPES = {"sft": sft, "reward": reward_model, "dpo": dpo, "grpo": grpo, "ppo": ppo}
CONFIGS = {"sft": "SFTConfig", "reward": "RewardConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig", "ppo": "PPOConfig"}
ROLLOUT = ("grpo", "ppo")


def _data(recipe: str) -> list[dict]:
    records = make_arithmetic_dataset(16, seed=11)
    if recipe in ("reward", "dpo"):
        return [
            {
                "prompt": r["prompt"],
                "chosen": r["completion"],
                "rejected": r["completion"].replace(f"answer {r['answer']}", "answer 0"),
            }
            for r in records
        ]
    return records


def _config(recipe: str, model_config: dict, out: Path, **kw):
    base = dict(
        model_config=model_config,
        train_data=_data(recipe),
        lr=1e-2,
        max_steps=3,
        seed=7,
        max_seq_len=64,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(out),
        progress=False,
        plot=False,
        device="cpu",
        micro_batch_size=4,
        scheduler="constant",
        eval_at_start=False,
    )
    if recipe in ("reward", "dpo"):
        base.update(max_seq_len=128)  # the answers (what tells chosen from rejected) come last
    if recipe == "dpo":
        base.update(beta=0.5)
    if recipe in ROLLOUT:
        base.update(rewards={"length": 1.0}, prompts_per_step=2, max_new_tokens=6, temperature=1.0)
    if recipe == "grpo":
        base.update(num_generations=4, beta=0.1, num_iterations=2, advantage_scale="batch")
    if recipe == "ppo":
        base.update(samples_per_prompt=4, mini_batch_size=4, micro_batch_size=2, kl_coef=0.1, entropy_coef=0.01)
    base.update(kw)
    return getattr(RECIPES[recipe], CONFIGS[recipe])(**base)


class FixedGenerator:
    """Completions that depend only on the prompt's tokens and the call count (one call per step), not
    on the policy: runs that must take equal steps (bf16 vs fp32, 1 vs 2 ranks) see equal rollouts."""

    def __init__(self) -> None:
        self.calls = 0

    def generate_ids(self, prompt_ids, params, n=1, adapters=None):
        self.calls += 1
        out = []
        for ids in prompt_ids:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.calls}|{list(ids)}".encode()))
            group = []
            for _ in range(n):
                length = int(torch.randint(1, params.max_new_tokens + 1, (1,), generator=gen))
                tokens = torch.randint(10, 100, (length,), generator=gen).tolist()
                finish = "length" if length == params.max_new_tokens else "stop"
                group.append(Completion("x" * (1 + sum(tokens) % 9), tokens, [-1.0] * length, finish))
            out.append(group)
        return out


def _train(recipe: str, config, fixed: bool = False, model=None):
    extra = {"sampler": FixedGenerator()} if fixed and recipe in ROLLOUT else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RECIPES[recipe].train(config, model=model, **extra)


def _series(out: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r.get(key) is not None and "event" not in r]


def _trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


_KILLED_RUN = """
import json, os, signal, warnings, torch
warnings.simplefilter("ignore")
torch.set_num_threads({threads})
from fastpeft.training import {module} as recipe
cfg = recipe.{config_class}(**json.loads({config!r}))
def kill(step, record):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
recipe.train(cfg, callbacks=[kill])
raise SystemExit("not killed")
"""


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_after_sigkill_matches_uninterrupted_run(recipe, tmp_path, tiny_config, python_command):
    # dropout in the adapters and attention: the resumed run must also replay the RNG streams
    common = dict(max_steps=4, save_every=2, resume=True, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1})
    model_config = {**tiny_config, "attention_dropout": 0.1}
    ref = _train(recipe, _config(recipe, model_config, tmp_path / "ref", **common))

    killed = tmp_path / "killed"
    config = _config(recipe, model_config, killed, **common)
    values = dict(vars(config))
    argv, env, cwd = python_command(
        _KILLED_RUN.format(
            threads=torch.get_num_threads(),
            module=RECIPES[recipe].__name__.rsplit(".", 1)[1],
            config_class=CONFIGS[recipe],
            config=json.dumps(values),
            kill_at=3,
        )
    )
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000002"
    (ckpts / ".step-000004.tmp").mkdir()  # a torn write from a crash must be ignored
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r) == 3  # ran, not saved

    resumed = _train(recipe, config)
    assert [r["step"] for r in resumed.history] == [3, 4]  # only the missing steps ran
    # same data order, RNG streams, optimizer and scheduler state: equal up to float32 rounding (CPU
    # kernels may vectorise differently with other buffer alignment); a different dropout mask or a
    # stale Adam moment would move these by orders of magnitude more
    assert _series(killed, "loss") == pytest.approx(_series(tmp_path / "ref", "loss"), rel=1e-5, abs=1e-7)
    assert resumed.final_loss == pytest.approx(ref.final_loss, rel=1e-5, abs=1e-7)
    a, b = _trained(tmp_path / "ref"), _trained(killed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_bf16_autocast_tracks_fp32(recipe, tmp_path, tiny_config):
    """bf16 keeps ~3 significant digits: over 3 steps from the same start the losses and gradient
    norms stay within 5% (plus 2e-3 absolute, for GRPO's near-zero on-policy losses) of fp32's."""
    runs = {
        bf16: _train(recipe, _config(recipe, tiny_config, tmp_path / str(bf16), bf16=bf16, lr=2e-3), fixed=True)
        for bf16 in (False, True)
    }
    for key in ("loss", "grad_norm"):
        want, got = (_series(tmp_path / str(b), key) for b in (False, True))
        assert len(got) == len(want) == 3, key
        assert got == pytest.approx(want, rel=5e-2, abs=2e-3), key
    assert runs[True].steps == 3


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gradient_checkpointing_equals_none(recipe, tmp_path, tiny_llama):
    from fastpeft.training.model_setup import build_model

    model_config, calls = tiny_llama(), {}  # two blocks, both checkpointed
    for ckpt in (False, True):
        model = build_model(None, model_config, seed=7)
        calls[ckpt] = 0
        # inside the block: transformers checkpoints a block's forward, so the recompute runs its MLP again
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, c=ckpt: calls.__setitem__(c, calls[c] + 1))
        config = _config(recipe, model_config, tmp_path / str(ckpt), gradient_checkpointing=ckpt)
        _train(recipe, config, fixed=True, model=model)
    assert calls[True] > calls[False]  # the backward recomputed the checkpointed blocks
    for key in ("loss", "grad_norm"):
        assert _series(tmp_path / "True", key) == pytest.approx(_series(tmp_path / "False", key), rel=1e-5, abs=1e-7)
    a, b = _trained(tmp_path / "False"), _trained(tmp_path / "True")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def _rank_runs(jobs: list[tuple[str, object, bool]]) -> None:
    """Several runs in one pair of spawned ranks (spawning dominates the test's time)."""
    torch.manual_seed(0)
    for recipe, config, fixed in jobs:
        _train(recipe, config, fixed)


def test_two_ranks_match_one_process_dpo_and_grpo(tmp_path, tiny_config, monkeypatch):
    # spawned ranks inherit the environment (keep them on the torch reference like this process) and
    # unpickle _rank_runs by its module name, which needs the checkout root on sys.path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    one = {"dpo": dict(micro_batch_size=4), "grpo": dict(prompts_per_step=4)}  # one process: the global batch
    two = {"dpo": dict(micro_batch_size=2), "grpo": dict(prompts_per_step=2)}  # per rank: half of it
    for recipe, kw in one.items():
        _train(recipe, _config(recipe, tiny_config, tmp_path / f"one-{recipe}", **kw), fixed=True)
    jobs = [(r, _config(r, tiny_config, tmp_path / f"two-{r}", **kw), True) for r, kw in two.items()]
    jobs.append(("dpo", _config("dpo", tiny_config, tmp_path / "fsdp-dpo", parallel="fsdp", **two["dpo"]), True))
    # the real sampler, seeded per rank: FSDP2 (sampling from gathered parameters) takes DDP's steps
    for parallel in ("ddp", "fsdp"):
        config = _config("grpo", tiny_config, tmp_path / f"sampled-{parallel}", parallel=parallel, **two["grpo"])
        jobs.append(("grpo", config, False))
    launch_local(_rank_runs, (jobs,), nprocs=2)

    for name, other in (("dpo", "two-dpo"), ("dpo", "fsdp-dpo"), ("grpo", "two-grpo"), ("grpo", "sampled-fsdp")):
        base = tmp_path / (f"one-{name}" if other != "sampled-fsdp" else "sampled-ddp")
        for key in ("loss", "grad_norm"):
            want, got = _series(base, key), _series(tmp_path / other, key)
            assert len(got) == len(want) == 3, (other, key)
            # the ranks reduce in another order: equal to float32 rounding
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (other, key)
        a, b = _trained(base), _trained(tmp_path / other)
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), other
    assert read_metrics(tmp_path / "two-grpo" / "metrics.jsonl")[0]["world_size"] == 2
