"""Stage 6 (RL-CAI): the preference model, an LM with a scalar head, Bradley-Terry.

Comparisons (`cai_jax.data.comparisons`): stage 5's AI labels on red-team
pairs (soft p), and helpfulness pairs, human chosen/rejected pairs from
`data.helpful_comparisons` when given, else stage 5's AI labels on helpful
pairs. They are mixed at `data.helpful_ratio` and split, seeded, into train
and held-out pairs. The model starts from SL-CAI (`paths.sl_cai_model`) with
a fresh head; steps in `cai_jax.preference.model`. The data order is a
function of (seed, epoch), so a resumed run reproduces the uninterrupted run
bit for bit.

Eval (`cai_jax.preference.calibration`): loss, accuracy (r_a > r_b agrees
with p > 0.5; p = 0.5 pairs left out), accuracy per kind, reward mean/std and
the expected calibration error of sigma(r_a - r_b) against p, with its
reliability table written to `calibration/step-NNNNNNN.json`.

With `pms="by_kind"` the stage trains two PMs on the same split (Llama 2's
separate rewards): a harmlessness PM on the red-team comparisons, in the stage's
directory (the PM every later stage reads by default), and a helpfulness PM on the
helpful ones (answer-over-refusal contrasts included), in `helpful/`; stage 7's
`gated` reward scores each prompt with its kind's PM. Each resumes on its own.

With `lora.rank` > 0 only LoRA adapters on the backbone and the head train; the
checkpoint holds them, `model/pm.json` names the base, and
`saved.restore_preference_model` rebuilds the base and merges them, so stages 7
and 8 read a LoRA PM like any other.

Output, under `<workdir>/p6_preference_model/` (and for pms="by_kind" the same
under its `helpful/`): `checkpoints/` (Orbax), `model/` (`cai_jax.preference.saved`),
metrics.jsonl, tensorboard/, calibration/.

  python -m cai_jax.phases.p6_preference_model \
      --config=configs/preference_model.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from cai_jax import paths
from cai_jax.data import batching, comparisons
from cai_jax.model import heads, lora, transformer
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli
from cai_jax.preference import calibration, saved
from cai_jax.preference import model as pm
from cai_jax.training import loop as train_loop
from cai_jax.training import setup, supervised


def load_comparisons(config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[list[comparisons.Comparison], list[comparisons.Comparison]]:
  """(train, held-out) comparisons for the config's data mix."""
  d = config.data
  labels_dir = paths.ai_labels_dir(
      d.labels_dir, workdir, required=not (d.helpful_comparisons and d.helpful_ratio == 1.0))
  return comparisons.load_split(labels_dir, d.helpful_comparisons, d.helpful_ratio,
                                d.eval_size, config.seed)


# pms="by_kind": (output under the stage directory, the comparisons' kind), in order.
BY_KIND = (("", "red_team"), (paths.HELPFUL_PM, "helpful"))
PMS = ("one", "by_kind")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        should_stop: Callable[[int], bool] | None = None) -> setup.Result:
  """Train (or resume) the preference model(s); returns the status, step and metrics
  (of the last PM trained; "preempted" as soon as one is).

  `should_stop(step)` is polled after every step, like SIGTERM: True saves a
  checkpoint and returns "preempted". A non-finite loss or parameter raises
  FloatingPointError without saving; the last (finite) checkpoint is kept.
  """
  pms = config.get("pms", "one")
  if pms not in PMS:
    raise ValueError(f"config pms={pms!r}: use one of {list(PMS)}")
  sharder = sharder_from_config(config)
  setup.check_batch_split(config.train, sharder, "pairs",
                          {"eval_batch_size": config.train.eval_batch_size})
  train_c, held_c = load_comparisons(config, workdir)
  key = jax.random.key(config.seed)
  if pms == "one":
    return train_pm(config, workdir, "", train_c, held_c, sharder, key, should_stop)
  for i, (which, kind) in enumerate(BY_KIND):
    kind_train = [c for c in train_c if c.kind == kind]
    if not kind_train:
      raise ValueError(f"config pms='by_kind': no {kind} comparisons to train the {kind} PM"
                       " on; check data.helpful_ratio and stage 5's labels")
    logging.info("stage 6, %s PM: %d train, %d held-out comparisons", kind, len(kind_train),
                 sum(c.kind == kind for c in held_c))
    result = train_pm(config, workdir, which, kind_train,
                      [c for c in held_c if c.kind == kind], sharder,
                      jax.random.fold_in(key, i) if i else key, should_stop)
    if result.status != "done":
      return result
  return result


