"""The one chat rule: how a conversation becomes token ids, for every stage.

Sampling (stages 2, 4, 8 and the PPO rollout) feeds the model
`generation_ids`: the rendered conversation ending in the assistant's
generation prompt. SFT, the preference model and the PPO reward see
`prompt_response_ids`: that same generation prompt, tokenized alone, then
the assistant's response up to and including its end-of-turn token, i.e.
exactly the tokens the policy produces when it stops. The PM reads its score
at that end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_jax.text.tokenizer import Tokenizer

Message = dict[str, str]


def user_turn(prompt: str) -> list[Message]:
  return [{"role": "user", "content": prompt}]


def generation_ids(tok: Tokenizer, messages: Sequence[Message],
                   add_generation_prompt: bool = True) -> list[int]:
  """Token ids of a rendered chat (the tokenizer does not double a BOS)."""
  text = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
  return tok.encode(text)


def prompt_response_ids(tok: Tokenizer, prompt: str, response: str, what: str = ""
                        ) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) of [user: prompt, assistant: response].

  The prompt is the template's generation prompt, tokenized alone, so a model
  trains on exactly the prefix it sees when sampling; the response is the
  rest of the rendered conversation, cut after its end-of-turn token (one is
  appended when the template writes none). `what` names the conversation in
  errors.
  """
  user = user_turn(prompt)
  prompt_text = tok.apply_chat_template(user, add_generation_prompt=True)
  full_text = tok.apply_chat_template(
      user + [{"role": "assistant", "content": response}], add_generation_prompt=False)
  if not full_text.startswith(prompt_text):
    raise ValueError(f"{tok.source}: the chat template renders the conversation of"
                     f" {what or 'a prompt'} with a different prefix than its generation"
                     " prompt; training needs a template where the assistant turn extends it")
  prompt_ids = tok.encode(prompt_text)
  response_ids = tok.encode(full_text[len(prompt_text):], add_bos=False)
  ends = [i for i, t in enumerate(response_ids) if t in tok.eos_ids]
  if ends:
    response_ids = response_ids[:ends[0] + 1]
  elif tok.eos_ids:
    response_ids = response_ids + [tok.eos_ids[0]]
  return prompt_ids, response_ids


def conversation_ids(tok: Tokenizer, prompt: str, response: str, what: str = "") -> list[int]:
  """[user: prompt, assistant: response] up to and including the end-of-turn token."""
  prompt_ids, response_ids = prompt_response_ids(tok, prompt, response, what)
  return prompt_ids + response_ids
