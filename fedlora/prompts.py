"""Examples as tokens: a plain prompt or the model's chat template, and which tokens the
loss covers.

An example (fedlora.data.Example) is one of three kinds:

- a classification example: a prompt that asks for a label, answered by a label word;
- a prompt/response pair;
- a conversation (``turns``: rows of messages, ShareGPT or Alpaca data).

A conversation is rendered by the tokenizer's chat template (``apply_chat_template``, the
rendering the model was tuned on), or, for a model without one, by :data:`PLAIN_TEMPLATE`.
The loss covers every assistant turn: the tokens that turn adds to the rendering of the
turns before it followed by the template's generation prompt (ChatML's
``<|im_start|>assistant\\n``), its end-of-turn token included, so that the model learns to
stop; everything else (system, user, the headers) is masked. A conversation longer than
``max_length`` is cut after its last assistant turn that fits, and left out when even the
first one does not (:func:`fit_examples` counts both).

A classification or prompt/response example is a plain prompt followed by its answer and
end-of-sequence; with ``chat`` (``--chat-template on``) it goes through the chat template
instead, the prompt as the user's turn and the label word or response as the
assistant's. Its prompt is cut from the left to fit, so that the question at its end
stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedlora.data import SHOWN_BAD_ROWS, Example
from fedlora.errors import FedLoraError

log = logging.getLogger("fedlora")

# For a model without a chat template: each turn a paragraph named by its role; an
# assistant turn ends with end-of-sequence, where generation stops.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """An example's tokens and the ``[begin, end)`` spans of its answer tokens (every
    assistant turn of a conversation), in order; ``cut``: turns were left out to fit."""

    ids: list[int]
    answers: list[tuple[int, int]]
    cut: bool = False

    @property
    def prompt_length(self) -> int:
        """The tokens before the last answer: what generation continues."""
        return self.answers[-1][0]

    @property
    def answer_mask(self) -> list[bool]:
        mask = [False] * len(self.ids)
        for begin, end in self.answers:
            mask[begin:end] = [True] * (end - begin)
        return mask


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens of a plain answer, ending with end-of-sequence: a label word is then a
    whole answer, not a prefix of a longer one ("good" of "good fun"), and greedy decoding
    learns where a response stops."""
    if not answer:
        return []
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def rendered_ids(tokenizer, turns, generation_prompt: bool = False) -> list[int]:
    """The tokens of ``turns`` ((role, content) pairs) through the chat template (the
    model's, else :data:`PLAIN_TEMPLATE`): the same tokens as
    ``tokenizer.apply_chat_template(messages)``."""
    messages = [{"role": role, "content": content} for role, content in turns]
    text = tokenizer.apply_chat_template(
        messages, chat_template=tokenizer.chat_template or PLAIN_TEMPLATE, tokenize=False,
        add_generation_prompt=generation_prompt)
    # The template writes the special tokens it wants (a beginning of text, say).
    return tokenizer(text, add_special_tokens=False).input_ids


def conversation_tokens(tokenizer, turns) -> Encoded:
    """A whole conversation's tokens and its assistant turns' spans (see the module
    docstring). Raises FedLoraError for a template that does not render a conversation's
    beginning as a prefix of the whole (its assistant tokens cannot then be located)."""
    ids = rendered_ids(tokenizer, turns)
    answers = []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = rendered_ids(tokenizer, turns[:k], generation_prompt=True)
        through = rendered_ids(tokenizer, turns[: k + 1])
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise FedLoraError("the model's chat template does not render the start of a "
                               "conversation as the start of the whole: its assistant tokens "
                               "cannot be told apart (set the tokenizer's chat_template to one "
                               "that does)")
        answers.append((len(before), len(through)))
    return Encoded(ids, answers)


