"""Evaluation: whole-sequence label scores, macro-F1, generation matches, pooled counts."""

import pytest
import torch
from flwr.app import MetricRecord

from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.evaluate import (
    Scores,
    final_number,
    label_log_likelihoods,
    macro_f1,
    normalize_answer,
    score,
)
from fedlora.models import load_model
from fedlora.prompts import label_answer_ids
from fedlora.train import train_local

CPU = torch.device("cpu")
# Ten labels of one to three tokens that share first tokens ("not", "very", "good", "bad").
LABELS = ["good", "bad", "not good", "not bad", "very good", "very bad", "not very good",
          "not very bad", "good fun", "bad plot"]


def ten_class_examples(n):
    """Label k's prompts start with words k and k + 1; a third word varies."""
    words = "a the movie film is was great awful fun boring plot actors".split()
    return [Example(f"{words[i % 10]} {words[i % 10 + 1]} {words[(5 * i) % 12]} .\nAnswer:",
                    " " + LABELS[i % 10], i % 10) for i in range(n)]


def direct_log_likelihood(model, tokenizer, prompt, word):
    """log p(word | prompt) from one unpadded forward pass of prompt + word, no cache."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    word_ids = tokenizer(" " + word, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + word_ids])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(word_ids))


def test_label_scores_are_whole_sequence_log_likelihoods(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    model.requires_grad_(True)  # fully fine-tuned, so that its answers differ by label
    data = ten_class_examples(23)  # prompts of different lengths: left padding in a batch
    train_local(model, tokenizer, data, steps=40, batch_size=12, lr=1e-2, max_length=64,
                seed=0, device=CPU)
    torch.set_grad_enabled(False)
    lengths = {len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in LABELS}
    assert lengths == {1, 2, 3}
    direct = torch.tensor([[direct_log_likelihood(model, tokenizer, e.prompt, w) for w in LABELS]
                           for e in data], dtype=torch.float64)
    label_ids = label_answer_ids(tokenizer, LABELS)
    prompts = [tokenizer(e.prompt).input_ids for e in data]
    batched = label_log_likelihoods(model, prompts, label_ids, 64, CPU, tokenizer.pad_token_id)
    assert torch.allclose(batched.double(), direct, atol=1e-4)
    predicted = direct.argmax(dim=1)
    truth = torch.tensor([e.label for e in data])
    assert len(set(predicted.tolist())) >= 8  # labels of 1 to 3 words, prefixes of others too
    scores = score(model, tokenizer, data, LABELS, batch_size=8, max_length=64, device=CPU)
    metrics = scores.metrics()
    assert metrics["eval_accuracy"] == pytest.approx(float((predicted == truth).double().mean()))
    from sklearn.metrics import f1_score

    assert metrics["eval_macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    true_loglik = direct[torch.arange(len(data)), truth]
    tokens = sum(len(tokenizer(e.answer, add_special_tokens=False).input_ids) + 1 for e in data)
    assert metrics["eval_loss"] == pytest.approx(float(-true_loglik.sum() / tokens), rel=1e-5)
    assert metrics["eval_majority_accuracy"] == pytest.approx(3 / 23)  # labels 0, 1, 2 occur 3 times
    torch.set_grad_enabled(True)


def test_macro_f1_by_hand_and_against_scikit_learn():
    # truth: 0 0 0 1 1 2; predicted: 0 0 1 1 2 2 -> F1 0.8, 0.5, 0.667; label 3 never occurs
    assert macro_f1([3, 2, 1, 0], [2, 2, 2, 0], [2, 1, 1, 0]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    from sklearn.metrics import f1_score

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        truth = torch.randint(0, 6, (50,), generator=generator)
        predicted = torch.where(torch.rand(50, generator=generator) < 0.5, truth,
                                torch.randint(0, 6, (50,), generator=generator))
        counts = [torch.bincount(t, minlength=6).tolist() for t in (truth, predicted,
                                                                     truth[predicted == truth])]
        assert macro_f1(*counts) == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_exact_match_and_numeric_answers():
    assert normalize_answer("  The  Answer\nis\tPARIS ") == "the answer is paris"
    cases = {  # text -> its numeric answer
        "so she has 3 + 4 = 7 apples.\n#### 7": "7",
        "#### 1,250": "1250",
        "It costs 12.50 dollars": "12.5",
        "about 3.0": "3",
        "no number here": None,
        "-4 degrees, then #### -12": "-12",
    }
    for text, number in cases.items():
        assert final_number(text) == number, text
    assert final_number("she has 7", marked_only=True) is None


@torch.no_grad()
def test_batched_greedy_generation_matches_one_at_a_time(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    prompts = ["the movie was", "a film", "the plot is very", "actors"]
    singles = []
    for prompt in prompts:  # one prompt at a time: no padding
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        singles.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    # Each example's response is its own greedy generation, or that plus a word: exact
    # match must count exactly the first kind, in a left-padded batch.
    data = [Example(p, " " + (s if i % 2 else s + " boring"))
            for i, (p, s) in enumerate(zip(prompts, singles))]
    scores = score(model, tokenizer, data, None, batch_size=4, max_length=32, device=CPU,
                   max_new_tokens=4)
    assert (scores.generated, scores.exact_matches) == (4, 2)
    assert "eval_exact_match" in scores.metrics() and "eval_accuracy" not in scores.metrics()


def test_pooled_counts_equal_the_evaluation_of_the_union(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    data = ten_class_examples(30)
    parts = [score(model, tokenizer, chunk, LABELS, batch_size=8, max_length=64, device=CPU)
             for chunk in (data[:7], data[7:19], data[19:])]
    whole = score(model, tokenizer, data, LABELS, batch_size=8, max_length=64, device=CPU)
    pooled = parts[0] + parts[1] + parts[2]
    for key, value in whole.metrics().items():
        assert pooled.metrics()[key] == pytest.approx(value, rel=1e-6), key


def test_hostile_evaluation_counts_are_refused():
    good = Scores(examples=4, loss_sum=2.0, tokens=4, label_counts=[3, 1],
                  predicted_counts=[2, 2], correct_counts=[2, 1])
    assert Scores.from_record(MetricRecord(good.to_record()), 2) == good
    bad = {
        "loss-sum": float("nan"),
        "examples": -1,
        "label-counts": [3, 1, 0],
        "correct-counts": [3, 1],  # more correct than predicted of label 0
        "predicted-counts": [4, 1],  # adds up to 5, not 4
    }
    for key, value in bad.items():
        record = MetricRecord({**good.to_record(), key: value})
        with pytest.raises(FedLoraError):
            Scores.from_record(record, 2)


def test_federated_evaluation_pools_good_replies_and_leaves_out_bad_ones(tiny_model_dir):
    from conftest import make_reply
    from flwr.app import ConfigRecord, RecordDict

    from strategies.fedavg import FedAvgLoRA

    def reply(node, client, scores):
        return make_reply(node, RecordDict({"metrics": MetricRecord(scores.to_record()),
                                            "client": ConfigRecord({"client-id": client})}))

    # Generation counts: exact matches 3 of 4 and 1 of 6; numeric 1 of 2 and 0 of 3.
    a = Scores(examples=4, loss_sum=8.0, tokens=10, generated=4, exact_matches=3,
               numeric_examples=2, numeric_matches=1)
    b = Scores(examples=6, loss_sum=3.0, tokens=20, generated=6, exact_matches=1,
               numeric_examples=3, numeric_matches=0)
    hostile = Scores(examples=2, loss_sum=1.0, tokens=2, generated=2, exact_matches=5)
    strategy = FedAvgLoRA()
    metrics = strategy.aggregate_evaluate(3, [
        reply(1, "clinic-a", a), reply(2, "clinic-b", b), reply(3, "clinic-c", hostile),
        reply(4, "clinic-a", b),  # a second reply in one client's name
        make_reply(5, error="Traceback ...\nFedLoraError: c.csv has no column 'text'"),
    ])
    assert metrics["fed_eval_loss"] == pytest.approx(11.0 / 30)  # per token, pooled
    assert metrics["fed_eval_exact_match"] == pytest.approx(4 / 10)
    assert metrics["fed_eval_exact_match_min"] == pytest.approx(1 / 6)
    assert metrics["fed_eval_numeric_match"] == pytest.approx(1 / 5)
    assert metrics["fed_eval_clients"] == 2 and sorted(strategy.evaluated_clients) == ["clinic-a", "clinic-b"]
    assert "fed_eval_accuracy" not in metrics
