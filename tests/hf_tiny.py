"""Tiny offline fixtures for the Hugging Face tests: a byte-level BPE tokenizer trained here, a small Llama,
generated multiple-choice questions and a zoo of tiny causal LMs of 15 architectures (plain or with LoRA).
Nothing is downloaded."""

from __future__ import annotations

import functools
import random

import torch

from calibkern.hf.data import DEFAULT_TEMPLATE, MCQExample, answer_continuation, format_prompt

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star"]


def make_examples(n: int, n_options: int = 4, seed: int = 0) -> list[MCQExample]:
    """``n`` questions "which goes with <word>?" over random word choices with a random answer."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        choices = tuple(rng.sample(WORDS, n_options))
        examples.append(
            MCQExample(
                question=f"which goes with {rng.choice(WORDS)} {i % 7}?",
                choices=choices,
                answer=rng.randrange(n_options),
                source=f"generated:{i + 1}",
            )
        )
    return examples


@functools.lru_cache(maxsize=None)
def make_tokenizer(template: str = DEFAULT_TEMPLATE, letters_as_tokens: bool = True):
    """A byte-level BPE tokenizer trained on prompts. With ``letters_as_tokens`` the corpus repeats the answer
    letters so that ``" A"`` becomes one token (GPT-2 style); without, the space stays a separate token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        format_prompt(example, template) + answer_continuation(example.answer)
        for example in make_examples(64, seed=123)
    ]
    if letters_as_tokens:
        corpus += [" A B C D E"] * 200
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


def make_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A randomly initialised two-layer Llama sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# dropout off everywhere: the trainer's pass and the reference pass must see the same network
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
# (config class, its extra settings, what calibkern must apply after the lm_head)
ZOO = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2), {}),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2), {}),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2), {}),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=8), {}),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0), {"softcap": 5.0}),
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=8.0),
               {"softcap": 8.0}),
    "cohere": ("CohereConfig", dict(num_key_value_heads=2, logit_scale=0.0625), {"scale": 0.0625}),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, logits_scaling=8.0), {"scale": 0.125}),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2), {}),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2), {}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0), {}),
    "opt": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True, dropout=0.0,
                              attention_dropout=0.0), {}),
    "gpt_neox": ("GPTNeoXConfig", dict(), {}),
    "phi": ("PhiConfig", dict(), {}),
    "falcon": ("FalconConfig", dict(hidden_dropout=0.0, attention_dropout=0.0), {}),
}


def make_zoo_model(name, tokenizer, seed=0):
    """A tiny randomly initialised causal LM of architecture ``name`` (a key of ``ZOO``)."""
    import transformers

    class_name, extra, _ = ZOO[name]
    config_class = getattr(transformers, class_name)
    settings = {**SMALL, **extra} if name != "gpt2" else dict(extra)
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=False, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a visible lm_head bias where the class has one (Phi), random LoRA B below
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias.normal_()
    return model


def wrap(model, adapter):
    """``model`` as it is (``"plain"``), with LoRA on the attention (``"lora"``) or also on the lm_head
    (``"lora_head"``), the adapters' B matrices random so that they count."""
    from peft import LoraConfig, get_peft_model

    if adapter == "plain":
        return model
    modules = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
               "gpt_neox": ["query_key_value"], "phi": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
               "falcon": ["query_key_value"]}
    arch = model.config.model_type
    targets = modules.get(arch, modules["llama"]) + (["lm_head"] if adapter == "lora_head" else [])
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                           fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():  # LoRA starts at B = 0: make the adapters count
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return peft


def random_batch(tokenizer, option_ids, rows=3, length=13, seed=0):
    """Random ids, right padding on the last row, a prompt of 4 unsupervised tokens, one option answer per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    ids[-1, -3:] = tokenizer.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    for row in range(rows):
        labels[row, 6 + row] = ids[row, 6 + row] = option_ids[row % len(option_ids)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# Models beyond the zoo, built tiny from their configs: (model class, config class, settings). The MoE ones have
# router logits on (their loss adds router_aux_loss_coef · aux_loss) unless ``output_router_logits=False``.
MOE = dict(num_key_value_heads=2, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
EXTRA = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(SMALL, **MOE, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(SMALL, **MOE, num_experts=4, moe_intermediate_size=16,
                                                                head_dim=8)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(SMALL, **MOE, num_experts=4)),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(SMALL, **MOE, num_local_experts=4,
                                                                     logits_scaling=4.0)),
    # max_position_embeddings = 32 × 4096: its YaRN factor (32) over its original 4096 positions, as released
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(SMALL, **MOE, num_local_experts=4, head_dim=8,
                                                          max_position_embeddings=131072)),
    "dbrx": ("DbrxForCausalLM", "DbrxConfig", dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=256, output_router_logits=True,
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2, moe_loss_weight=0.5),
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0))),
    "hunyuan_moe": ("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", dict(SMALL, **MOE, num_experts=4, moe_topk=2,
                                                                          head_dim=8)),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, lru_width=32, attention_window_size=16, logits_soft_cap=3.0,
        block_types=["recurrent", "attention"])),
    "inkling": ("InklingForCausalLM", "InklingTextConfig", dict(  # 320 lm_head rows, the logits cut to the vocabulary
        vocab_size=320, unpadded_vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
        sliding_window_size=8, d_rel=4, rel_extent=16, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, logits_mup_width_multiplier=4.0)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                          decoder_start_token_id=0)),
    "bart_causal": ("BartForCausalLM", "BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                          encoder_attention_heads=4, decoder_attention_heads=4,
                                                          encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)),
    "bert_lm_head": ("BertLMHeadModel", "BertConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, is_decoder=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "roberta_causal": ("RobertaForCausalLM", "RobertaConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, is_decoder=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=256)),
    "electra_causal": ("ElectraForCausalLM", "ElectraConfig", dict(  # a generator head from width 32 to 16
        embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "modernbert_decoder": ("ModernBertDecoderForCausalLM", "ModernBertDecoderConfig", dict(  # get_decoder(): lm_head
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, cls_token_id=1,
        sep_token_id=2)),
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig", dict(SMALL, num_key_value_heads=2, head_dim=8,
                                                              num_local_experts=2, intermediate_size_mlp=64)),
}


def make_extra_model(name, tokenizer, seed=0, **overrides):
    """A tiny randomly initialised model of ``EXTRA[name]`` (``overrides`` change its config settings)."""
    import transformers

    model_class, config_class, settings = EXTRA[name]
    settings = {"vocab_size": len(tokenizer), **settings, **overrides}
    config = getattr(transformers, config_class)(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **settings)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config)


def make_vlm(tokenizer, seed=0):
    """A tiny Gemma-3 vision-language model (SigLIP tower of one layer, 16 × 16 images of 4 patches)."""
    import transformers

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=5, boi_token_index=6, eoi_token_index=7)
    torch.manual_seed(seed)
    return transformers.Gemma3ForConditionalGeneration(config)
