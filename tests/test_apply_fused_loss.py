"""``calibkern.hf.apply_fused_loss``: a causal LM whose own forward computes the fused loss (docs/distributed.md).

On every architecture of the zoo (tests/hf_tiny.py), plain and with LoRA (on the lm_head too): the patched
model's loss and gradients equal the same loss computed from the unpatched twin's full logits — its own
``loss`` for plain CE, ``compute_loss_func`` for CFT and RCFT; gradient checkpointing; the streaming E-step and
M-step; the Hugging Face scaling with ``num_items_in_batch``; no ``[tokens, V]`` tensor in forward or backward;
and the errors.
"""

import copy

import pytest
import torch

pytest.importorskip("peft")

from calibkern.hf import CalibrationConfig, apply_fused_loss, compute_loss_func, detect_option_ids  # noqa: E402
from calibkern.hf import fused_loss_of  # noqa: E402
from helpers import LargestTensor, float32_tolerance  # noqa: E402
from hf_tiny import ZOO, make_model, make_tokenizer, make_zoo_model, random_batch, wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    return tokenizer, detect_option_ids(tokenizer, 4)


def cft(option_ids, **overrides):
    return CalibrationConfig(method="cft", option_ids=option_ids, lam=5.0, bin_accuracy=[0.3] * 10, **overrides)


