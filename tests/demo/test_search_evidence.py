"""The arithmetic evidence pipeline end to end on an untrained tiny model (structure, not accuracy),
and the step verifier on hand-written responses."""

import json

import pytest
import torch

from fastpeft.demo.arithmetic import make_problem
from fastpeft.demo.search_evidence import (
    ArithmeticStepVerifier,
    EvidenceSettings,
    main,
    run,
    strategies_for,
)

PROMPT = make_problem(876, 530)["prompt"]
RIGHT = " 6+0=6; 7+3=10 write 0 carry 1; 8+5+1=14 write 4 carry 1; write 1; answer 1406"


def test_verifier_scores_each_step():
    v = ArithmeticStepVerifier()
    assert v.step_results(PROMPT, RIGHT) == [True] * 5
    wrong_sum = RIGHT.replace("8+5+1=14", "8+5+1=15")  # the answer no longer matches the digits written
    assert v.step_results(PROMPT, wrong_sum) == [True, True, False, True, False]
    lost_carry = " 6+0=6; 7+3=10 write 0 carry 1; 8+5=13 write 3 carry 1; answer 306"
    assert v.step_results(PROMPT, lost_carry) == [True, True, False, False]
    assert v.step_results(PROMPT, " 6+0=6; 7+3=1") == [True]  # the unfinished step is not judged yet
    assert v.score(PROMPT, "") == 1.0 and v.score(PROMPT, " 6+0=6; banana; ") == 0.5
    # a wrongly copied digit is self-consistent; only the operand check (an oracle) sees it
    copied = RIGHT.replace("8+5+1=14 write 4", "7+5+1=13 write 3").replace("1406", "1306")
    assert v.score(PROMPT, copied) == 1.0
    assert ArithmeticStepVerifier(check_operands=True).step_results(PROMPT, copied) == [True, True, False, True, True]
    with pytest.raises(ValueError, match="addition prompt"):
        v.score("Q: 9-3=?\nA:", " 9-3=6; answer 6")


def test_strategy_options_grow_with_budget():
    s = EvidenceSettings()
    small, large = strategies_for(128, s), strategies_for(2048, s)
    assert large["best_of_n"]["n"] > small["best_of_n"]["n"] >= 1
    assert large["beam_search"]["n"] > small["beam_search"]["n"]
    assert all(opts["n"] % opts["beam_width"] == 0 for opts in (small["beam_search"], large["beam_search"]))


@pytest.fixture
def one_thread():
    # tiny matmuls crawl when torch's intra-op threads contend on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pipeline_end_to_end_untrained(tmp_path, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft.training.tokenizer import load_char_tokenizer

    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=112,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    s = EvidenceSettings(
        digits=1,
        train_problems=20,
        test_problems=2,
        budgets=(24, 48),
        response_tokens=12,
        step_tokens=6,
        model_config={**config, "model_type": "llama"},
    )
    results = run(tmp_path, s, model, load_char_tokenizer(), progress=False)
    names = list(strategies_for(24, s))
    assert [(r["strategy"], r["budget"]) for r in results["rows"]] == [(n, b) for n in names for b in (24, 48)]
    for r in results["rows"]:
        assert r["total"] == 2 and 0 <= r["correct"] <= 2 and r["budget_unit"] == "tokens"
        assert 0 < r["mean_tokens"] <= r["budget"]  # equal compute: nobody overspends
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert saved["rows"] == results["rows"] and saved["train"] == {"trained": False}
    table = (tmp_path / "evidence.md").read_text()
    assert "| strategy | 24 tokens | 48 tokens |" in table and "| dynamic_allocation |" in table
    assert (tmp_path / "evidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_missing_out():
    with pytest.raises(SystemExit):
        main([])
