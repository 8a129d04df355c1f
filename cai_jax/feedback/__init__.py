"""AI feedback (RLAIF): a feedback model's soft preference between two responses.

  labels    the label math on answer log-probs (pure numpy)
  prompts   multiple-choice / chain-of-thought / Yes-No prompts and their
            validated answer tokens
  scoring   batched, length-bucketed last-position log-probs (one jit forward)
  labeler   `Labeler`: ResponsePairs -> LabelRecords
"""

from cai_jax.feedback.labeler import FeedbackModel, Labeler, LabelerSettings, model_label
from cai_jax.feedback.prompts import OptionTokenError, answer_context
from cai_jax.feedback.scoring import OptionScorer

__all__ = ["FeedbackModel", "Labeler", "LabelerSettings", "OptionScorer", "OptionTokenError",
           "answer_context", "model_label"]
