"""Stage 3 (SL-CAI SFT): fine-tune on (prompt, final revision) + helpful answers.

Reads stage 2's `CritiqueRevisionRecord`s and trains on them as chats
(`cai_jax.data.sft`): the loss is the token cross entropy on the response and
its end-of-turn token only (`training.losses.sft_loss`).

Batches are padded to a small set of length buckets, so every shape compiles
once; with `data.pack` each step's conversations are packed several to a row
(`sft.make_packed_batch`: segment-masked attention, positions restarting per
conversation), the same loss and gradients on fewer padded tokens. The data order is a function of (seed, epoch), so the data
position is just the step and a resumed run reproduces the uninterrupted run
bit for bit.

Output, under `<workdir>/p3_sft/`: `checkpoints/` (Orbax: params, optimizer
state, PRNG key, data position), `metrics.jsonl`, `tensorboard/` and the
final model as a Hugging Face directory `hf/`.

With `lora.rank` > 0 only low-rank adapters on `lora.targets` train
(`cai_jax.model.lora`): the base stays frozen and is not in the checkpoint (the
checkpoint names it and refuses another), the optimizer holds the adapters' state
alone, and `hf/` is the base with the adapters merged in.

  python -m cai_jax.phases.p3_sft --config=configs/sft.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections

from cai_jax import paths, records
from cai_jax.constitution import load_constitution
from cai_jax.checkpoints.load import load_model
from cai_jax.data import batching, sft
from cai_jax.evaluation import revision_filter as rf
from cai_jax.model import lora
from cai_jax.model.sharding import sharder_from_config
from cai_jax.phases import cli
from cai_jax.training import loop as train_loop
from cai_jax.training import setup, sft_step, supervised
from cai_jax.training.export import export_hf


def revision_filter(config: ml_collections.ConfigDict,
                    recs: list[records.CritiqueRevisionRecord], workdir: str):
  """The filter's `reason` when `data.revision_filter.enabled` (None otherwise), after
  writing what it keeps and drops of `recs` to `<workdir>/p3_sft/revision_filter.json`."""
  f = config.data.revision_filter
  if not f.enabled:
    return None
  flt = rf.RevisionFilter(
      rf.FilterConfig(True, tuple(f.categories), f.echo_words, f.min_compression),
      [p.revision for p in load_constitution(f.constitution).critique_revision])
  summary = {**rf.review(flt, recs, config.data.revision_round), "config": f.to_dict()}
  out = paths.stage_dir(workdir, paths.SFT)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, rf.SUMMARY_FILE)
  with open(path + ".tmp", "w") as fh:
    json.dump(summary, fh, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)
  logging.info("revision filter: kept %d of %d red-team revisions (%s)", summary["kept"],
               summary["revisions"], summary["dropped_by_reason"])
  return flt.reason


def _packed(data: sft.TokenizedData, rows, T: int, *, pad_id: int, row_multiple: int):
  """A step's conversations packed into rows of T inputs (`sft.make_packed_batch`)."""
  return sft.make_packed_batch(data, rows, T, pad_id, row_multiple)


def load_data(config: ml_collections.ConfigDict, workdir: str, tok
              ) -> tuple[sft.TokenizedData, sft.TokenizedData]:
  """(train, eval) tokenized data from the critique-revision records."""
  d = config.data
  records_dir = paths.require_records(
      d.records_dir or paths.stage_dir(workdir, paths.CRITIQUE_REVISION),
      paths.CRITIQUE_REVISION, "critique-revision records", "data.records_dir")
  recs = records.read_records(records_dir, records.CritiqueRevisionRecord)
  examples = sft.build_examples(recs, d.revision_round, d.helpful_ratio, config.seed,
                                revision_filter(config, recs, workdir))
  if len(examples) <= d.eval_size:
    raise ValueError(f"{records_dir}: {len(recs)} records give {len(examples)} usable SFT"
                     f" examples, need more than data.eval_size={d.eval_size}")
  train_ex, eval_ex = batching.split_held_out(examples, d.eval_size, config.seed, "examples")
  train = sft.tokenize_examples(tok, train_ex, d.seq_len, d.truncation)
  held = sft.tokenize_examples(tok, eval_ex, d.seq_len, d.truncation)
  if train.size == 0:
    raise ValueError(f"{records_dir}: no training example fits seq_len={d.seq_len}")
  return train, held


