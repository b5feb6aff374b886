"""Post-training recipes: SFT, reward model, DPO, GRPO, PPO."""
