"""Conversation and instruction data: formats, the chat template, the assistant-token mask,
cutting to --max-length, generation scores, and a federation of chat clients."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pandas as pd
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.data import Example, local_examples, read_examples
from fedlora.errors import FedLoraError
from fedlora.evaluate import rouge_l, score, token_f1
from fedlora.models import load_model
from fedlora.prompts import (
    PLAIN_TEMPLATE, encode, fit_examples, label_answer_ids, prompt_ids, rendered_ids,
)
from fedlora.train import answer_loss, make_batch

CPU = torch.device("cpu")
CONVERSATION = (("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"),
                ("user", "What is 2 + 2?"), ("assistant", "It is 4."))


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama: random weights, SmolLM2-Instruct's tokenizer and ChatML template."""
    return load_model("tiny-llama", CPU)


def test_a_conversation_is_the_chat_templates_tokens(tiny):
    _, tokenizer = tiny
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    encoded = encode(Example("", "It is 4.", turns=CONVERSATION), tokenizer, 512)
    assert encoded.ids == list(expected)
    assert rendered_ids(tokenizer, CONVERSATION) == list(expected)


def test_the_loss_covers_every_assistant_turn_and_nothing_else(tiny):
    _, tokenizer = tiny
    encoded = encode(Example("", "It is 4.", turns=CONVERSATION), tokenizer, 512)
    text = tokenizer.decode(encoded.ids)
    # By hand: ChatML puts each turn between <|im_start|>role\n and <|im_end|>\n; the
    # assistant's content and its end of turn are what the model must learn to write.
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                    "<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    assert [tokenizer.decode(encoded.ids[b:e]) for b, e in encoded.answers] \
        == ["Hello!<|im_end|>\n", "It is 4.<|im_end|>\n"]
    for begin, _ in encoded.answers:
        assert tokenizer.decode(encoded.ids[:begin]).endswith("<|im_start|>assistant\n")
    batch = make_batch([Example("", "It is 4.", turns=CONVERSATION)], tokenizer, 512)
    labelled = (batch.labels[0] != -100).nonzero().flatten().tolist()
    width = batch.input_ids.shape[1]
    assert labelled == [i + width - len(encoded.ids)
                        for b, e in encoded.answers for i in range(b, e)]
    packed = make_batch([Example("", "It is 4.", turns=CONVERSATION)] * 2, tokenizer, 512,
                        packed=True)
    assert int((packed.labels != -100).sum()) == 2 * len(labelled)


def test_a_model_without_a_chat_template_gets_the_plain_one(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir), CPU)
    assert not tokenizer.chat_template
    turns = (("user", "the movie was good"), ("assistant", "positive"))
    encoded = encode(Example("", "positive", turns=turns), tokenizer, 64)
    assert tokenizer.decode(encoded.ids) == tokenizer.decode(tokenizer(
        "User: the movie was good\n\nAssistant: positive</s>\n\n", add_special_tokens=False).input_ids)
    [(begin, end)] = encoded.answers
    assert tokenizer.convert_ids_to_tokens(encoded.ids[begin:end]) == ["positive", "</s>"]
    assert "eos_token" in PLAIN_TEMPLATE  # generation stops where an assistant turn ends


def test_a_long_conversation_is_cut_at_a_turn_boundary_or_left_out(tiny, caplog):
    _, tokenizer = tiny
    whole = encode(Example("", "", turns=CONVERSATION), tokenizer, 512)
    first_end, second_end = (end for _, end in whole.answers)
    cut = encode(Example("", "", turns=CONVERSATION), tokenizer, second_end - 1)
    assert cut.cut and cut.ids == whole.ids[:first_end] and cut.answers == whole.answers[:1]
    assert encode(Example("", "", turns=CONVERSATION), tokenizer, first_end - 1) is None
    examples = [Example("", "", turns=CONVERSATION, origin=f"chat.jsonl row {i}") for i in (1, 2)]
    examples.append(Example("a plain prompt", " answer"))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        kept, cut_count, left_out = fit_examples(examples, tokenizer, first_end - 1, "chat.jsonl")
    assert (len(kept), cut_count, left_out) == (1, 0, 2)
    assert caplog.messages[0] == ("chat.jsonl row 1: its first assistant turn ends beyond "
                                  f"--max-length {first_end - 1}; left out")
    assert caplog.messages[-1] == (f"chat.jsonl: 0 conversations cut after their last "
                                   f"assistant turn within --max-length {first_end - 1}, 2 left out")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MESSAGES = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Thanks"}]},  # a last question: dropped
            {"messages": [{"role": "user", "content": "Name a colour"},
                          {"role": "assistant", "content": "Blue"}]}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be kind"}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}]}]