def train_pm(config: ml_collections.ConfigDict, workdir: str, which: str,
             train_c: list[comparisons.Comparison], held_c: list[comparisons.Comparison],
             sharder, key: jax.Array, should_stop: Callable[[int], bool] | None
             ) -> setup.Result:
  """Train (or resume) one PM on `train_c` into `paths.pm_out(workdir, which)`."""
  out = paths.pm_out(workdir, which)
  t, d = config.train, config.data
  init_key, state_key = jax.random.split(key)

  # --- Model, tokenized comparisons ---
  spec = paths.sl_cai_model(config.model, workdir)
  cfg, params, tok = pm.init_scalar_model(spec, sharder, init_key, tokenizer=config.tokenizer,
                                          **dict(config.model_overrides))
  train = comparisons.tokenize_pairs(tok, train_c, d.seq_len, d.truncation)
  held = comparisons.tokenize_pairs(tok, held_c, d.seq_len, d.truncation)
  plan = batching.plan(train, held, d, t, config.seed, "pairs")
  # --- What trains: every weight and the head, or LoRA adapters and the head ---
  lora_spec = lora.LoraSpec.from_config(config.get("lora"))
  data_info = train.identity(t.batch_size, config.seed)
  info = {"source_model": spec, "seq_len": d.seq_len}
  if lora_spec is None:
    trainee = supervised.Trainee(heads.abstract_scalar_params(cfg),
                                 heads.scalar_model_shardings(cfg, sharder), params)
  else:
    adapter_sh = lora.adapter_shardings(cfg, lora_spec, sharder)
    adapters = jax.jit(lambda k: lora.init_adapters(cfg, lora_spec, k),
                       out_shardings=adapter_sh)(jax.random.fold_in(init_key, 1))
    trainee = supervised.Trainee(
        {"adapters": lora.abstract_adapters(cfg, lora_spec), "head": heads.abstract_head(cfg)},
        {"adapters": adapter_sh, "head": heads.head_shardings(cfg, sharder)},
        {"adapters": adapters, "head": params["head"]},
        frozen=params["backbone"], frozen_sh=transformer.param_shardings(cfg, sharder))
    data_info |= lora_spec.identity(spec)
    # What `saved.restore_preference_model` needs to rebuild the base and merge.
    info |= {"lora": lora_spec.identity(spec), "tokenizer": config.tokenizer,
             "model_overrides": dict(config.model_overrides)}
  del params  # the trainee holds them until the train state takes them over
  saved.save_model_files(out, cfg, tok, info)

  # --- Train: optimizer, state, jitted steps (`training.supervised`), loop ---
  def evaluate(outs, step: int) -> dict[str, float]:
    rewards_E2 = np.zeros((held.size, 2), np.float32)
    for rows, r_B2 in outs:
      r_B2 = np.asarray(jax.device_get(r_B2))
      rewards_E2[rows[rows >= 0]] = r_B2[rows >= 0]
    metrics, table = calibration.eval_metrics(rewards_E2, held, config.eval.num_bins)
    calibration.write_calibration(paths.calibration_dir(workdir, which), step, metrics, table)
    return metrics

  return supervised.fit(
      "pm", out, config, trainee, plan, sharder=sharder, key=state_key, data_info=data_info,
      train_step=functools.partial(pm.train_step, cfg=cfg, sharder=sharder,
                                   microbatches=t.microbatches, lora=lora_spec),
      eval_step=functools.partial(pm.eval_step, cfg=cfg, sharder=sharder, lora=lora_spec),
      batch_sh=comparisons.batch_shardings(sharder),
      train_batch=lambda rows, T: comparisons.make_batch(train, rows, T),
      held_batch=lambda rows, T: comparisons.make_batch(held, rows, T),
      evaluate=evaluate if held.size else None,
      summarize=train_loop.mean_of(("loss", "accuracy", "reward_mean", "reward_std",
                                    "grad_norm"), last=("lr",)),
      units=lambda fetched: len(fetched) * t.batch_size, rate_name="pairs_per_s",
      postfix=lambda last: {"loss": f"{last['loss']:.4f}", "acc": f"{last['accuracy']:.2f}"},
      should_stop=should_stop)


if __name__ == "__main__":
  cli.main(run, stage="preference_model")
