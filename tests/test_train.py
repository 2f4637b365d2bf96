"""Batching, local training and evaluation."""

import torch

from fedlora.adapters import attach_lora
from fedlora.data import Example
from fedlora.models import load_model
from fedlora.evaluate import evaluate
from fedlora.train import make_batch, train_local

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
    assert batch.input_ids.shape == (2, 5)  # answers end with end-of-sequence
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids[1].tolist() == [0, 0, 1, 2, 3]
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = tokenizer.eos_token_id
    assert batch.labels.tolist() == [[-100, -100, -100, *ids(" good"), eos],
                                     [-100, -100, *ids(" bad awful"), eos]]
    assert batch.keep == 4
    cut = make_batch([Example("a b c d e f g h i j", " good")], tokenizer, 8)
    assert cut.input_ids.shape[1] == 8 and cut.input_ids[0, -2] == tokenizer(" good").input_ids[-1]


def test_local_training_learns_a_learnable_task(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    adapted = attach_lora(model, 8, 16, ["q_proj", "v_proj", "o_proj", "down_proj"], seed=0)
    data = examples(60)
    before = evaluate(adapted, tokenizer, data, LABELS, batch_size=16, max_length=64, device=CPU)
    stats = train_local(adapted, tokenizer, data, steps=120, batch_size=12, lr=3e-2,
                        max_length=64, seed=0, device=CPU)
    after = evaluate(adapted, tokenizer, data, LABELS, batch_size=16, max_length=64, device=CPU)
    assert stats["last_loss"] < stats["first_loss"]
    # The frozen random output layer is small, which caps how far the loss can fall;
    # the label choice, though, becomes right for every example.
    assert after["eval_loss"] < before["eval_loss"] - 0.4
    assert before["eval_accuracy"] == 0.5 and after["eval_accuracy"] == 1.0
    assert after["eval_macro_f1"] == 1.0 and after["eval_majority_accuracy"] == 0.5
    assert set(before) == {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_majority_accuracy"}


def test_label_scores_are_compared_in_fp32_on_a_bf16_model(tiny_model_dir):
    """Two label rows of the output head that differ by 2^-7 in one entry: their bf16
    logits (8 bits of mantissa, at magnitude ~3) mostly tie, and argmax would pick label 0;
    in fp32 every prediction is the fp64 argmax."""
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    model.to(torch.bfloat16)
    words = ["good", "great", "fun", "bad", "awful", "boring"]
    prompts = [f"the {a} movie was {b} .\nQuestion: which label fits this text ?\nAnswer:"
               for a in words for b in words]

    def last_states():  # hidden state and logits where the answer's first token is predicted
        states = []
        for prompt in prompts:
            batch = make_batch([Example(prompt, " positive")], tokenizer, 64)
            with torch.no_grad():
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, output_hidden_states=True)
            at = -int(batch.answer_lengths[0]) - 1
            states.append((out.hidden_states[-1][0, at], out.logits[0, at]))
        return states

    hidden = torch.stack([h for h, _ in last_states()]).double()
    column = int((hidden > 0).double().mean(dim=0).sub(0.5).abs().argmin())  # signs vary most
    ids = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in LABELS]
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        row = torch.where(torch.arange(head.shape[1]) % 2 == 0, 0.5, -0.5).to(head.dtype)
        head[ids[0]], head[ids[1]] = row, row
        head[ids[1], column] += 2**-7  # representable: bf16's step at 0.5 is 2^-8
        # Both label tokens read alike, so that the end-of-sequence after either scores the
        # same: the choice rests on the first token's logits alone.
        embeddings = model.get_input_embeddings().weight
        embeddings[ids[1]] = embeddings[ids[0]]
    data, bf16_predictions = [], []
    for prompt, (state, logits) in zip(prompts, last_states()):
        truth = int((state.double() @ head[ids].double().T).argmax())
        bf16_predictions.append(int(logits[ids].argmax()))
        data.append(Example(prompt, " " + LABELS[truth], truth))
    truths = [e.label for e in data]
    assert 0 < sum(truths) < len(truths)  # both labels occur
    assert bf16_predictions != truths  # the bf16 head cannot tell them apart
    metrics = evaluate(model, tokenizer, data, LABELS, batch_size=8, max_length=64, device=CPU)
    assert metrics["eval_accuracy"] == 1.0


def test_gradient_checkpointing_trains_to_the_same_adapter_and_is_switched_off_after(tiny_model_dir):
    from fedlora.adapters import adapter_state

    results = []
    for checkpointing in (False, True):
        model, tokenizer = load_model(str(tiny_model_dir), CPU)
        adapted = attach_lora(model, 4, 8, ["q_proj", "v_proj"], seed=0)
        stats = train_local(adapted, tokenizer, examples(12), steps=3, batch_size=4, lr=0.05,
                            max_length=32, seed=1, device=CPU, gradient_checkpointing=checkpointing)
        assert not adapted.get_base_model().is_gradient_checkpointing
        results.append((stats["train_loss"], adapter_state(adapted)))
    (loss, plain), (loss_ckpt, recomputed) = results
    assert abs(loss - loss_ckpt) < 1e-6
    for key, value in plain.items():
        torch.testing.assert_close(recomputed[key], value, rtol=1e-5, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)  # it trained
