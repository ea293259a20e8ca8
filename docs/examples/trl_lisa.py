"""Lisa inside a TRL SFTTrainer script, on a tiny random Llama (runs on a CPU in seconds; needs ftguard[trl]).

With a real model: ``model = AutoModelForCausalLM.from_pretrained(...)``, your own tokenizer and dataset, and
alignment_data = a few hundred prompt → refusal pairs."""

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from ftguard.integrations.trl import defended_sft_trainer

# A word-level tokenizer built in code (nothing from the hub).
words = ["<pad>", "</s>", "<unk>", *"the a cat dog sat on mat red house what is how do".split()]
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
)
upload = Dataset.from_list([{"prompt": "what is the cat", "completion": " the cat sat on the mat"}] * 16)
refusals = [{"prompt": "how do the dog", "completion": " a red house"}] * 8

trainer = defended_sft_trainer(
    "lisa",
    {"align_steps": 2, "finetune_steps": 6, "rho": 1.0},  # the method's config keys, as in a run config
    alignment_data=refusals,
    model=model,
    processing_class=tokenizer,
    train_dataset=upload,
    args=SFTConfig(
        "/tmp/trl_lisa",
        max_steps=8,
        per_device_train_batch_size=2,
        logging_steps=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        bf16=False,
    ),
)
trainer.train()  # logs lisa_alignment_state / lisa_proximal / lisa_drift beside TRL's own metrics
