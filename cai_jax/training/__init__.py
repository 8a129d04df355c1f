"""Training infrastructure shared by the SFT, preference-model, DPO and PPO phases.

  optim.py       AdamW + warmup/decay schedule + clipping, the train state,
                 microbatch gradient accumulation and the one train-step body
                 (`gradient_step`).
  supervised.py  the one skeleton of SFT, the PM and DPO: optimizer, state,
                 jitted steps with their shardings, the ordered loop, export.
  setup.py       batch checks, optimizer and checkpointer, init-or-restore.
  loop.py        the one train loop (logging, eval, checkpoints, preemption).
  sft_step.py    SFT's loss and steps.
  losses.py      token and pairwise (Bradley-Terry) losses as (sum, count) in float32.
  checkpoint.py  Orbax save/restore of the train state and data position onto
                 the current mesh; SIGTERM -> save-and-exit flag.
  metrics.py     scalars to TensorBoard and metrics.jsonl (process 0 only).
"""