def encode(example: Example, tokenizer, max_length: int, chat: bool = False) -> Encoded | None:
    """``example``'s tokens, at most ``max_length`` of them, and its answer spans; None for
    a conversation whose first assistant turn ends beyond ``max_length``."""
    if example.turns:
        whole = conversation_tokens(tokenizer, example.turns)
        if len(whole.ids) <= max_length:
            return whole
        fitting = [span for span in whole.answers if span[1] <= max_length]
        if not fitting:
            return None
        return Encoded(whole.ids[: fitting[-1][1]], fitting, cut=True)
    if chat:
        prompt, answer = chat_prompt_and_answer(tokenizer, example)
    else:
        prompt, answer = prompt_ids(example, tokenizer, max_length), answer_ids(tokenizer, example.answer)
    answer = answer[: max_length // 2]
    prompt = prompt[-(max_length - len(answer)) :]  # keep the question at the prompt's end
    return Encoded(prompt + answer, [(len(prompt), len(prompt) + len(answer))])


def fitted(example: Example, tokenizer, max_length: int, chat: bool = False) -> Encoded:
    """:func:`encode`, or FedLoraError for a conversation that does not fit
    (:func:`fit_examples` leaves those out first)."""
    encoded = encode(example, tokenizer, max_length, chat)
    if encoded is None:
        raise FedLoraError(f"{example.origin or 'a conversation'}: its first assistant turn "
                           f"ends beyond --max-length {max_length}")
    return encoded


def chat_prompt_and_answer(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """A single-turn example through the chat template: the tokens before its answer and
    its answer's (the assistant turn, its end-of-turn included), located as a
    conversation's are (:func:`conversation_tokens`)."""
    whole = conversation_tokens(tokenizer, chat_turns(example, with_answer=True))
    [(begin, end)] = whole.answers
    return whole.ids[:begin], whole.ids[begin:end]


def chat_turns(example: Example, with_answer: bool) -> list[tuple[str, str]]:
    """A single-turn example as a conversation: its prompt the user's turn, its answer
    (without a plain prompt's leading space) the assistant's."""
    turns = [("user", example.prompt.strip())]
    return turns + [("assistant", example.answer.strip())] if with_answer else turns


def prompt_ids(example: Example, tokenizer, max_length: int, chat: bool = False) -> list[int]:
    """The tokens an answer to ``example`` continues (its last answer, for a conversation),
    uncut for a single-turn example."""
    if example.turns:
        encoded = fitted(example, tokenizer, max_length, chat)
        return encoded.ids[: encoded.prompt_length]
    if chat:
        return rendered_ids(tokenizer, chat_turns(example, with_answer=False),
                            generation_prompt=True)
    return tokenizer(example.prompt, add_special_tokens=True).input_ids


def label_answer_ids(tokenizer, label_words: list[str], chat: bool = False) -> list[list[int]]:
    """Each label's answer tokens, which must differ: " word" and end of sequence, or
    with ``chat`` the assistant turn of the word, its end-of-turn included (the same after
    any user turn: it follows the template's generation prompt)."""
    if chat:
        label_ids = [chat_prompt_and_answer(tokenizer, Example("x", w))[1] for w in label_words]
    else:
        label_ids = [answer_ids(tokenizer, " " + w) for w in label_words]
    if len(set(map(tuple, label_ids))) < len(label_ids):
        raise FedLoraError(f"label words {label_words} tokenize alike; they cannot be told apart")
    return label_ids


def fit_examples(examples: list[Example], tokenizer, max_length: int, source: str,
                 chat: bool = False) -> tuple[list[Example], int, int]:
    """(the examples that fit ``max_length``, how many of them were cut, how many were
    left out). Only a conversation is cut (at a turn boundary) or left out (its first
    assistant turn ends beyond ``max_length``); a line names each of the first
    :data:`fedlora.data.SHOWN_BAD_ROWS` left out, and one more line counts them all."""
    kept, cut, left_out = [], 0, []
    for example in examples:
        if not example.turns:
            kept.append(example)
            continue
        encoded = encode(example, tokenizer, max_length, chat)
        if encoded is None:
            left_out.append(example)
            continue
        cut += encoded.cut
        kept.append(example)
    for example in left_out[:SHOWN_BAD_ROWS]:
        log.warning("%s: its first assistant turn ends beyond --max-length %d; left out",
                    example.origin or source, max_length)
    if cut or left_out:
        log.warning("%s: %d conversations cut after their last assistant turn within "
                    "--max-length %d, %d left out", source, cut, max_length, len(left_out))
    return kept, cut, len(left_out)
