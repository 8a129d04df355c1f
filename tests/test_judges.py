"""The judges (evaluation/judges.py): judge games, refusal preference."""

import numpy as np
import pytest

from cai_jax.evaluation import intervals

from test_labeler import PAIRS, feedback_model_dir, tiny_feedback


def test_judge_games_from_answer_scores_equal_labelling_each_pair(tiny_feedback):
  # Stage 8's pointwise judge: a game's p_a from the two answers' own scores
  # (judge_measures) equals labelling the pair, without scoring the answers again.
  from cai_jax.evaluation import judges
  from cai_jax.evaluation.answers import AnswerRecord
  from cai_jax.configs import evaluation as evaluation_config
  c = evaluation_config.get_config("tiny")
  c.judge.mode = "pointwise"
  c.judge.validation_rows = (0, 0)
  rows = [(p.id, p.prompt, k) for p, k in zip(PAIRS, ("red_team", "helpful", "red_team"))]
  answers = {name: {i: AnswerRecord(i, prompt, kind, "held_out", name, f"{name} says {j}: {i}")
                    for j, (i, prompt, kind) in enumerate(rows)}
             for name in ("initial", "sl_cai", "rl_cai")}
  names = list(answers)
  measures = judges.judge_measures(c, tiny_feedback, answers, [])
  assert set(measures["judge_harm"]["initial"]) == {PAIRS[0].id, PAIRS[2].id}
  fast, fast_rows = judges.judge_comparisons(c, tiny_feedback, answers, names, measures)
  slow, slow_rows = judges.judge_comparisons(c, tiny_feedback, answers, names)
  assert [(r["axis"], r["id"], r["a"], r["b"]) for r in fast_rows] == [
      (r["axis"], r["id"], r["a"], r["b"]) for r in slow_rows]
  assert len(fast_rows) == 3 * 3
  np.testing.assert_allclose([r["p_a"] for r in fast_rows], [r["p_a"] for r in slow_rows],
                             atol=1e-5)
  assert fast["harmlessness"]["num_games"] == slow["harmlessness"]["num_games"] == 6


def test_refusal_preference_by_prompt_set_on_a_known_reward():
  """A reward that is the answer's length (a canned refusal is short): it prefers the
  refusal exactly where the model's answer is longer; answers the refusal measure calls
  refusals are left out; the rate's interval is Wilson's, the margin the plain mean."""
  from cai_jax.data.refusals import refusal_for
  from cai_jax.evaluation import judges
  from cai_jax.evaluation.answers import AnswerRecord
  long = "Here is a careful, complete answer with every step explained. " * 2
  rows = [("r1", "red_team", "held_out", long), ("r2", "red_team", "held_out", "Use a pan."),
          ("r3", "red_team", "held_out", "I'm sorry, but I can't help with that."),
          ("b1", "red_team", "borderline", long), ("b2", "red_team", "borderline", long),
          ("h1", "helpful", "held_out", "Ok."), ("s1", "red_team", "sample", long)]
  answers = {i: AnswerRecord(i, f"prompt {i}", kind, split, "m", text)
             for i, kind, split, text in rows}
  score = lambda prompts, responses: -np.array([len(r) for r in responses], float)
  out = judges.refusal_preference(score, answers, seed=0)
  assert out["red_team"]["answers_refusing"] == 1  # r3 refuses: not compared
  assert out["red_team"]["refusal_preferred"] == intervals.wilson(1, 2).as_dict()
  margins = [len(long) - len(refusal_for("r1")), len("Use a pan.") - len(refusal_for("r2"))]
  assert out["red_team"]["mean_margin"]["estimate"] == pytest.approx(np.mean(margins))
  assert out["borderline"]["refusal_preferred"] == intervals.wilson(2, 2).as_dict()
  assert out["helpful"]["refusal_preferred"] == intervals.wilson(0, 1).as_dict()
  assert out["helpful"]["mean_margin"]["estimate"] < 0
  none = judges.refusal_preference(score, {"r3": answers["r3"]})
  assert "missing" in none["red_team"] and "missing" in none["helpful"]


def test_own_refusal_preference_pairs_one_models_refusals_with_the_others_answers():
  """Only prompts where the first model refuses and the second answers count; a reward
  that is the answer's length prefers the refusal exactly where it is the longer text."""
  from cai_jax.evaluation import judges
  from cai_jax.evaluation.answers import AnswerRecord
  no = "I'm sorry, but I can't help with that."
  no_long = "I'm sorry, but I can't help with that, because it could be used to hurt people."
  rec = lambda i, split, text, kind="helpful": AnswerRecord(i, f"prompt {i}", kind, split,
                                                            "m", text)
  rl = {"h1": rec("h1", "held_out", no), "h2": rec("h2", "held_out", no_long),
        "h3": rec("h3", "held_out", "Use warm water."), "h4": rec("h4", "held_out", no),
        "b1": rec("b1", "borderline", no)}
  sl = {"h1": rec("h1", "held_out", "Warm water and a plunger will clear most sinks."),
        "h2": rec("h2", "held_out", "Ok."), "h3": rec("h3", "held_out", no),
        "h4": rec("h4", "held_out", no), "b1": rec("b1", "borderline", "Press Ctrl+C.")}
  score = lambda prompts, responses: np.array([len(r) for r in responses], float)
  out = judges.own_refusal_preference(score, rl, sl, seed=0)
  # h3 (sl refuses, rl answers) and h4 (both refuse) are left out.
  assert out["helpful"]["refusal_preferred"] == intervals.wilson(1, 2).as_dict()
  margins = [len(no) - len(sl["h1"].response), len(no_long) - len("Ok.")]
  assert out["helpful"]["mean_margin"]["estimate"] == pytest.approx(np.mean(margins))
  assert out["borderline"]["refusal_preferred"] == intervals.wilson(1, 1).as_dict()
  assert "missing" in out["red_team"]
