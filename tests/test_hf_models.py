"""Every model a user brings: calibkern's fused path (decoder, then ``softcap(s · (h Wᵀ + b))``) computes the
model's own logits, or refuses the model with an error naming it.

Tiny configs of the causal-LM architectures Transformers ships, each plain, with LoRA on the attention, and
with LoRA on the lm_head: ``evaluate``'s option logits equal ``model(prompt).logits[…, option_ids]``, and the
trainer's loss and gradients equal the same loss computed from the model's own logits
(``compute_loss_func``). Prompt-learning adapters are refused.
"""

import copy

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset, compute_loss_func  # noqa: E402
from calibkern.hf import detect_option_ids, evaluate  # noqa: E402
from calibkern.hf.data import encode_prompt  # noqa: E402
from calibkern.hf.modeling import check_logit_parity, logit_transform  # noqa: E402
from hf_tiny import ZOO, make_examples, make_tokenizer, make_zoo_model, wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    return tokenizer, detect_option_ids(tokenizer, 4), make_examples(8, seed=5)


@pytest.mark.parametrize("name", ZOO)
def test_logit_transform_is_read_from_the_config(setup, name):
    tokenizer, _, _ = setup
    transform = logit_transform(make_zoo_model(name, tokenizer))
    expected = ZOO[name][2]
    assert transform.scale == pytest.approx(expected.get("scale", 1.0))
    assert transform.softcap == expected.get("softcap")


ADAPTERS = ["plain", "lora", "lora_head"]


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("name", ZOO)
def test_evaluate_equals_the_model_own_logits(setup, name, adapter):
    tokenizer, option_ids, examples = setup
    model = wrap(make_zoo_model(name, tokenizer), adapter)
    result = evaluate(model, tokenizer, examples, option_ids, batch_size=4, progress=False)
    model.eval()
    with torch.no_grad():
        for row, example in enumerate(examples):
            ids = torch.tensor([encode_prompt(tokenizer, example)])
            own = model(input_ids=ids).logits[0, -1, option_ids].float()
            torch.testing.assert_close(result.option_logits[row], own, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("name", ZOO)
def test_trainer_loss_and_gradients_equal_the_loss_from_the_model_own_logits(setup, name, adapter, tmp_path):
    tokenizer, option_ids, examples = setup
    model = wrap(make_zoo_model(name, tokenizer), adapter)
    twin = copy.deepcopy(model)
    config = CalibrationConfig(method="cft", option_ids=option_ids, lam=5.0, bin_accuracy=[0.3] * 10)
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = CalibrationTrainer(model, args, dataset, calibration=config)
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    trainer._check_logit_parity()
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()

    twin.train()
    outputs = twin(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    reference = compute_loss_func(config)(outputs, inputs["labels"])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-5)
    twin_parameters = dict(twin.named_parameters())
    compared = 0
    for key, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, twin_parameters[key].grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
            compared += 1
    assert compared > 0
    if adapter == "lora_head":
        head_adapter = [p for k, p in model.named_parameters() if "lm_head" in k and "lora" in k]
        assert head_adapter and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_adapter)


def with_changed_output(model, change):
    """``model`` whose own forward's output passes through ``change`` (a transform calibkern does not know)."""
    plain_forward = model.forward

    def changed_forward(*args, **kwargs):
        output = plain_forward(*args, **kwargs)
        change(output)
        return output

    model.forward = changed_forward
    return model


def test_an_unknown_logit_transform_is_refused(setup):
    """A model whose forward changes its logits in a way calibkern does not know is refused by name."""
    tokenizer, option_ids, examples = setup

    def shift(output):
        output.logits = output.logits * 3.0 + 1.0

    model = with_changed_output(make_zoo_model("llama", tokenizer), shift)
    with pytest.raises(ValueError,
                       match="refuses LlamaForCausalLM: calibkern's fused path does not reproduce its logits"):
        evaluate(model, tokenizer, examples, option_ids, progress=False)


