"""The bundled arithmetic task and what runs on it: the embedded demo and the evidence scripts.

Not part of the library: these modules show the library working, end to end on a CPU, with
nothing downloaded. Like ``benchmarks/`` they may import every other package.

- ``arithmetic``: multi-digit addition / subtraction with worked column steps (the bundled task).
- ``embedded_job``: ``fastpeft demo`` (the default ``fastpeft`` job): pretrain a tiny Llama, then QLoRA SFT.
- ``efficacy``: ``python -m fastpeft.demo.efficacy``: SFT, GRPO, PPO, reward model and DPO on the task.
- ``accuracy_vs_compute``: every search strategy on the same problems at the same budgets.
- ``search_evidence``: ``python -m fastpeft.demo.search_evidence``: that comparison on a tiny SFT model,
  with the task's process verifier; its recorded results are ``search_evidence.md``.
"""
