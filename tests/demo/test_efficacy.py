"""The efficacy pipeline runs end to end (``--quick``: every stage, tiny sizes; numbers meaningless)."""

import json

from fastpeft.demo.efficacy import main


def test_quick_pipeline_writes_every_stage(tmp_path, capsys):
    assert main(["--quick", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "efficacy.json").read_text())
    for stage in ("sft", "grpo", "ppo", "reward_model", "dpo", "dpo_plain"):
        assert results[stage]["seconds"] > 0, stage
    for stage in ("grpo", "ppo", "dpo", "dpo_plain"):
        assert 0.0 <= results[stage]["exact_match_after"] <= 1.0
        assert results[stage]["exact_match_before"] == results["sft"]["exact_match"]
    assert results["pairs"]["train"]["pairs"] > 0 and results["reward_model"]["held_out_pairs"] > 0
    assert (tmp_path / "ppo" / "adapter" / "value_head.safetensors").is_file()
    summary = json.loads(capsys.readouterr().out.split("full results")[0])
    assert summary["sft_exact_match"] == results["sft"]["exact_match"]
