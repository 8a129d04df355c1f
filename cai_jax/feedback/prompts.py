"""Feedback prompts, and the answer tokens they are scored on.

Multiple choice (the paper's format), ending so the next token is the letter:

  Consider the following conversation between a human and an assistant:

  Human: <prompt>

  <principle question>
  Options:
  (A) <response shown first>
  (B) <response shown second>
  The answer is: (

Chain of thought inserts "Let's think step by step: <reasoning>" before a
"So the answer is: (" ending. Pointwise asks about one response:

  ...
  Human: <prompt>

  Assistant: <response>

  <yes/no question> Answer Yes or No. Answer:

and reads " Yes" / " No". Few-shot examples from the constitution come
first, each ending with its answer. Format "plain" renders this text
directly (base models, and small instruct models answer A/B better from plain
text); "chat" puts the question in a user turn and the ending in the
assistant turn of the model's chat template.

The answer tokens are never assumed: `answer_context` encodes the prompt
with each option appended and diffs the encodings, because after "(" a
tokenizer may produce "A", " A" or a merged "(A" token.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_jax.constitution import ComparisonExample, Constitution, PointwiseQuestion
from cai_jax.text.tokenizer import Tokenizer

INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER = "The answer is: ("
COT_START = "Let's think step by step:"
COT_ANSWER = "So the answer is: ("
YES_NO = "Answer Yes or No."
YES_NO_ANSWER = "Answer:"
LETTERS = ("A", "B")
YES_NO_OPTIONS = (" Yes", " No")
FORMATS = ("plain", "chat")


class OptionTokenError(ValueError):
  """The answer options are not single, distinct tokens after the prompt."""


def _question_body(prompt: str, question: str, first: str, second: str) -> str:
  return (f"{INTRO}\n\nHuman: {prompt}\n\n{question}\nOptions:\n"
          f"(A) {first}\n(B) {second}")


def _pointwise_body(prompt: str, response: str, question: str) -> str:
  return f"{INTRO}\n\nHuman: {prompt}\n\nAssistant: {response}\n\n{question} {YES_NO}"


def _example_turns(examples: Sequence[ComparisonExample], constitution: Constitution,
                   cot: bool) -> list[tuple[str, str]]:
  """(question body, worked answer) for each few-shot example."""
  out = []
  for ex in examples:
    body = _question_body(ex.prompt, constitution.comparison_principle(ex.principle_id).question,
                          ex.response_a, ex.response_b)
    if cot:
      answer = f"{COT_START} {ex.reasoning}\n{COT_ANSWER}{ex.answer})"
    else:
      answer = f"{ANSWER}{ex.answer})"
    out.append((body, answer))
  return out


def few_shot_examples(constitution: Constitution, num: int, cot: bool
                      ) -> tuple[ComparisonExample, ...]:
  """The first `num` comparison examples (with reasoning, for chain of thought)."""
  pool = [ex for ex in constitution.comparison_few_shot if ex.reasoning or not cot]
  if num > len(pool):
    what = "comparison_few_shot examples with `reasoning`" if cot else "comparison_few_shot examples"
    raise ValueError(f"{constitution.source}: asked for {num} few-shot examples but it has"
                     f" {len(pool)} {what}")
  return tuple(pool[:num])


def render(tok: Tokenizer, turns: Sequence[tuple[str, str]], body: str, ending: str,
           prompt_format: str, sep: str = "\n") -> str:
  """Few-shot turns, then `body`, `sep` and `ending` (the start of the answer)."""
  if prompt_format == "plain":
    shots = "".join(f"{q}{sep}{a}\n\n" for q, a in turns)
    return f"{shots}{body}{sep}{ending}"
  if prompt_format == "chat":
    messages = []
    for q, a in turns:
      messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": body})
    return tok.apply_chat_template(messages, add_generation_prompt=True) + ending
  raise ValueError(f"prompt_format must be one of {FORMATS}, got {prompt_format!r}")


def multiple_choice_prompt(tok: Tokenizer, constitution: Constitution, question: str,
                           prompt: str, first: str, second: str, *,
                           examples: Sequence[ComparisonExample] = (),
                           prompt_format: str = "plain",
                           reasoning: str | None = None) -> str:
  """The A/B question ending in "(" before the answer letter.

  With `reasoning` (chain of thought) the ending is
  "Let's think step by step: <reasoning>\nSo the answer is: (".
  """
  turns = _example_turns(examples, constitution, cot=reasoning is not None)
  body = _question_body(prompt, question, first, second)
  ending = ANSWER if reasoning is None else f"{COT_START} {reasoning}\n{COT_ANSWER}"
  return render(tok, turns, body, ending, prompt_format)


def cot_prompt(tok: Tokenizer, constitution: Constitution, question: str, prompt: str,
               first: str, second: str, *, examples: Sequence[ComparisonExample] = (),
               prompt_format: str = "plain") -> str:
  """The A/B question ending in "Let's think step by step:" for the model to continue."""
  turns = _example_turns(examples, constitution, cot=True)
  body = _question_body(prompt, question, first, second)
  return render(tok, turns, body, COT_START, prompt_format)


def clean_reasoning(text: str) -> str:
  """The generated reasoning up to where the model starts answering or a new example.

  Small models rarely stop on their own: they go on to answer or to write
  another question, which must not leak into the prompt that is scored.
  """
  text = text.lstrip()
  cut = len(text)
  for marker in ("\n\n", "So the answer is", "The answer is", INTRO):
    i = text.find(marker)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut].strip()


def pointwise_prompt(tok: Tokenizer, question: PointwiseQuestion, prompt: str, response: str,
                     *, prompt_format: str = "plain") -> str:
  """The Yes/No question about one response, ending in "Answer:"."""
  body = _pointwise_body(prompt, response, question.question)
  return render(tok, (), body, YES_NO_ANSWER, prompt_format, sep=" ")


def truncate(tok: Tokenizer, text: str, max_tokens: int) -> str:
  """`text` cut to its first `max_tokens` tokens (unchanged when shorter)."""
  if max_tokens <= 0:
    return text
  ids = tok.encode(text, add_bos=False)
  if len(ids) <= max_tokens:
    return text
  return tok.decode(ids[:max_tokens], skip_special_tokens=True).rstrip() + " ..."


def answer_context(tok: Tokenizer, text: str, options: Sequence[str] = LETTERS
                   ) -> tuple[list[int], tuple[int, ...]]:
  """(context ids, one token id per option): P(option) = P(next token | context).

  Encodes `text + option` for every option and takes their longest common
  prefix as the context; each option must add exactly one token after it,
  and the tokens must differ. The context may end before `text` does when
  the tokenizer merges the last prompt character with the option (e.g. a
  "(A" token): then it is the option token that carries the "(".

  Raises OptionTokenError when an option is several tokens, when the options
  do not share a context (one merges with the prompt and another does not),
  or when two options are the same token (e.g. both unknown).
  """
  encoded = [tok.encode(text + o) for o in options]
  common = 0
  shortest = min(len(e) for e in encoded)
  while common < shortest and all(e[common] == encoded[0][common] for e in encoded):
    common += 1
  for option, ids in zip(options, encoded):
    if len(ids) != common + 1:
      tail = [tok.decode([i], skip_special_tokens=False) for i in ids[common:]]
      raise OptionTokenError(
          f"{tok.source}: option {option!r} after {text[-30:]!r} is not one token in"
          f" a context shared by all options {list(options)} (it encodes as {tail} after"
          f" {common} shared tokens). Use a prompt ending / option labels that this"
          " tokenizer encodes as single distinct tokens.")
  ids = tuple(e[common] for e in encoded)
  if len(set(ids)) != len(ids):
    raise OptionTokenError(
        f"{tok.source}: options {list(options)} map to the same token ids {ids} after"
        f" {text[-30:]!r}; their probabilities cannot be told apart")
  if common == 0:
    raise OptionTokenError(f"{tok.source}: empty context before the options")
  return encoded[0][:common], ids