def run(config: ml_collections.ConfigDict, workdir: str, *,
        should_stop: Callable[[int], bool] | None = None) -> setup.Result:
  """Train (or resume) SFT; returns the final status, step and metrics.

  `should_stop(step)` is polled after every step, like SIGTERM: True saves a
  checkpoint and returns status "preempted". A non-finite loss or parameter
  stops the run without saving and raises FloatingPointError; the last
  checkpoint (all of whose steps were finite) is kept.
  """
  out = paths.stage_dir(workdir, paths.SFT)
  t = config.train
  init_key, state_key = jax.random.split(jax.random.key(config.seed))

  # --- Mesh, model, data ---
  sharder = sharder_from_config(config)
  setup.check_batch_split(t, sharder, "rows", {"eval_batch_size": t.eval_batch_size})
  cfg, params, tok = load_model(config.model, sharder, tokenizer=config.tokenizer,
                                key=init_key, **dict(config.model_overrides))
  logging.info("model %s: %s, %.1fM params; %r", config.model, cfg.family,
               cfg.num_params() / 1e6, tok)
  train, held = load_data(config, workdir, tok)
  plan = batching.plan(train, held, config.data, t, config.seed, "examples")

  # --- What trains: every weight, or LoRA adapters on a frozen base ---
  spec = lora.LoraSpec.from_config(config.get("lora"))
  data_info = train.identity(t.batch_size, config.seed)
  trainee = supervised.Trainee.lm(cfg, spec, params, sharder, jax.random.fold_in(init_key, 1))
  del params  # the trainee holds them until the train state takes them over
  if spec is not None:
    data_info |= spec.identity(config.model)

  # --- Train: optimizer, state, jitted steps (`training.supervised`), loop ---
  def evaluate(outs, step: int) -> dict[str, float]:
    total, count = 0.0, 0.0
    for _, (loss_sum, tokens) in outs:
      total, count = total + loss_sum, count + tokens
    return {"eval_loss": float(total) / max(float(count), 1.0)}

  return supervised.fit(
      "sft", out, config, trainee, plan, sharder=sharder, key=state_key, data_info=data_info,
      train_step=functools.partial(sft_step.train_step, cfg=cfg, sharder=sharder,
                                   microbatches=t.microbatches, loss_chunk=t.loss_chunk,
                                   lora=spec),
      eval_step=functools.partial(sft_step.eval_step, cfg=cfg, sharder=sharder,
                                  loss_chunk=t.loss_chunk, lora=spec),
      batch_sh=sharder.sharding(("batch", "seq")),
      train_batch=(functools.partial(_packed, train, pad_id=tok.pad_id,
                                     row_multiple=t.microbatches * sharder.batch_shards)
                   if config.data.pack else
                   lambda rows, T: sft.make_batch(train, rows, T, tok.pad_id)),
      held_batch=lambda rows, T: sft.make_batch(held, rows, T, tok.pad_id),
      evaluate=evaluate if held.size else None,
      summarize=train_loop.mean_of(("loss", "grad_norm"), last=("lr",), total=("loss_tokens",)),
      units=lambda fetched: sum(float(m["tokens"]) for m in fetched), rate_name="tokens_per_s",
      postfix=lambda last: {"loss": f"{last['loss']:.4f}"},
      export=lambda trained, step: export_hf(trainee.merged(trained), cfg, tok,
                                             paths.hf_export(workdir, paths.SFT), step),
      should_stop=should_stop)


if __name__ == "__main__":
  cli.main(run, stage="sft")
