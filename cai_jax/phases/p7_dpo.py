"""Stage 7, the DPO alternative (RL-CAI without a PM or rollouts): DPO on stage 5's
pairs, each trained towards its own soft label P(a better).

The comparisons and their train / held-out split are the PM's
(`comparisons.load_split` on the same `data` fields), so DPO's held-out pairs
are the ones stage 6 reports on. Policy and reference start from SL-CAI
(`paths.sl_cai_model`); the reference's log-probs of every response are
computed once, before the first step, and stored in
`reference_logps.npz` with the data's fingerprint, so a resumed run trains on
the same numbers without holding a second model. Steps in `cai_jax.rl.dpo`,
loss `losses.dpo_loss` ("sigmoid": the Bradley-Terry soft-target loss of the
implicit rewards; "ipo"). The data order is a function of (seed, epoch), so a
resumed run reproduces the uninterrupted run bit for bit.

Output, under `<workdir>/p7_dpo/`: `checkpoints/` (Orbax), reference_logps.npz,
metrics.jsonl, tensorboard/ and the final model as a Hugging Face directory
`hf/` (stage 8 evaluates it beside the PPO model).

With `lora.rank` > 0 only low-rank adapters train on the frozen SL-CAI weights
(`cai_jax.model.lora`, as in SFT): the reference is that same base with the
adapters off, the checkpoint holds the adapters and their optimizer state and
names the base, and `hf/` is the base with the adapters merged in.

  python -m cai_jax.phases.p7_dpo --config=configs/dpo.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable

import jax
import ml_collections

from cai_jax import paths
from cai_jax.checkpoints.load import load_model
from cai_jax.data import batching, comparisons
from cai_jax.model import lora
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli
from cai_jax.rl import dpo
from cai_jax.training import loop as train_loop
from cai_jax.training import losses, setup, supervised
from cai_jax.training.export import export_hf

REFERENCE_FILE = "reference_logps.npz"


def run(config: ml_collections.ConfigDict, workdir: str, *,
        should_stop: Callable[[int], bool] | None = None) -> setup.Result:
  """Train (or resume) DPO against the stored reference log-probs; returns the
  status, step and metrics. Stopping (`should_stop`, SIGTERM) and non-finite
  steps behave as in every training stage (`training.loop.run`)."""
  out = paths.stage_dir(workdir, paths.DPO)
  t, d = config.train, config.data
  if config.dpo.loss_type not in losses.DPO_LOSS_TYPES:
    raise ValueError(f"dpo.loss_type={config.dpo.loss_type!r}: expected one of"
                     f" {losses.DPO_LOSS_TYPES}")
  if not config.dpo.beta > 0:
    raise ValueError(f"dpo.beta={config.dpo.beta}: must be > 0 (e.g. 0.1)")
  init_key, state_key = jax.random.split(jax.random.key(config.seed))

  # --- Mesh, model, comparisons ---
  sharder = sharder_from_config(config)
  setup.check_batch_split(t, sharder, "pairs", {"eval_batch_size": t.eval_batch_size})
  labels_dir = paths.ai_labels_dir(
      d.labels_dir, workdir, required=not (d.helpful_comparisons and d.helpful_ratio == 1.0))
  train_c, held_c = comparisons.load_split(labels_dir, d.helpful_comparisons, d.helpful_ratio,
                                           d.eval_size, config.seed)
  spec = paths.sl_cai_model(config.model, workdir)
  cfg, params, tok = load_model(spec, sharder, tokenizer=config.tokenizer, key=init_key,
                                **dict(config.model_overrides))
  logging.info("policy and reference %s: %s, %.1fM params; %r", spec, cfg.family,
               cfg.num_params() / 1e6, tok)
  train = comparisons.tokenize_pairs(tok, train_c, d.seq_len, d.truncation)
  held = comparisons.tokenize_pairs(tok, held_c, d.seq_len, d.truncation)
  plan = batching.plan(train, held, d, t, config.seed, "pairs")

  # --- The reference: the initial policy's log-probs, once ---
  os.makedirs(out, exist_ok=True)
  ref_train, ref_held = dpo.stored_reference_logps(
      os.path.join(out, REFERENCE_FILE),
      functools.partial(dpo.reference_logps, params,
                        [(train, plan.train_buckets), (held, plan.held_buckets)], cfg=cfg,
                        sharder=sharder, batch_size=t.eval_batch_size, chunk=t.logits_chunk),
      {"train_fingerprint": train.fingerprint(), "held_out_fingerprint": held.fingerprint(),
       "reference": spec})
  ref_digest = hashlib.sha256(ref_train.tobytes() + ref_held.tobytes()).hexdigest()[:16]

  # --- What trains: every weight, or LoRA adapters on the frozen reference ---
  lspec = lora.LoraSpec.from_config(config.get("lora"))
  data_info = {**train.identity(t.batch_size, config.seed), "reference": ref_digest}
  trainee = supervised.Trainee.lm(cfg, lspec, params, sharder, jax.random.fold_in(init_key, 1))
  del params  # the trainee holds them until the train state takes them over
  if lspec is not None:
    data_info |= lspec.identity(spec)

  # --- Train: optimizer, state, jitted steps (`training.supervised`), loop ---
  def evaluate(outs, step: int) -> dict[str, float]:
    sums: dict[str, float] = {}
    for _, stats in outs:
      for k, v in jax.device_get(stats).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    pairs = max(sums["pairs"], 1.0)
    return {"eval_loss": sums["loss_sum"] / pairs,
            "eval_accuracy": sums["correct"] / max(sums["decided"], 1.0),
            "eval_margin": sums["margin_sum"] / max(sums["decided"], 1.0),
            "eval_logratio": sums["logratio_sum"] / (2.0 * pairs)}

  loss_kw = dict(cfg=cfg, sharder=sharder, beta=config.dpo.beta,
                 loss_type=config.dpo.loss_type, chunk=t.logits_chunk, lora=lspec)
  return supervised.fit(
      "dpo", out, config, trainee, plan, sharder=sharder, key=state_key, data_info=data_info,
      train_step=functools.partial(dpo.train_step, microbatches=t.microbatches, **loss_kw),
      eval_step=functools.partial(dpo.eval_step, **loss_kw),
      batch_sh=dpo.batch_shardings(sharder),
      train_batch=lambda rows, T: dpo.make_batch(train, ref_train, rows, T),
      held_batch=lambda rows, T: dpo.make_batch(held, ref_held, rows, T),
      evaluate=evaluate if held.size else None,
      summarize=train_loop.mean_of(("loss", "accuracy", "margin", "logratio", "grad_norm"),
                                   last=("lr",)),
      units=lambda fetched: len(fetched) * t.batch_size, rate_name="pairs_per_s",
      postfix=lambda last: {"loss": f"{last['loss']:.4f}", "margin": f"{last['margin']:.3f}"},
      export=lambda trained, step: export_hf(trainee.merged(trained), cfg, tok,
                                             paths.hf_export(workdir, paths.DPO), step),
      should_stop=should_stop)


if __name__ == "__main__":
  cli.main(run, stage="dpo")
