"""Training infrastructure shared by the SFT, preference-model and PPO phases.

  optim.py       AdamW + warmup/decay schedule + clipping, the train state,
                 microbatch gradient accumulation inside one jitted step.
  losses.py      token and pairwise (Bradley-Terry) losses as (sum, count) in float32.
  checkpoint.py  Orbax save/restore of the train state and data position onto
                 the current mesh; SIGTERM -> save-and-exit flag.
  metrics.py     scalars to TensorBoard and metrics.jsonl (process 0 only).
"""