def assert_same_gradients(model, twin):
    twin_parameters = dict(twin.named_parameters())
    compared = 0
    for key, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, key
            torch.testing.assert_close(parameter.grad, twin_parameters[key].grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("name", ZOO)
def test_plain_cross_entropy_equals_the_model_own_loss(setup, name):
    tokenizer, option_ids = setup
    model = make_zoo_model(name, tokenizer)
    twin = copy.deepcopy(model)
    inputs = random_batch(tokenizer, option_ids)
    output = apply_fused_loss(model)(**inputs)
    assert output.logits is None and output.cal_loss is None and output.bin_stats is None
    output.loss.backward()
    reference = twin(**inputs).loss
    reference.backward()
    torch.testing.assert_close(output.loss, reference, rtol=1e-5, atol=1e-6)
    assert_same_gradients(model, twin)


@pytest.mark.parametrize("adapter", ["plain", "lora_head"])
@pytest.mark.parametrize("name", ZOO)
def test_cft_loss_and_gradients_equal_the_loss_from_full_logits(setup, name, adapter):
    tokenizer, option_ids = setup
    model = wrap(make_zoo_model(name, tokenizer), adapter)
    twin = copy.deepcopy(model)
    inputs = random_batch(tokenizer, option_ids)
    config = cft(option_ids)
    output = apply_fused_loss(model, config)(**inputs)
    output.loss.backward()
    reference = compute_loss_func(config)(twin(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                                          inputs["labels"])
    reference.backward()
    torch.testing.assert_close(output.loss, reference, rtol=1e-4, atol=1e-5)
    assert output.cal_loss > 0 and int(output.bin_stats.counts.sum()) == 3
    assert_same_gradients(model, twin)


def test_rcft_streaming_with_accumulation_and_gradient_checkpointing(setup):
    """RCFT with a streaming EM state and two micro-batches per optimizer step, the decoder checkpointed:
    losses (num_items_in_batch: lam / 2 in training), gradients, and the EM state after the M-step equal
    compute_loss_func's on the full logits."""
    tokenizer, option_ids = setup
    model = make_model(tokenizer)
    twin = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    twin.train()
    config = CalibrationConfig(method="rcft", option_ids=option_ids, lam=50.0, em={"refresh": "stream"})
    apply_fused_loss(model, config, gradient_accumulation_steps=2)
    reference = compute_loss_func(config, gradient_accumulation_steps=2)
    micro_batches = [random_batch(tokenizer, option_ids, seed=seed) for seed in (1, 2)]
    items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro_batches)
    for inputs in micro_batches:
        ours = model(**inputs, num_items_in_batch=torch.tensor(items)).loss
        theirs = reference(twin(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                           inputs["labels"], num_items_in_batch=torch.tensor(items))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
        ours.backward()
        theirs.backward()
    assert_same_gradients(model, twin)
    state, twin_state = fused_loss_of(model).em_state, reference.em_state
    assert int(state.n_msteps) == int(twin_state.n_msteps) == 1
    for key, value in twin_state.state_dict().items():
        torch.testing.assert_close(state.state_dict()[key], value, **float32_tolerance(items), msg=key)
    with torch.no_grad():
        model(**micro_batches[0])
    assert int(state.n_msteps) == 1 and float(state.accum.abs().sum()) == 0.0  # no E-step in evaluation


def test_without_labels_the_model_gives_its_logits_and_generates(setup):
    tokenizer, option_ids = setup
    model = make_model(tokenizer)
    inputs = random_batch(tokenizer, option_ids)
    before = model(input_ids=inputs["input_ids"]).logits
    apply_fused_loss(model, cft(option_ids))
    torch.testing.assert_close(model(input_ids=inputs["input_ids"]).logits, before, rtol=0, atol=0)
    generated = model.generate(inputs["input_ids"][:1, :5], max_new_tokens=3, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, 8)
    copied = copy.deepcopy(model)
    assert copied.forward.__self__ is copied and fused_loss_of(copied) is not fused_loss_of(model)


def test_no_tokens_by_vocabulary_tensor_in_forward_or_backward(setup):
    tokenizer, option_ids = setup
    model = make_model(tokenizer)
    inputs = random_batch(tokenizer, option_ids, rows=4, length=40)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)  # every token
    config = CalibrationConfig(method="rcft", option_ids=option_ids, em={"refresh": "stream"}, chunk_size=16)
    apply_fused_loss(model, config)
    with LargestTensor() as mode:
        model(**inputs).loss.backward()
    tokens, vocab = inputs["input_ids"].numel(), len(tokenizer)
    # the largest tensors are the MLP's [tokens, 2 D] activations; a chunk of logits is [16, V]
    assert mode.largest <= tokens * 2 * model.config.hidden_size < tokens * vocab / 4


def test_errors_name_the_problem(setup):
    tokenizer, option_ids = setup
    inputs = random_batch(tokenizer, option_ids)
    with pytest.raises(ValueError, match="needs calibration.bin_accuracy"):
        apply_fused_loss(make_model(tokenizer), CalibrationConfig(method="cft", option_ids=option_ids))
    with pytest.raises(ValueError, match="official_compat"):
        apply_fused_loss(make_model(tokenizer), CalibrationConfig(method="cft", option_ids=option_ids,
                                                                  official_compat=True))
    with pytest.raises(ValueError, match="em_state applies"):
        apply_fused_loss(make_model(tokenizer), cft(option_ids), em_state=object())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        apply_fused_loss(make_model(tokenizer), gradient_accumulation_steps=0)
    with pytest.raises(TypeError, match="calibration must be"):
        apply_fused_loss(make_model(tokenizer), {"method": "cft"})
    with pytest.raises(ValueError, match="not patched"):
        fused_loss_of(make_model(tokenizer))
    model = apply_fused_loss(make_model(tokenizer))
    with pytest.raises(ValueError, match="needs labels and a CalibrationConfig"):
        model(input_ids=inputs["input_ids"], option_logits_only=True)
    apply_fused_loss(model, cft(option_ids))  # patching again replaces the loss
    assert model(**inputs).cal_loss is not None


def test_a_plain_trainer_gets_the_fused_loss_by_one_call(setup, tmp_path):
    """``transformers.Trainer`` on a patched model (it passes labels, answer_mask and num_items_in_batch to the
    forward) takes the step that ``compute_loss_func`` takes from the full logits."""
    from transformers import Trainer, TrainingArguments

    from calibkern.hf import MCQCollator, build_sft_dataset
    from hf_tiny import make_examples

    tokenizer, option_ids = setup
    dataset = build_sft_dataset(tokenizer, make_examples(8), option_ids, supervise="completion")
    config = cft(option_ids)
    weights = []
    for patched in (True, False):
        model = make_model(tokenizer)
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=8, max_steps=1,
                                 optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        Trainer(model=apply_fused_loss(model, config) if patched else model, args=args, train_dataset=dataset,
                data_collator=MCQCollator(tokenizer.pad_token_id),
                compute_loss_func=None if patched else compute_loss_func(config)).train()
        weights.append(model.state_dict())
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_token_cft_and_the_statistics_passes_equal_the_fused_loss_on_the_decoder_output(setup):
    """token_cft through the patched forward (with and without num_items_in_batch) and the token-statistics pass
    give what fused_linear_calibration_loss gives on the decoder's hidden states; token_cft needs bin_accuracy."""
    import calibkern
    from calibkern.hf.modeling import decoder_forward
    from calibkern.hf.patching import token_statistics_pass

    tokenizer, option_ids = setup
    with pytest.raises(ValueError, match="method='token_cft' needs calibration.bin_accuracy"):
        apply_fused_loss(make_model(tokenizer), CalibrationConfig(method="token_cft"))
    accuracy = torch.linspace(0.1, 0.9, 10)
    model = apply_fused_loss(make_model(tokenizer),
                             CalibrationConfig(method="token_cft", lam=3.0, bin_accuracy=accuracy.tolist()))
    inputs = random_batch(tokenizer, option_ids, rows=4, length=20)
    hidden, weight, bias, _ = decoder_forward(model, inputs)
    for items in (None, torch.tensor(17)):
        want = calibkern.fused_linear_calibration_loss(
            hidden, weight, inputs["labels"], option_ids=None, bias=bias, calibration="token_hard_bin",
            bin_accuracy=accuracy, lam=3.0, shift=True, num_items_in_batch=items, token_stats=True)
        got = model(**inputs, num_items_in_batch=items)
        torch.testing.assert_close(got.loss, want.loss)
        torch.testing.assert_close(got.cal_loss, want.cal_loss)
    with torch.no_grad():
        stats = token_statistics_pass(model, inputs).token_stats
    assert torch.equal(stats.counts, want.token_stats.counts)
    torch.testing.assert_close(stats.sum_conf, want.token_stats.sum_conf)
    with pytest.raises(ValueError, match="token_stats_only=True needs labels"):
        model(input_ids=inputs["input_ids"], token_stats_only=True)


MOE_CASES = [("mixtral", True), ("mixtral", False), ("qwen2_moe", True), ("qwen3_moe", True), ("olmoe", True),
             ("granitemoe", True), ("gpt_oss", True), ("dbrx", True)]


@pytest.mark.parametrize("name, router_logits", MOE_CASES,
                         ids=[f"{name}-{'aux' if on else 'no-aux'}" for name, on in MOE_CASES])
def test_moe_router_aux_loss_is_added_as_the_model_adds_it(setup, name, router_logits):
    """With router logits on, the loss is CE + router_aux_loss_coef · aux_loss, as the model's own: equal losses,
    equal aux_loss, equal gradients (the routers' included)."""
    from hf_tiny import make_extra_model

    tokenizer, option_ids = setup
    model = make_extra_model(name, tokenizer, output_router_logits=router_logits)
    twin = copy.deepcopy(model)
    inputs = random_batch(tokenizer, option_ids)
    output = apply_fused_loss(model)(**inputs)
    reference = twin(**inputs)
    torch.testing.assert_close(output.loss, reference.loss, rtol=1e-5, atol=1e-6)
    if router_logits:
        torch.testing.assert_close(output.aux_loss, reference.aux_loss, rtol=1e-5, atol=1e-6)
    else:
        assert output.aux_loss is None and reference.aux_loss is None
    output.loss.backward()
    reference.loss.backward()
    assert_same_gradients(model, twin)
    routers = [p.grad for k, p in model.named_parameters() if k.endswith("gate.weight") or ".router." in k]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


def test_moe_with_an_unknown_router_loss_is_refused(setup):
    """HunYuan-MoE outputs router logits but computes no load_balancing_loss_func calibkern can call: refused by
    name, with the way out; with router logits off it gives the model's own loss."""
    from hf_tiny import make_extra_model

    tokenizer, option_ids = setup
    inputs = random_batch(tokenizer, option_ids)
    with pytest.raises(ValueError, match="refuses HunYuanMoEV1ForCausalLM with output_router_logits=True"):
        apply_fused_loss(make_extra_model("hunyuan_moe", tokenizer))(**inputs)
    model = make_extra_model("hunyuan_moe", tokenizer, output_router_logits=False)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(apply_fused_loss(model)(**inputs).loss, twin(**inputs).loss, rtol=1e-5, atol=1e-6)


def test_lora_bias_on_the_lm_head_takes_part(setup):
    """LoRA with lora_bias=True on an lm_head with a bias (Phi): lora_B's bias is in the logits and trains."""
    from peft import LoraConfig, get_peft_model

    tokenizer, option_ids = setup
    model = get_peft_model(make_zoo_model("phi", tokenizer), LoraConfig(
        r=4, lora_dropout=0.0, lora_bias=True, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.5)
    twin = copy.deepcopy(model)
    inputs = random_batch(tokenizer, option_ids)
    output = apply_fused_loss(model, cft(option_ids))(**inputs)
    reference = compute_loss_func(cft(option_ids))(
        twin(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), inputs["labels"])
    torch.testing.assert_close(output.loss, reference, rtol=1e-4, atol=1e-5)
    output.loss.backward()
    reference.backward()
    assert_same_gradients(model, twin)
    bias = dict(model.named_parameters())["base_model.model.lm_head.lora_B.default.bias"]
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_patched_means_patched_after_copy_pickle_reload_and_repair(setup, tmp_path):
    """A patched model stays patched through deepcopy, pickle and torch.save / torch.load; one whose forward was
    removed is not taken for patched, and apply_fused_loss patches it again; remove_fused_loss unpatches."""
    import pickle

    from calibkern.hf import remove_fused_loss
    from calibkern.hf.modeling import is_fused_forward

    tokenizer, option_ids = setup
    inputs = random_batch(tokenizer, option_ids)
    model = apply_fused_loss(make_model(tokenizer), cft(option_ids))
    want = model(**inputs).loss
    torch.save(model, tmp_path / "model.pt")
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(tmp_path / "model.pt", weights_only=False)]
    for copied in copies:
        assert is_fused_forward(copied) and copied.forward.__self__ is copied
        output = copied(**inputs)
        assert output.cal_loss is not None and torch.equal(output.loss, want)
    del model.forward  # marked, but running its own forward
    assert not is_fused_forward(model)
    with pytest.raises(ValueError, match="no longer calibkern's"):
        fused_loss_of(model)
    apply_fused_loss(model, cft(option_ids))
    assert torch.equal(model(**inputs).loss, want)
    own = make_model(tokenizer)(**inputs).loss
    remove_fused_loss(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "calibkern_fused_loss")
    assert torch.equal(model(**inputs).loss, own)
    assert remove_fused_loss(model) is model  # unpatched: unchanged
    from calibkern.pipeline.stages import _finished

    finished = _finished(apply_fused_loss(make_model(tokenizer), cft(option_ids)))  # the pipeline's trained models
    assert not is_fused_forward(finished) and not hasattr(finished, "calibkern_fused_loss")


def test_a_trainer_that_removes_the_labels_is_refused(setup, tmp_path):
    """label_smoothing_factor > 0 makes transformers.Trainer pop the labels, so the patched forward would run the
    model's own forward: refused at the first step, naming label_smoothing_factor."""
    from transformers import Trainer, TrainingArguments

    from calibkern.hf import MCQCollator, build_sft_dataset
    from hf_tiny import make_examples

    tokenizer, option_ids = setup
    dataset = build_sft_dataset(tokenizer, make_examples(4), option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, label_smoothing_factor=0.1)
    trainer = Trainer(model=apply_fused_loss(make_model(tokenizer), cft(option_ids)), args=args, train_dataset=dataset,
                      data_collator=MCQCollator(tokenizer.pad_token_id))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        trainer.train()