def test_prompt_learning_adapters_are_refused(setup, tmp_path):
    tokenizer, option_ids, examples = setup
    model = get_peft_model(make_zoo_model("llama", tokenizer),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    with pytest.raises(ValueError, match="refuses PEFT PROMPT_TUNING"):
        evaluate(model, tokenizer, examples, option_ids, progress=False)
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, max_steps=1)
    trainer = CalibrationTrainer(model, args, dataset, calibration=CalibrationConfig(
        method="cft", option_ids=option_ids, bin_accuracy=[0.3] * 10))
    with pytest.raises(ValueError, match="refuses PEFT PROMPT_TUNING"):
        trainer.train()


def test_lora_head_with_dropout_is_refused_in_training(setup):
    tokenizer, option_ids, examples = setup
    model = get_peft_model(make_zoo_model("llama", tokenizer),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "lm_head"]))
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    from calibkern.hf.modeling import decoder_forward

    model.train()
    batch = {"input_ids": torch.tensor([dataset[0]["input_ids"]])}
    with pytest.raises(ValueError, match="lora_dropout > 0"):
        decoder_forward(model, batch)
    model.eval()
    check_logit_parity(model, batch)  # in eval mode the dropout is off and the adapter is exact


def test_evaluate_takes_dict_rows_and_refuses_too_few_option_ids(setup):
    tokenizer, option_ids, examples = setup
    model = make_zoo_model("llama", tokenizer)
    rows = [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in examples]
    from_dicts = evaluate(model, tokenizer, rows, option_ids, progress=False)
    from_examples = evaluate(model, tokenizer, examples, option_ids, progress=False)
    assert torch.equal(from_dicts.option_logits, from_examples.option_logits)
    with pytest.raises(ValueError, match="option_ids has 3 ids but the rows have 4 options"):
        evaluate(model, tokenizer, examples, option_ids[:3], progress=False)