ALPACA = [{"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hello", "input": "", "output": "Hello"}]


def test_each_format_is_recognised_from_its_columns(tmp_path):
    config = RunConfig()
    examples, words = read_examples(str(write_jsonl(tmp_path / "m.jsonl", MESSAGES)), config, None)
    assert words is None
    assert [e.turns for e in examples] == [(("user", "Hi"), ("assistant", "Hello")),
                                           (("user", "Name a colour"), ("assistant", "Blue"))]
    assert examples[1].answer == "Blue" and examples[1].origin.endswith("m.jsonl row 2")
    examples, _ = read_examples(str(write_jsonl(tmp_path / "s.jsonl", SHAREGPT)), config, None)
    assert examples[0].turns == (("system", "Be kind"), ("user", "Hi"), ("assistant", "Hello"))
    pd.DataFrame(ALPACA).to_parquet(tmp_path / "a.parquet")
    examples, _ = read_examples(str(tmp_path / "a.parquet"), config, None)
    assert [e.turns for e in examples] == [(("user", "Add the numbers\n\n2 and 3"), ("assistant", "5")),
                                           (("user", "Say hello"), ("assistant", "Hello"))]
    # The same messages from a CSV (JSON in the cell) and from parquet (arrays)
    frame = pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in MESSAGES]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(MESSAGES).to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        again, _ = read_examples(str(tmp_path / name), config, None)
        assert [e.turns for e in again] == [(("user", "Hi"), ("assistant", "Hello")),
                                            (("user", "Name a colour"), ("assistant", "Blue"))]
    # --data-format overrides: Alpaca columns read as classification need text and label
    with pytest.raises(FedLoraError, match=r"has no column 'text' \(read as classification data"):
        read_examples(str(tmp_path / "a.parquet"), RunConfig(data_format="classification"), None)


@pytest.mark.parametrize("rows, line", [
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}],
     "row 1: message 2 has the unknown role 'bot'; valid roles: system, user, assistant; left out"),
    ([{"messages": []}], "row 1: an empty conversation; left out"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], "row 1: no assistant turn; left out"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}],
     "row 1: message 2 has the unknown role 'assistant'; valid roles: system, human, gpt; left out"),
    ([{"instruction": "Do it", "output": ""}], "row 1: an empty output; left out"),
])
def test_a_bad_row_is_one_line_and_the_rest_is_used(tmp_path, rows, line, caplog):
    good = {"messages": MESSAGES[1]["messages"]} if "messages" in rows[0] else (
        SHAREGPT[0] if "conversations" in rows[0] else ALPACA[1])
    path = write_jsonl(tmp_path / "d.jsonl", rows + [good])
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        examples, _ = read_examples(str(path), RunConfig(), None)
    assert len(examples) == 1 and examples[0].origin == f"{path} row 2"
    assert caplog.messages == [f"{path} {line}"]


def test_a_file_without_a_usable_row_or_column_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}])
    with pytest.raises(FedLoraError, match=r"d.jsonl holds no usable conversation \(.*row 1: an "
                                           r"empty conversation\)$"):
        read_examples(str(path), RunConfig(), None)
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x"}])
    with pytest.raises(FedLoraError, match=r"e.jsonl has no column 'output' \(read as alpaca data"):
        read_examples(str(path), RunConfig(data_format="alpaca"), None)


def test_generation_scores_against_reference_values():
    # SQuAD's evaluation: articles and punctuation go, then words are counted
    assert token_f1("the Denver Broncos", "Denver Broncos!") == 1.0
    assert token_f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "Denver") == 0.0
    # ROUGE-L: the longest common subsequence "the cat on the mat", 5 of 6 words each way
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert rouge_l("mat the", "the mat") == pytest.approx(0.5)  # order matters


def test_chat_scores_match_the_training_loss_and_generate_the_last_turn(tiny):
    model, tokenizer = tiny
    examples = [Example("", "It is 4.", turns=CONVERSATION),
                Example("", "Blue", turns=(("user", "Name a colour"), ("assistant", "Blue")))]
    scores = score(model, tokenizer, examples, None, batch_size=2, max_length=128, device=CPU,
                   max_new_tokens=3)
    with torch.no_grad():
        alone = [answer_loss(model, make_batch([e], tokenizer, 128)) for e in examples]
    tokens = [sum(e - b for b, e in encode(x, tokenizer, 128).answers) for x in examples]
    assert scores.tokens == sum(tokens)
    assert scores.loss_sum == pytest.approx(sum(float(l) * t for l, t in zip(alone, tokens)), rel=1e-4)
    assert scores.generated == 2 and 0.0 <= scores.rouge_l_sum <= 2.0
    # The generation continues the turns before the last answer, after its header
    prompt = prompt_ids(examples[0], tokenizer, 128)
    assert tokenizer.decode(prompt).endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_a_label_word_through_the_chat_template_scores_as_it_trains(tiny):
    model, tokenizer = tiny
    words = ["negative", "positive"]
    label_ids = label_answer_ids(tokenizer, words, chat=True)
    assert [tokenizer.decode(ids) for ids in label_ids] == ["negative<|im_end|>\n", "positive<|im_end|>\n"]
    example = Example("the movie was good\nAnswer:", " positive", label=1)
    scores = score(model, tokenizer, [example], words, batch_size=1, max_length=64, device=CPU,
                   chat=True)
    with torch.no_grad():
        loss = answer_loss(model, make_batch([example], tokenizer, 64, chat=True))
    assert scores.tokens == len(label_ids[1])
    assert scores.loss_sum / scores.tokens == pytest.approx(float(loss), rel=1e-4)


