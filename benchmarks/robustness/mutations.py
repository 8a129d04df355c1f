"""A mutation score: one-line changes to the library's core, each run against the tests
that should catch it.

  python -m benchmarks.robustness.mutations [--only=name,name] [--timeout=300]
      [--out=benchmarks/results/cpu/mutations.json]

Each mutation replaces one exact piece of text of one file (it must occur exactly once) in
a copy of the repository, runs its tests there (`pytest -x -n 0 <tests>`) with a time
limit, and is *killed* when a test fails, the run errors or it times out, and *survives*
when its tests pass. Before any mutation, every distinct test selection runs once on the
unchanged copy and must pass, so a kill means the mutation, not a broken test. A new
mutation is one line of TABLE. A survivor is either killed by a new
test or named in EQUIVALENT with why it keeps behaviour identical.

The copy shares one JAX compilation cache across runs (programs are keyed by their HLO, so
a mutated program compiles anew and an unchanged one is read back). Writes a JSON result:
each mutation's outcome, seconds and the first failing test, and the score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COPIED = ("cai_jax", "configs", "constitutions", "tests", "benchmarks", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str  # relative to the repository
  old: str  # exact text, found once in the file
  new: str
  tests: str  # pytest arguments: files and an optional -k expression

  def apply(self, text: str) -> str:
    count = text.count(self.old)
    if count != 1:
      raise ValueError(f"mutation {self.name}: {self.file} holds {self.old!r} {count} times,"
                       " not once; make `old` unique")
    return text.replace(self.old, self.new)


# One mutation a line: name | file | old text (found once) | new text | pytest arguments.
# Grouped by what they break: the sampler; losses; RL math; wiring (a tested function
# reaching the step that uses it); the labeler's label math; the refusal measure; intervals;
# data splits and order.
TABLE = r"""
sampler_key_of_step_0 | cai_jax/sampling/sampler.py | jax.random.fold_in(key, step) | jax.random.fold_in(key, 0) | tests/test_sampler.py -k 'fold_in or flat'
sampler_draws_at_t_1 | cai_jax/sampling/sampler.py | categorical(key, _filter_logits(scaled_V, sampling)) | categorical(key, _filter_logits(scaled_V * sampling.temperature, sampling)) | tests/test_sampler.py -k 'fold_in or frequencies'
sampler_top_k_keeps_one | cai_jax/sampling/sampler.py | top_k(logits_V, sampling.top_k)[0][-1] | top_k(logits_V, sampling.top_k)[0][0] | tests/test_sampler.py -k 'fold_in or frequencies'
sampler_top_p_keeps_one_more | cai_jax/sampling/sampler.py | sorted_V[jnp.minimum(cutoff_idx,  | sorted_V[jnp.minimum(cutoff_idx + 1,  | tests/test_sampler.py -k 'fold_in or frequencies'
sampler_no_pad_after_stop | cai_jax/sampling/sampler.py | tok_B = jnp.where(s.done_B, pad_id, tok_B) | tok_B = tok_B | tests/test_sampler.py -k stop
sampler_length_counts_padding | cai_jax/sampling/sampler.py | lengths_B=s.lengths_B + (~s.done_B).astype(jnp.int32) | lengths_B=s.lengths_B + 1 | tests/test_sampler.py -k stop
sampler_logprob_unnormalised | cai_jax/sampling/sampler.py | return tokens_B, picked_B - jax.nn.logsumexp(scaled_BV, axis=-1) | return tokens_B, picked_B | tests/test_sampler.py -k 'logprobs or fold_in'
sampler_greedy_takes_last_max | cai_jax/sampling/sampler.py | first_B = jnp.min(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1) | first_B = jnp.max(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), -1), axis=-1) | tests/test_sampler.py -k argmax
bt_loss_label_swapped | cai_jax/training/losses.py | nll_B = p_B * jax.nn.softplus(-d_B) + (1.0 - p_B) * jax.nn.softplus(d_B) | nll_B = (1.0 - p_B) * jax.nn.softplus(-d_B) + p_B * jax.nn.softplus(d_B) | tests/test_losses.py -k bradley_terry
bt_loss_mask_ignored | cai_jax/training/losses.py | return jnp.sum(jnp.where(mask_B > 0, nll_B * mask_B, 0.0)), jnp.sum(mask_B) | return jnp.sum(nll_B), jnp.sum(mask_B) | tests/test_losses.py -k bradley_terry
dpo_loss_without_beta | cai_jax/training/losses.py | return bradley_terry_loss(beta * la_B, beta * lb_B, p_a_B, mask_B) | return bradley_terry_loss(la_B, lb_B, p_a_B, mask_B) | tests/test_losses.py -k soft_sigmoid
ipo_target_hard | cai_jax/training/losses.py | per_B = (h_B - (2.0 * p_B - 1.0) / (2.0 * beta)) ** 2 | per_B = (h_B - 1.0 / (2.0 * beta)) ** 2 | tests/test_losses.py -k ipo
sft_loss_mask_ignored | cai_jax/training/losses.py | return jnp.sum(jnp.where(mask_BT > 0, nll_BT * mask_BT, 0.0)), jnp.sum(mask_BT) | return jnp.sum(nll_BT), jnp.sum(mask_BT) | tests/test_losses.py tests/test_sft.py -k 'cross_entropy or prompt_labels'
sft_log_probs_unnormalised | cai_jax/training/losses.py | return target_BT - lse_BT | return target_BT | tests/test_losses.py -k cross_entropy
score_on_the_token_after_the_last | cai_jax/rl/ppo.py | last_B = jnp.sum(mask_BM, axis=1).astype(jnp.int32) - 1 | last_B = jnp.sum(mask_BM, axis=1).astype(jnp.int32) | tests/test_ppo.py tests/test_learner.py -k 'whiten_and_token or learner_advantages'
whiten_without_scaling | cai_jax/rl/ppo.py | out = (x_BM - mean) * jax.lax.rsqrt(var + eps) | out = x_BM - mean | tests/test_ppo.py tests/test_learner.py -k 'whiten or learner_advantages'
gae_without_lambda | cai_jax/rl/ppo.py | adv_B = delta_B + gamma * lam * next_mask_B * adv_next_B | adv_B = delta_B + gamma * next_mask_B * adv_next_B | tests/test_ppo.py -k gae
kl_k3_ratio_inverted | cai_jax/rl/ppo.py | log_r = ref_logp_BM - logp_BM | log_r = logp_BM - ref_logp_BM | tests/test_ppo.py tests/test_learner.py -k 'kl_estimators or learner'
policy_loss_takes_the_optimistic_branch | cai_jax/rl/ppo.py | loss_BM = jnp.maximum(-adv_BM * ratio_BM, | loss_BM = jnp.minimum(-adv_BM * ratio_BM, | tests/test_ppo.py -k clipped_losses
value_loss_takes_the_smaller | cai_jax/rl/ppo.py | loss_BM = 0.5 * jnp.maximum(jnp.square( | loss_BM = 0.5 * jnp.minimum(jnp.square( | tests/test_ppo.py -k clipped_losses
adaptive_kl_unclipped | cai_jax/rl/ppo.py | error = min(max(kl / target - 1.0, -0.2), 0.2) | error = kl / target - 1.0 | tests/test_ppo.py -k adaptive_kl
rloo_baseline_includes_itself | cai_jax/rl/critic_free.py | baseline_QC = (jnp.sum(rewards_QC, axis=1, keepdims=True) - rewards_QC) / (C - 1) | baseline_QC = jnp.mean(rewards_QC, axis=1, keepdims=True) | tests/test_critic_free.py tests/test_learner.py -k group
grpo_std_without_bessel | cai_jax/rl/critic_free.py | std_Q1 = jnp.std(rewards_QC, axis=1, keepdims=True, ddof=1) | std_Q1 = jnp.std(rewards_QC, axis=1, keepdims=True) | tests/test_critic_free.py tests/test_learner.py -k group
sequence_reward_adds_kl | cai_jax/rl/critic_free.py | return jnp.asarray(scores_B, jnp.float32) - kl_coef * kl_B | return jnp.asarray(scores_B, jnp.float32) + kl_coef * kl_B | tests/test_critic_free.py tests/test_learner.py -k group
ppo_learner_without_kl_penalty | cai_jax/rl/learner.py | rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, kl_coef) | rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, 0.0) | tests/test_learner.py
group_learner_without_kl_penalty | cai_jax/rl/learner.py | rewards_B = critic_free.sequence_rewards(scores_B, kl_BM, mask_BM, kl_coef) | rewards_B = critic_free.sequence_rewards(scores_B, kl_BM, mask_BM, 0.0) | tests/test_learner.py -k learner_group
ppo_learner_whitens_rewards_always | cai_jax/rl/learner.py | if whiten_rewards: | if True: | tests/test_learner.py -k learner_advantages
rollout_rows_share_one_key | cai_jax/rl/learner.py | keys = sequence_keys(rollout_key, list(range(B))) | keys = sequence_keys(rollout_key, [0] * B) | tests/e2e/test_p7_ppo.py -k 'programmatic and grpo'
pm_step_rounds_soft_labels | cai_jax/preference/model.py | losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], batch["p_a"], valid_B) | losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], jnp.where(batch["p_a"] == 0.5, 0.5, jnp.round(batch["p_a"])), valid_B) | tests/test_preference_model.py -k closed_form
dpo_step_rounds_soft_labels | cai_jax/rl/dpo.py | losses.dpo_loss(ratio_B2[:, 0], ratio_B2[:, 1], batch["p_a"], beta, | losses.dpo_loss(ratio_B2[:, 0], ratio_B2[:, 1], jnp.where(batch["p_a"] == 0.5, 0.5, jnp.round(batch["p_a"])), beta, | tests/test_dpo.py -k 'closed_form or half_minus'
reward_normalisation_without_std | cai_jax/rl/reward.py | x = (x - m.mean) / (m.std + NORM_EPS) | x = x - m.mean | tests/test_reward.py -k normalisation
choice_prob_inverted | cai_jax/feedback/labels.py | return sigmoid(np.asarray(logp_A, np.float64) - np.asarray(logp_B, np.float64)) | return sigmoid(np.asarray(logp_B, np.float64) - np.asarray(logp_A, np.float64)) | tests/test_labels.py -k choice_prob
cot_clamp_removed | cai_jax/feedback/labels.py | return np.clip(np.asarray(margins, np.float64), logit(lo), logit(hi)) | return np.asarray(margins, np.float64) | tests/test_labels.py -k clamp
principles_ensembled_by_max | cai_jax/feedback/labels.py | return np.asarray(p_K, np.float64).mean(axis=-1) | return np.asarray(p_K, np.float64).max(axis=-1) | tests/test_labels.py -k principle_ensemble
orders_not_debiased | cai_jax/feedback/labels.py | return sigmoid(margins_O.mean(axis=-1)) | return sigmoid(margins_O[..., 0]) | tests/test_labels.py -k order_swap
refusal_drops_as_an_ai | cai_jax/evaluation/refusal.py | \bas an ai\b | \bnever as an ai\b | tests/test_refusal.py -k 'alternative or known_phrases'
refusal_drops_decline_phrases | cai_jax/evaluation/refusal.py | will not|must decline| | will not| | tests/test_refusal.py -k 'alternative or known_phrases'
warning_then_instructions_still_refuses | cai_jax/evaluation/refusal.py | if warning and len(_NUMBERED.findall(text)) >= 3: | if warning and len(_NUMBERED.findall(text)) >= 30: | tests/test_refusal.py -k warning_followed
refusals_never_explain | cai_jax/evaluation/refusal.py | return Verdict("refuses_explains" if explains else "refuses", | return Verdict("refuses", | tests/test_refusal.py -k known_phrases
wilson_without_continuity_centre | cai_jax/evaluation/intervals.py | center = (p + z2 / (2 * n)) / (1 + z2 / n) | center = p | tests/test_intervals.py -k wilson
bootstrap_90_percent | cai_jax/evaluation/intervals.py | lo, hi = np.percentile(values, [2.5, 97.5]) | lo, hi = np.percentile(values, [5, 95]) | tests/test_intervals.py -k bootstrap
paired_interval_unpaired | cai_jax/evaluation/intervals.py |   return bootstrap(a - b, seed=seed, resamples=resamples) |   return difference(a, b, seed=seed, resamples=resamples) | tests/test_intervals.py -k paired
difference_without_b_spread | cai_jax/evaluation/intervals.py | lo, hi = _percentile(da - db) | lo, hi = _percentile(da - b.mean()) | tests/test_intervals.py -k difference
held_out_split_not_shuffled | cai_jax/data/batching.py | held = set(order[:eval_size].tolist()) | held = set(range(eval_size)) | tests/test_batching.py
rollout_prompts_same_every_epoch | cai_jax/data/rollout_prompts.py | order = np.random.default_rng([seed, 3, epoch]).permutation(n_prompts) | order = np.random.default_rng([seed, 3]).permutation(n_prompts) | tests/test_rollout_prompts.py -k prompt_rows
"""


def parse(table: str) -> tuple[Mutation, ...]:
  rows = []
  for n, line in enumerate(table.strip().splitlines(), 1):
    fields = line.split(" | ")
    if len(fields) != 5:
      raise ValueError(f"mutations TABLE line {n}: {len(fields)} fields, not 5: {line!r}")
    rows.append(Mutation(*(f.strip() if i in (0, 1, 4) else f for i, f in enumerate(fields))))
  return tuple(rows)


MUTATIONS = parse(TABLE)

# Mutations that keep behaviour identical, with why (none may be counted as survivors).
EQUIVALENT: dict[str, str] = {}


def _pytest(cwd: str, args: str, timeout: int, env: dict) -> tuple[str, float, str]:
  """(outcome, seconds, first failing test or error line) of one pytest run."""
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
         *shlex.split(args)]
  try:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - t0, ""
  seconds = time.perf_counter() - t0
  out = proc.stdout + proc.stderr
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
  if proc.returncode == 0:
    return "passed", seconds, ""
  if proc.returncode == 5:
    return "no tests", seconds, args
  return "failed", seconds, failed[0] if failed else out.strip().splitlines()[-1][:200]


def _copy_repo(dest: str) -> None:
  for name in COPIED:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name), symlinks=True,
                      ignore=shutil.ignore_patterns("__pycache__", "results"))
    else:
      shutil.copy(src, dest)
  for pkg, folder in (("constitutions", "constitutions"), ("configs", "configs")):
    link = os.path.join(dest, "cai_jax", pkg)  # the wheel's mapping, as in a checkout
    if not os.path.exists(link):
      os.symlink(os.path.join("..", folder), link)


def run_all(mutations, timeout: int, out_path: str) -> dict:
  names = [m.name for m in mutations]
  if len(set(names)) != len(names):
    raise ValueError("mutation names must be unique")
  work = tempfile.mkdtemp(prefix="cai_jax_mutations_")
  cache = os.path.join(work, "jit_cache")
  os.makedirs(cache)
  env = {**os.environ, "CAI_JAX_TEST_JIT_CACHE": cache, "JAX_COMPILATION_CACHE_DIR": cache}
  copy = os.path.join(work, "repo")
  os.makedirs(copy)
  _copy_repo(copy)
  try:
    for m in mutations:  # every mutation applies, before anything runs
      with open(os.path.join(copy, m.file)) as f:
        m.apply(f.read())
    for tests in sorted({m.tests for m in mutations}):  # each selection passes unchanged
      outcome, seconds, detail = _pytest(copy, tests, timeout, env)
      print(f"baseline {outcome:>6} {seconds:6.1f} s  {tests}", flush=True)
      if outcome != "passed":
        raise SystemExit(f"{tests}: fails without any mutation ({detail}); fix it first")
    rows = []
    for m in mutations:
      path = os.path.join(copy, m.file)
      with open(path) as f:
        original = f.read()
      with open(path, "w") as f:
        f.write(m.apply(original))
      try:
        outcome, seconds, detail = _pytest(copy, m.tests, timeout, env)
      finally:
        with open(path, "w") as f:
          f.write(original)
      status = {"passed": "survived", "failed": "killed", "timeout": "killed (timeout)",
                "no tests": "no tests selected"}[outcome]
      rows.append({"name": m.name, "file": m.file, "old": m.old, "new": m.new,
                   "tests": m.tests, "status": status, "seconds": round(seconds, 1),
                   "caught_by": detail})
      print(f"{status:>17}  {seconds:6.1f} s  {m.name}  {detail}", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  killed = sum(r["status"].startswith("killed") for r in rows)
  equivalent = [r["name"] for r in rows if r["status"] == "survived" and r["name"] in EQUIVALENT]
  survived = [r["name"] for r in rows if r["status"] == "survived" and r["name"] not in EQUIVALENT]
  scored = len(rows) - len(equivalent)
  result = {
      "command": "python -m benchmarks.robustness.mutations " + " ".join(sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
      "mutations": len(rows), "killed": killed, "equivalent": equivalent,
      "survived_unexplained": survived, "score": killed / max(scored, 1),
      "seconds": round(sum(r["seconds"] for r in rows), 1),
      "rows": rows, "why_equivalent": {k: v for k, v in EQUIVALENT.items() if k in equivalent}}
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{killed} of {len(rows)} killed ({len(equivalent)} equivalent, {len(survived)}"
        f" unexplained survivors): score {result['score']:.3f}; {result['seconds']:.0f} s;"
        f" {out_path}")
  return result


def markdown(result: dict) -> str:
  """The result file as a Markdown table (for an experiment's README)."""
  lines = [f"{result['killed']} of {result['mutations']} mutations killed"
           f" ({len(result['equivalent'])} equivalent, {len(result['survived_unexplained'])}"
           f" unexplained survivors): score {result['score']:.3f}, {result['seconds']:.0f} s of"
           f" tests on {result['machine']}, {result['date']}.", "",
           "| mutation | file | status | seconds | caught by |", "|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| `{r['name']}` | `{r['file']}` | {r['status']} | {r['seconds']:.1f} |"
                 f" `{r['caught_by']}` |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.render:
    with open(FLAGS.render) as f:
      print(markdown(json.load(f)))
    return
  chosen = MUTATIONS
  if FLAGS.only:
    wanted = set(FLAGS.only.split(","))
    chosen = tuple(m for m in MUTATIONS if m.name in wanted)
    if wanted - {m.name for m in chosen}:
      raise SystemExit(f"--only: unknown mutations {sorted(wanted - {m.name for m in chosen})}")
  run_all(chosen, FLAGS.timeout, FLAGS.out)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  flags.DEFINE_string("only", "", "Comma-separated mutation names (default: all).")
  flags.DEFINE_integer("timeout", 300, "Seconds a mutation's tests may take.")
  flags.DEFINE_string("render", "", "Print this result file as a Markdown table; run nothing.")
  flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "results", "cpu",
                                          "mutations.json"), "Result file.")
  app.run(main)