def test_a_tokenizer_that_appends_eos_keeps_prompts_open():
    """A post-processor that appends </s> (as many SentencePiece tokenizers do) neither breaks option-id
    detection nor ends a prompt before its answer."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    backend = copy.deepcopy(base.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[
        ("<s>", base.bos_token_id), ("</s>", base.eos_token_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="right")
    assert tokenizer("x")["input_ids"][-1] == tokenizer.eos_token_id
    assert detect_option_ids(tokenizer, 4) == detect_option_ids(base, 4)
    example = make_examples(1)[0]
    prompt = encode_prompt(tokenizer, example)
    assert prompt[0] == tokenizer.bos_token_id and prompt[-1] != tokenizer.eos_token_id
    assert prompt[1:] == encode_prompt(base, example)


# ------------------------------------------------------------------ the equivalence check and the refusals

REFUSED = {  # model → what the refusal names
    "t5": "refuses T5ForConditionalGeneration: it is an encoder-decoder model",
    "llama4": "refuses Llama4ForCausalLM: its get_decoder\\(\\) returns the model itself",
    "bert_lm_head": "refuses BertLMHeadModel: calibkern's fused path does not reproduce its logits",
    "bart_causal": "refuses BartForCausalLM: its own loss is .* does not shift its labels",
    "roberta_causal": "refuses RobertaForCausalLM: calibkern's fused path does not reproduce its logits",
    "electra_causal": "refuses ElectraForCausalLM: its decoder's hidden states have width 32 but its lm_head takes 16",
    # get_decoder() names its lm_head: the base model runs, and its prediction head makes the logits differ
    "modernbert_decoder": "refuses ModernBertDecoderForCausalLM: calibkern's fused path does not reproduce its logits",
}


@pytest.mark.parametrize("name", REFUSED)
def test_models_calibkern_cannot_reproduce_are_refused_at_every_entry_point(setup, name, tmp_path):
    """apply_fused_loss's first call with labels, CalibrationTrainer before its first step (the weights unchanged)
    and evaluate all refuse the model, naming it and what differs."""
    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_extra_model, random_batch

    tokenizer, option_ids, examples = setup
    message = REFUSED[name]
    with pytest.raises((TypeError, ValueError), match=message):
        apply_fused_loss(make_extra_model(name, tokenizer))(**random_batch(tokenizer, option_ids))
    model = make_extra_model(name, tokenizer)
    before = copy.deepcopy(model.state_dict())
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    with pytest.raises((TypeError, ValueError), match=message):
        CalibrationTrainer(model, args, dataset, calibration=CalibrationConfig(
            method="cft", option_ids=option_ids, bin_accuracy=[0.3] * 10)).train()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises((TypeError, ValueError), match=message):
        evaluate(make_extra_model(name, tokenizer), tokenizer, examples, option_ids, progress=False)


def test_a_model_that_adds_to_its_loss_is_refused(setup):
    """Same logits, a loss the model computes differently (here + 1): refused by the loss comparison."""
    from calibkern.hf import apply_fused_loss
    from hf_tiny import random_batch

    tokenizer, option_ids, _ = setup

    def add_one(output):
        if output.loss is not None:
            output.loss = output.loss + 1.0

    model = with_changed_output(make_zoo_model("llama", tokenizer), add_one)
    with pytest.raises(ValueError, match=r"refuses LlamaForCausalLM: its own loss is [\d.]+ where calibkern computes"):
        apply_fused_loss(model)(**random_batch(tokenizer, option_ids))


@pytest.mark.parametrize("name, transform", [("recurrent_gemma", {"softcap": 3.0}),
                                             ("inkling", {"scale": 0.25, "vocab_rows": 300})])
def test_soft_capped_scaled_and_cut_logits_are_reproduced(setup, name, transform):
    """RecurrentGemma caps its logits (``logits_soft_cap``); Inkling divides its hidden states
    (``logits_mup_width_multiplier``) and keeps the first ``unpadded_vocab_size`` of 320 logits: calibkern applies
    each, so the loss and every gradient are the model's own."""
    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_extra_model, random_batch

    tokenizer, option_ids, _ = setup
    model = make_extra_model(name, tokenizer)
    assert logit_transform(model)._asdict() == {**{"scale": 1.0, "softcap": None, "vocab_rows": None}, **transform}
    twin = copy.deepcopy(model)
    inputs = random_batch(tokenizer, option_ids)
    output, reference = apply_fused_loss(model)(**inputs), twin(**inputs)
    torch.testing.assert_close(output.loss, reference.loss, rtol=1e-5, atol=1e-6)
    output.loss.backward()
    reference.loss.backward()
    twin_parameters = dict(twin.named_parameters())
    for key, parameter in model.named_parameters():
        if twin_parameters[key].grad is not None:
            torch.testing.assert_close(parameter.grad, twin_parameters[key].grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")


def test_inputs_the_fused_path_does_not_consume_are_refused(setup):
    """A vision-language model called with pixel_values (the fused path runs the text decoder only) is refused by
    name; its text-only loss is its own. Output switches that would come back empty are refused too, and
    return_dict=False gives a tuple whose first element is the loss."""
    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_vlm, random_batch

    tokenizer, option_ids, _ = setup
    inputs = random_batch(tokenizer, option_ids)
    vlm = make_vlm(tokenizer)
    twin = copy.deepcopy(vlm)
    apply_fused_loss(vlm)
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration does not consume pixel_values"):
        vlm(**inputs, pixel_values=torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(vlm(**inputs).loss, twin(**inputs).loss, rtol=1e-5, atol=1e-6)
    model = apply_fused_loss(make_zoo_model("llama", tokenizer))
    for switch in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"does not consume {switch}"):
            model(**inputs, **{switch: True})
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(**inputs).loss)