def test_client_files_of_conversations_need_no_labels(tmp_path):
    files = [write_jsonl(tmp_path / "m.jsonl", MESSAGES * 3), tmp_path / "a.parquet"]
    pd.DataFrame(ALPACA * 3).to_parquet(files[1])
    config = RunConfig(client_data=",".join(map(str, files)), evaluation="federated")
    from fedlora.data import server_data

    assert server_data(config).label_words is None
    train, held = local_examples(config, str(files[1]), 1, 2, None)
    assert len(train) + len(held) == 6 and all(e.turns for e in train + held)


def test_a_federation_of_chat_clients_learns_and_scores_generations(tmp_path):
    """Two clients, one with a messages file (one bad row, one too long), one with an
    Alpaca file; federated evaluation with generation metrics."""
    rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}"},
                          {"role": "assistant", "content": "I am happy to help."}]}
            for i in range(40)]
    rows[3]["messages"][1]["role"] = "robot"
    rows[5]["messages"][0]["content"] = "word " * 200  # its first answer ends beyond 64 tokens
    messages = write_jsonl(tmp_path / "chat.jsonl", rows)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": f"Describe thing {i}", "input": "", "output": "I am happy to help."}
        for i in range(40)])
    command = [sys.executable, "-m", "fedlora.simulate", "--model", "tiny-llama",
               "--client-data", f"{messages},{alpaca}", "--rounds", "2", "--local-steps", "12",
               "--lr", "0.01", "--max-length", "64", "--eval-max-new-tokens", "8",
               "--client-eval-fraction", "0.2", "--output", str(tmp_path), "--name", "chat"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"{messages} row 4: message 2 has the unknown role 'robot'" in log
    rows = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").open()]
    for row in rows:
        assert {"fed_eval_loss", "fed_eval_exact_match", "fed_eval_token_f1",
                "fed_eval_rouge_l"} <= set(row)
        assert "fed_eval_accuracy" not in row
        assert all(0.0 <= row[f"fed_eval_{m}"] <= 1.0 for m in ("token_f1", "rouge_l"))
    # The answer is always the same sentence. The random model starts at log(49152) = 10.8
    # nats; its frozen tied embeddings cap what a LoRA on q, v learns in 2 rounds (0.6 nats).
    assert rows[-1]["fed_eval_loss"] < rows[0]["fed_eval_loss"] - 0.3
    # row 6 is counted where it falls in the training part, else it is left out of the
    # held-out slice (and not counted)
    assert {r.get("examples_left_out", 0) for r in rows[1:]} <= {0, 1}


def test_the_saved_adapter_has_a_model_card_that_says_what_it_is(tmp_path):
    from server.outputs import model_card

    config = RunConfig(strategy="fedsb", client_data="a.jsonl,b.jsonl", num_clients=2, dp="user",
                       name="run", chat_template=True)
    rows = [{"round": 0, "fed_eval_loss": 2.5}, {"round": 1, "epsilon": 3.21, "delta": 1e-5}]
    adapter = {"base_model_name_or_path": "/models/base", "r": 32, "lora_alpha": 16.0,
               "target_modules": ["v_proj", "q_proj"]}
    card = model_card(config, rows, adapter, base_delta=True, chat_template=False)
    assert "More Information Needed" not in card
    for text in ("- **Method**: fedsb; rounds: 1; clients: 2,",
                 "- **LoRA**: rank 32, alpha 16, modules q_proj, v_proj (the base weights changed",
                 "fedlora's plain chat template (fedlora.prompts.PLAIN_TEMPLATE)",
                 "- **Evaluation** (round 0): fed_eval_loss 2.5",
                 "- **Privacy**: --dp user: epsilon 3.21 at delta 1e-05 after round 1",
                 "base = apply_base_delta(base, 'adapter')"):
        assert text in card
