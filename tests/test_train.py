"""Batching, local training and evaluation."""

import torch

from fedlora.adapters import attach_lora
from fedlora.data import Example
from fedlora.models import load_model
from fedlora.train import evaluate, make_batch, train_local

CPU = torch.device("cpu")
LABELS = ["negative", "positive"]


def examples(n):
    words = ["good", "great", "fun", "bad", "awful", "boring"]
    out = []
    for i in range(n):
        word = words[i % 6]
        label = int(word in ("good", "great", "fun"))
        prompt = f"the movie was {word} .\nQuestion: which label fits this text: negative or positive ?\nAnswer:"
        out.append(Example(prompt, " " + LABELS[label], label))
    return out


def test_batches_are_left_padded_with_labels_only_on_answers(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir), CPU)
    batch = make_batch([Example("a b c", " good"), Example("a", " bad awful")], tokenizer, 64)
    assert batch.input_ids.shape == (2, 4)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch.position_ids[1].tolist() == [0, 0, 1, 2]
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert batch.labels.tolist() == [[-100, -100, -100, *ids(" good")], [-100, -100, *ids(" bad awful")]]
    assert batch.keep == 3
    cut = make_batch([Example("a b c d e f g h i j", " good")], tokenizer, 8)
    assert cut.input_ids.shape[1] == 8 and cut.input_ids[0, -1] == tokenizer(" good").input_ids[-1]


def test_local_training_learns_a_learnable_task(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    adapted = attach_lora(model, 8, 16, ["q_proj", "v_proj", "o_proj", "down_proj"], seed=0)
    data = examples(60)
    before = evaluate(adapted, tokenizer, data, LABELS, batch_size=16, max_length=64, device=CPU)
    stats = train_local(adapted, tokenizer, data, steps=60, batch_size=12, lr=1e-2,
                        max_length=64, seed=0, device=CPU)
    after = evaluate(adapted, tokenizer, data, LABELS, batch_size=16, max_length=64, device=CPU)
    assert stats["last_loss"] < stats["first_loss"]
    # The frozen random output layer is small, which caps how far the loss can fall;
    # the label choice, though, becomes right for every example.
    assert after["eval_loss"] < before["eval_loss"] - 0.4
    assert before["eval_accuracy"] == 0.5 and after["eval_accuracy"] == 1.0
    assert set(before) == {"eval_loss", "eval_accuracy"}
