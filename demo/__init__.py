"""The bundled arithmetic task and what runs on it: the embedded demo and the evidence scripts.

Not part of the library: these modules show the library working, end to end on a CPU, with
nothing downloaded. Like ``benchmarks/`` they may import every other package.

- ``arithmetic``: multi-digit addition / subtraction with worked column steps (the bundled task).
- ``embedded_job``: ``fastpeft demo`` (the default ``fastpeft`` job): pretrain a tiny Llama, then QLoRA SFT.
- ``efficacy``: ``python -m fastpeft.demo.efficacy``: SFT, GRPO, PPO, reward model and DPO on the task.
- ``accuracy_vs_compute``: every search strategy on the same problems at the same budgets.
- ``search_evidence``: ``python -m fastpeft.demo.search_evidence``: that comparison on a tiny SFT model,
  with the task's process verifier; its recorded results are ``search_evidence.md``.
- ``hard_tier``: the harder tier (4-5 digit sums, multiplication by a digit, three-step word problems)
  and its exact step checker; ``swarm_task``: sums of four numbers for the multi-agent swarm.
- ``prm_evidence``: ``python -m fastpeft.demo.prm_evidence``: learned process / outcome rewards from
  automatic step labels, search against best-of-N at equal tokens, learned compute-optimal
  allocation, GRPO with step rewards, the swarm, the verifier in the policy's batch (stages in
  ``prm_stages``, ``prm_search_eval``, ``prm_grpo``, ``prm_swarm``, ``prm_shared_batch``; tables and
  plots in ``prm_report``); its recorded results are ``prm_evidence.md``.
"""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m fastpeft.demo.<script>` is locating its module (from the repository root)
    from fastpeft.cli import unshadow_kernels

    unshadow_kernels()
