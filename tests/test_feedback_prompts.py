"""The feedback prompts (feedback/prompts.py): answer tokens, chain-of-thought reasoning
cut at the answer."""

import pytest

from cai_jax.constitution import load_constitution
from cai_jax.feedback import OptionTokenError, answer_context, prompts


def _crafted_tokenizer(extra_tokens=(), letters=True):
  """A character-level BPE; `extra_tokens` are merged pairs such as "(A"."""
  from tokenizers import Tokenizer as RawTokenizer, models
  from cai_jax.text.tokenizer import Tokenizer
  chars = [chr(i) for i in range(32, 127) if letters or chr(i) not in "AB"] + ["\n"]
  vocab = {t: i for i, t in enumerate(["<unk>", "<eos>"] + chars + list(extra_tokens))}
  merges = [(t[0], t[1:]) for t in extra_tokens]
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
  return Tokenizer.from_tokenizers(raw, eos_token="<eos>", unk_token="<unk>")


def test_answer_tokens_are_derived_and_validated(tiny_model_dir):
  from cai_jax.text.tokenizer import Tokenizer
  con = load_constitution("harmless")
  text = "Options:\n(A) yes\n(B) no\nThe answer is: ("
  tok = Tokenizer.from_dir(tiny_model_dir)
  context, ids = answer_context(tok, text)
  assert context == tok.encode(text) and len(set(ids)) == 2
  assert [tok.decode([i]) for i in ids] == ["A", "B"]
  # A tokenizer that merges "(" with both letters: the context drops the "(".
  merged = _crafted_tokenizer(["(A", "(B"])
  context, ids = answer_context(merged, text)
  assert context == merged.encode(text)[:-1]
  assert [merged.decode([i]) for i in ids] == ["(A", "(B"]
  # Merges "(A" but not "(B": the options have no shared context.
  with pytest.raises(OptionTokenError, match="not one token"):
    answer_context(_crafted_tokenizer(["(A"]), text)
  # Letters unknown to the vocabulary: both become <unk>.
  with pytest.raises(OptionTokenError):
    answer_context(_crafted_tokenizer(letters=False), text)
  # Multi-token option labels.
  with pytest.raises(OptionTokenError, match="not one token"):
    answer_context(tok, text, options=("Alpha", "Beta"))
  # The rendered prompts end where the answer token goes.
  mc = prompts.multiple_choice_prompt(tok, con, con.comparison[0].question, "Hi?", "a", "b",
                                      examples=con.comparison_few_shot[:1])
  assert mc.endswith(prompts.ANSWER) and mc.count("Options:") == 2 and "(B)\n\n" in mc
  pw = prompts.pointwise_prompt(tok, con.comparison[0].pointwise, "Hi?", "hello")
  assert pw.endswith("Answer Yes or No. Answer:")
  # This tokenizer has no " Yes" token: pointwise mode cannot be scored with it.
  with pytest.raises(OptionTokenError, match="' Yes'"):
    answer_context(tok, pw, prompts.YES_NO_OPTIONS)
  chat = prompts.multiple_choice_prompt(tok, con, "Q?", "Hi?", "a", "b", prompt_format="chat")
  assert "<|im_start|>assistant\nThe answer is: (" in chat


def test_clean_reasoning_stops_at_the_answer():
  assert prompts.clean_reasoning(" (A) helps.\nSo the answer is: (A)") == "(A) helps."
  assert prompts.clean_reasoning("\n\n (B) refuses.\n\nConsider the following") == "(B) refuses."
