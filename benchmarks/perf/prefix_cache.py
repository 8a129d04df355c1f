"""Shared-prefix KV cache: stage-2 generation and stage-5 option scoring, with and without.

  python -m benchmarks.perf.prefix_cache  # -> benchmarks/results/cpu/prefix_cache.json

Stage 2 (critique): the `cpu` preset's critique conversations
(`critique_revision.critique_conversation` after `few_shot_turns` of the
harmless constitution), one per PyRIT (objective, response) pair, through
the chat template; batch 8, 64 new tokens under the preset's sampling
(temperature 0.7, top-p 0.9), no early stop so every call makes 8 x 64
tokens; responses cut to 64 tokens (the preset's answers are at most 64).
Stage 5: the labeler's multiple-choice contexts (2-shot, both orders, as the
`full` preset asks; `feedback.prompts`) of the first 4 pairs, scored by
`OptionScorer` in one batch of 8.

Variants: `plain` (`min_shared_prefix=0`: every row prefills its whole
prompt) and `prefix` (the shared prefix prefilled once at batch 1). Each is
called once first (`first_call_s`, compile included; for `prefix` a cold
call); then one more cold `prefix` call (`cold_s`: the prefix prefilled in
the call); then `--repeats` alternating (plain, prefix) calls, medians
reported, where `prefix` is warm: its kept cache of the same prefix is
reused, as in the stage, which calls generate (or the scorer) again and
again with one few-shot prefix. Stage 5 also records how far the plain path
moves when only its padding grows by 3 slots (float summation order), next
to the prefix path's difference.
Also: the plain sampler's rate at batch 8 on a short prompt (64 random
tokens, as `benchmarks/perf/decode.py`), so stage-2 rates read as a fraction of it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import outputs
from cai_jax.checkpoints.load import load_model
from cai_jax.constitution import draw_principles, load_constitution
from cai_jax.critique_revision import critique_conversation, few_shot_turns
from cai_jax.feedback import prompts as feedback_prompts
from cai_jax.feedback.eval_data import pyrit_pairs
from cai_jax.feedback.scoring import OptionScorer
from cai_jax.sampling import prefix as prefix_lib
from cai_jax.sampling.chat import keys_for, sampling_from_config
from cai_jax.sampling.sampler import DEFAULT_LENGTH_BUCKETS, Sampler, sequence_keys
from cai_jax.text.padding import bucket
from cai_jax.text.chat import generation_ids
from cai_jax.configs import critique_revision

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model spec.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per generate call / scorer batch.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per row (stage 2).")
_SCORE_BATCHES = flags.DEFINE_integer("score_batches", 1, "Scorer batches per timed call.")
_RESPONSE = flags.DEFINE_integer("max_response_tokens", 64,
                                 "Each response cut to this (the cpu preset's answers are <= 64).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (medians reported).")
_MIN = flags.DEFINE_integer("min_shared_prefix", 64, "The prefix variants' threshold.")
_OUT = flags.DEFINE_string("out", "", "Write results JSON here (default:"
                           " benchmarks/results/<machine>/prefix_cache.json).")


def _ab(plain, prefix, clear, repeats: int) -> tuple[dict, dict]:
  """First calls (compile included), one cold prefix call, then `repeats` alternating
  (plain, warm prefix) calls. `clear` forgets the kept prefix cache."""
  rows, outs = {"plain": {}, "prefix": {}}, {}

  def timed(name, fn):
    t = time.perf_counter()
    outs[name] = fn()
    seconds = time.perf_counter() - t
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return seconds

  rows["plain"]["first_call_s"] = timed("plain", plain)
  clear()
  rows["prefix"]["first_call_s"] = timed("prefix", prefix)  # cold, compiles
  clear()
  rows["prefix"]["cold_s"] = timed("prefix", prefix)  # one call, the prefix prefilled in it
  for name in rows:
    rows[name]["seconds"] = []
  for _ in range(repeats):
    rows["plain"]["seconds"].append(timed("plain", plain))
    rows["prefix"]["seconds"].append(timed("prefix", prefix))  # warm: the kept prefix
  for row in rows.values():
    row["median_s"] = statistics.median(row["seconds"])
  return rows, outs


def _stage2(cfg, params, tok, pairs, repeats: int) -> dict:
  c = critique_revision.get_config("cpu")
  con = load_constitution(c.constitution)
  shots = few_shot_turns(con, c.num_few_shot, c.mode)
  convs, names = [], []
  for p in pairs:
    pid = draw_principles(con, c.seed, p.id, 1)[0]
    response = feedback_prompts.truncate(tok, p.response_a, _RESPONSE.value)
    convs.append(critique_conversation(shots, p.prompt, response,
                                       con.critique_principle(pid).critique))
    names.append(f"{p.id}/critique/0")
  prompts = [generation_ids(tok, conv) for conv in convs]
  keys = keys_for(c.seed, names)
  sampling = sampling_from_config(c.sampling)
  kw = dict(max_new_tokens=_NEW.value, stop_ids=(), pad_id=tok.pad_id)
  plain = Sampler(cfg, min_shared_prefix=0, **kw)
  shared = Sampler(cfg, min_shared_prefix=_MIN.value, **kw)
  prefills = shared.prefix_cache.num_prefills
  rows, outs = _ab(lambda: plain.generate(params, prompts, keys, sampling),
                   lambda: shared.generate(params, prompts, keys, sampling),
                   shared.prefix_cache.clear, repeats)
  assert shared.num_prefix_traces(sampling) >= 1, "the prefix path was not taken"
  assert shared.prefix_cache.num_prefills - prefills == 2  # the two cold calls only
  generated = len(prompts) * _NEW.value
  for name, row in rows.items():
    row["tokens_per_s"] = generated / row["median_s"]
  rows["prefix"]["cold_tokens_per_s"] = generated / rows["prefix"]["cold_s"]
  rows["prefix"]["tokens_agree_with_plain"] = float(np.mean(outs["prefix"].tokens ==
                                                            outs["plain"].tokens))
  rows["prefix"]["max_abs_logprob_diff"] = float(np.max(np.abs(outs["prefix"].logprobs -
                                                               outs["plain"].logprobs)))
  n_shared = prefix_lib.shared_prefix_length(prompts, _MIN.value)
  return {"prompt_tokens": [len(p) for p in prompts], "shared_prefix_tokens": n_shared,
          "generated_tokens": generated, "sampling": str(sampling), **rows}


def _stage5(cfg, params, tok, pairs, repeats: int) -> dict:
  con = load_constitution("harmless")
  examples = feedback_prompts.few_shot_examples(con, 2, cot=False)
  question = con.comparison[0].question
  contexts, ids = [], []
  for p in pairs:
    a = feedback_prompts.truncate(tok, p.response_a, _RESPONSE.value)
    b = feedback_prompts.truncate(tok, p.response_b, _RESPONSE.value)
    for first, second in ((a, b), (b, a)):
      text = feedback_prompts.multiple_choice_prompt(tok, con, question, p.prompt, first,
                                                     second, examples=examples)
      context, option_ids = feedback_prompts.answer_context(tok, text)
      contexts.append(context)
      ids.append(option_ids)
  n = _BATCH.value * _SCORE_BATCHES.value
  contexts, ids = contexts[:n], ids[:n]
  plain = OptionScorer(cfg, pad_id=tok.pad_id, batch_size=_BATCH.value, min_shared_prefix=0)
  shared = OptionScorer(cfg, pad_id=tok.pad_id, batch_size=_BATCH.value,
                        min_shared_prefix=_MIN.value)

  rows, outs = _ab(lambda: plain(params, contexts, ids), lambda: shared(params, contexts, ids),
                   shared.prefix_cache.clear, repeats)
  assert shared.num_prefix_traces() >= 1, "the prefix path was not taken"
  tokens = sum(len(c) for c in contexts)
  for row in rows.values():
    row["contexts_per_s"] = len(contexts) / row["median_s"]
    row["context_tokens_per_s"] = tokens / row["median_s"]
  rows["prefix"]["max_abs_logprob_diff"] = float(np.max(np.abs(outs["prefix"] - outs["plain"])))
  # The plain path's own sensitivity to padding: whole contexts padded 3 slots more.
  T = bucket(max(len(c) for c in contexts), DEFAULT_LENGTH_BUCKETS) + 3
  shifted = OptionScorer(cfg, pad_id=tok.pad_id, batch_size=_BATCH.value, min_shared_prefix=0,
                         length_buckets=(T,))(params, contexts, ids)
  rows["plain"]["max_abs_logprob_diff_padded_3_more"] = float(np.max(np.abs(shifted -
                                                                            outs["plain"])))
  return {"context_tokens": [len(c) for c in contexts],
          "shared_prefix_tokens": prefix_lib.shared_prefix_length(contexts, _MIN.value),
          **rows}


def _short_prompt_rate(cfg, params, repeats: int) -> dict:
  """The plain sampler at batch B on 64 random prompt tokens (benchmarks/perf/decode.py's setup)."""
  B, M = _BATCH.value, _NEW.value
  rs = np.random.RandomState(0)
  prompts = [list(rs.randint(100, 30000, size=64)) for _ in range(B)]
  sampler = Sampler(cfg, max_new_tokens=M, stop_ids=(), pad_id=0, length_buckets=(64,),
                    min_shared_prefix=0)
  keys = sequence_keys(0, range(B))
  generate = lambda: sampler.generate(params, prompts, keys)
  generate()  # compile
  seconds = []
  for _ in range(repeats):
    t = time.perf_counter()
    generate()
    seconds.append(time.perf_counter() - t)
  median = statistics.median(seconds)
  return {"seconds": seconds, "median_s": median, "tokens_per_s": B * M / median}


def main(argv):
  del argv
  start = time.perf_counter()
  cfg, params, tok = load_model(_MODEL.value)
  pairs, _ = pyrit_pairs(max(_BATCH.value, _BATCH.value * _SCORE_BATCHES.value // 2 + 1))
  results = {"model": _MODEL.value, "device": str(jax.devices()[0].device_kind),
             "platform": platform.platform(), "cpu_count": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M"), "batch": _BATCH.value,
             "new_tokens": _NEW.value, "repeats": _REPEATS.value,
             "min_shared_prefix": _MIN.value, "max_response_tokens": _RESPONSE.value}
  print(f"loaded in {time.perf_counter() - start:.0f} s", flush=True)
  results["stage2_critique"] = _stage2(cfg, params, tok, pairs[:_BATCH.value], _REPEATS.value)
  print(json.dumps(results["stage2_critique"], default=str))
  results["stage5_multiple_choice"] = _stage5(cfg, params, tok, pairs, _REPEATS.value)
  print(json.dumps(results["stage5_multiple_choice"], default=str))
  results["short_prompt_plain"] = _short_prompt_rate(cfg, params, _REPEATS.value)
  print(json.dumps(results["short_prompt_plain"]))
  s2, s5, base = (results[k] for k in ("stage2_critique", "stage5_multiple_choice",
                                       "short_prompt_plain"))
  results["summary"] = {
      "stage2_speedup_warm": s2["plain"]["median_s"] / s2["prefix"]["median_s"],
      "stage2_speedup_cold": s2["plain"]["median_s"] / s2["prefix"]["cold_s"],
      "stage5_speedup_warm": s5["plain"]["median_s"] / s5["prefix"]["median_s"],
      "stage5_speedup_cold": s5["plain"]["median_s"] / s5["prefix"]["cold_s"],
      "stage2_plain_fraction_of_short_prompt_rate":
          s2["plain"]["tokens_per_s"] / base["tokens_per_s"],
      "stage2_prefix_fraction_of_short_prompt_rate":
          s2["prefix"]["tokens_per_s"] / base["tokens_per_s"]}
  results["wall_s"] = time.perf_counter() - start
  print(json.dumps(results["summary"]))
  print(f"wall {results['wall_s']:.0f} s")
  print(outputs.write(outputs.path("prefix_cache", _OUT.value), results, default=str))


if __name__ == "__main__":
  app.run(main)
