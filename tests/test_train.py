"""Batching, local training and evaluation."""

import torch

from fedlora.adapters import attach_lora
from fedlora.data import Example
from fedlora.models import load_model
from fedlora.evaluate import evaluate, score
from fedlora.train import answer_loss, make_batch, packs_sequences, train_local

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


def test_packed_batches_hold_the_examples_in_one_row_with_positions_restarting(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir), CPU)
    batch = make_batch([Example("a b c", " good"), Example("a", " bad awful")], tokenizer, 64,
                       packed=True)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = tokenizer.eos_token_id
    assert batch.input_ids.tolist() == [[*ids("a b c good"), eos, *ids("a bad awful"), eos]]
    assert batch.attention_mask is None
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch.labels.tolist() == [[-100, -100, -100, *ids(" good"), eos,
                                      -100, *ids(" bad awful"), eos]]
    # the logits just before each answer token, none across the examples' border
    assert batch.keep.tolist() == [2, 3, 5, 6, 7]


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    adapted = attach_lora(model.double(), 4, 8, ["q_proj", "v_proj", "down_proj"], seed=0)
    torch.manual_seed(1)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # nonzero, so that A gets gradients too
            parameter.data.normal_(0, 0.1)
    assert packs_sequences(adapted)
    data = examples(6)
    data[1] = Example("the movie was fun . fun fun fun . Answer:", " positive", 1)  # longer
    results = []
    for packed in (False, True):
        adapted.zero_grad()
        loss = answer_loss(adapted, make_batch(data, tokenizer, 64, packed=packed))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in adapted.named_parameters()
                                      if p.requires_grad}))
    (padded_loss, padded), (packed_loss, packed) = results
    assert abs(padded_loss - packed_loss) < 1e-12
    for name, grad in padded.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed[name], grad, rtol=1e-10, atol=1e-12)


def test_a_model_blind_to_packed_positions_is_not_packed(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), CPU)

    class IgnoresPositions(torch.nn.Module):  # one sequence whatever the position ids say
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, position_ids=None, **inputs):
            return self.inner(**inputs)

    assert packs_sequences(model) and not packs_sequences(IgnoresPositions(model))


def test_evaluation_batches_by_length_and_its_counts_do_not_depend_on_order(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), CPU)
    data = [Example("the movie was good . " * (1 + i % 5) + "Answer:", " " + LABELS[i % 2], i % 2)
            for i in range(20)]
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _, args, __: widths.append(args[0].shape[1]))
    forward = score(model, tokenizer, data, LABELS, batch_size=4, max_length=64, device=CPU)
    hook.remove()
    backward = score(model, tokenizer, data[::-1], LABELS, batch_size=4, max_length=64, device=CPU)
    prompt_widths = [w for w in widths if w > 2]  # label continuations are 1 or 2 tokens
    assert len(prompt_widths) == 5 and prompt_widths == sorted(prompt_widths)
    assert forward.predicted_counts == backward.predicted_counts
    assert forward.correct_counts == backward.correct_counts
    assert abs(forward.loss_sum - backward.loss_sum) < 1e-4


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


def test_a_bf16_base_model_trains_fp32_adapters_on_the_cpu(tiny_model_dir):
    """--dtype bfloat16: the base weights in bf16, the adapters in fp32, and the adapters'
    gradient the fp32 model's up to bf16 rounding."""
    data = examples(12)
    gradients = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model(str(tiny_model_dir), CPU, dtype)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
        adapted = attach_lora(model, 8, 16, ["q_proj", "v_proj", "o_proj", "down_proj"], seed=0)
        answer_loss(adapted, make_batch(data, tokenizer, 64, packed=True)).backward()
        gradients[dtype] = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    for name, exact in gradients["float32"].items():
        rounded = gradients["bfloat16"][name]
        assert rounded.dtype == torch.float32, name
        if "lora_B" in name:  # A's gradient is 0 while B = 0
            cosine = torch.nn.functional.cosine_similarity(rounded.flatten(), exact.flatten(), dim=0)
            assert cosine > 0.99, (name, cosine)


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
            at = -int((batch.labels[0] != -100).sum()) - 1
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


def test_micro_batches_make_the_same_updates_as_the_whole_batch(tiny_model_dir):
    from fedlora.adapters import adapter_state

    results = []
    for micro in (0, 3, 1):  # the whole batch of 7; 3 + 3 + 1 (uneven); one at a time
        model, tokenizer = load_model(str(tiny_model_dir), CPU)
        adapted = attach_lora(model, 4, 8, ["q_proj", "v_proj"], seed=0)
        stats = train_local(adapted, tokenizer, examples(12), steps=3, batch_size=7, lr=0.05,
                            max_length=32, seed=1, device=CPU, micro_batch_size=micro)
        results.append((stats, adapter_state(adapted)))
    (whole, state), *split = results
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it trained
    for stats, other in split:
        for key in ("train_loss", "first_loss", "last_loss"):
            assert abs(stats[key] - whole[key]) < 1e-6
        for key, value in state.items():
            torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6)
