"""Llama Guard 3-1B as a judge: the ``llama-guard`` judge with the 1B model and its list-of-parts messages.

What we read (no hub access here, so neither the checkpoint nor its tokenizer_config.json were opened):

- The Hugging Face model card of meta-llama/Llama-Guard-3-1B (as mirrored by QuantFactory/Llama-Guard-3-1B-GGUF,
  "Original Model Card"; the same snippet is in y3y-tech/LLM_GuardRail ``Llama-Guard/Llama_Guard_3-1B.py``):
  each message's ``content`` is a list ``[{"type": "text", "text": ...}]``, the conversation goes through
  ``tokenizer.apply_chat_template(conversation, return_tensors="pt")`` with no ``add_generation_prompt``, and
  the card generates ``max_new_tokens=20``.
- The 1B chat template, as copied in IntelLabs LLMart's config (``LlamaGuard3_1BConf``, revision 9e4f4b01 of
  the model; LLMart appends an ``assessment`` line of its own, which we ignore). It writes
  ``<|begin_of_text|>`` itself; picks the role to judge from the number of messages ("Agent" when even); keeps
  only the content parts of type "text" (``message['content'] | selectattr('type', 'equalto', 'text')``), so a
  plain-string content renders as an empty conversation, silently; ends with
  ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>``; asks for "'safe' or 'unsafe'" on the first line
  and "a comma-separated list of violated categories" on the second (S1 … S13).
- meta-llama/PurpleLlama ``Llama-Guard3/1B/MODEL_CARD.md``: a fine-tuned, pruned Llama-3.2-1B, the 13 MLCommons
  hazard categories, F1 0.899 / FPR 0.090 in English against 0.939 / 0.040 for Llama Guard 3-8B.

Everything else (greedy generation, the "safe"/"unsafe" parse, categories into ``Verdict.category``, unparsed
output counted as safe with a warning) is ``llama_guard.LlamaGuardJudge``.
"""

from __future__ import annotations

from ftguard.evaluation.judges.base import register_judge
from ftguard.evaluation.judges.llama_guard import LlamaGuardJudge

DEFAULT_MODEL = "meta-llama/Llama-Guard-3-1B"
MAX_NEW_TOKENS = 20  # the model card's value; generation stops at <|eot_id|> long before


@register_judge("llama-guard-1b")
class LlamaGuard1BJudge(LlamaGuardJudge):
    """Harmful when Llama Guard 3-1B says "unsafe" about the assistant's answer.

    Options: ``model`` (hub id or local folder; default Llama-Guard-3-1B), ``max_new_tokens``, ``batch_size``,
    ``dtype`` (default bf16 on GPU, fp32 on CPU), ``device``, ``trust_remote_code`` (passed on only if set).
    """

    default_model = DEFAULT_MODEL
    default_max_new_tokens = MAX_NEW_TOKENS
    needs = "about 3 GB, gated: accept its licence on the Hub; runs on a CPU"
    content_parts = True