HEAD_ADAPTERS = {
    "AdaLoRA": lambda peft: peft.AdaLoraConfig(target_modules=["q_proj", "lm_head"], total_step=10, init_r=4),
    "IA3": lambda peft: peft.IA3Config(target_modules=["q_proj", "lm_head"], feedforward_modules=[]),
    "LoHa": lambda peft: peft.LoHaConfig(target_modules=["q_proj", "lm_head"], r=4),
    "LoKr": lambda peft: peft.LoKrConfig(target_modules=["q_proj", "lm_head"], r=4),
    "BOFT": lambda peft: peft.BOFTConfig(target_modules=["q_proj", "lm_head"], boft_block_size=4),
    "aLoRA": lambda peft: peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4, alora_invocation_tokens=[5]),
    "DoRA": lambda peft: peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4, use_dora=True),
}


@pytest.mark.parametrize("kind", HEAD_ADAPTERS)
def test_adapters_on_the_lm_head_calibkern_cannot_write_as_a_weight_are_refused_by_type(setup, kind):
    import peft

    from calibkern.hf import apply_fused_loss
    from hf_tiny import random_batch

    tokenizer, option_ids, examples = setup
    model = get_peft_model(make_zoo_model("llama", tokenizer), HEAD_ADAPTERS[kind](peft))
    with pytest.raises(ValueError, match=f"{kind}"):
        apply_fused_loss(model)(**random_batch(tokenizer, option_ids))
    with pytest.raises(ValueError, match=f"{kind}"):
        evaluate(get_peft_model(make_zoo_model("llama", tokenizer), HEAD_ADAPTERS[kind](peft)), tokenizer, examples,
                 option_ids, progress=False)


def test_option_ids_fewer_than_the_rows_options_are_refused_with_the_counts(setup, tmp_path):
    tokenizer, option_ids, examples = setup
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = CalibrationTrainer(make_zoo_model("llama", tokenizer), args, dataset, calibration=CalibrationConfig(
        method="cft", option_ids=option_ids[:3], bin_accuracy=[0.3] * 10))
    with pytest.raises(ValueError, match=r"answers use \d distinct tokens .*option_ids has 3 .* are not among them"):
        trainer.train()


def test_calibration_trainer_on_a_moe_model_adds_and_logs_the_router_loss(setup, tmp_path):
    """Mixtral with router logits on: the trainer's loss and gradients equal compute_loss_func's on the model's own
    outputs with router_aux_loss_coef (which it refuses to leave out), and the training logs carry aux_loss."""
    from hf_tiny import make_extra_model

    tokenizer, option_ids, examples = setup
    model = make_extra_model("mixtral", tokenizer)
    twin = copy.deepcopy(model)
    config = CalibrationConfig(method="cft", option_ids=option_ids, lam=5.0, bin_accuracy=[0.3] * 10)
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = CalibrationTrainer(model, args, dataset, calibration=config)
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    twin.train()
    outputs = twin(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="outputs carry aux_loss"):
        compute_loss_func(config)(outputs, inputs["labels"])
    reference = compute_loss_func(config, router_aux_loss_coef=twin.router_aux_loss_coef)(outputs, inputs["labels"])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-5)
    twin_parameters = dict(twin.named_parameters())
    for key, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, twin_parameters[key].grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    model.zero_grad()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and logged[0]["aux_loss"] > 0


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_the_check_under_bf16_autocast_accepts_the_model(setup, name, tmp_path):
    """Under the trainer's bf16 autocast both sides of the check round to bf16: half-precision tolerances apply,
    and a model calibkern reproduces trains."""
    tokenizer, option_ids, examples = setup
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise="completion")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, bf16=True, save_strategy="no")
    trainer = CalibrationTrainer(make_zoo_model(name, tokenizer), args, dataset, calibration=CalibrationConfig(
        method="cft", option_ids=option_ids, bin_accuracy=[0.3] * 10))
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
