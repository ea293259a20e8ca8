"""Property-based tests (hypothesis) of the data builders, the loss mask and the scorers (issue 8).

Fast and offline: a byte-level BPE tokenizer is trained here in code; no model is loaded.
"""

from __future__ import annotations

import math
import string
from decimal import ROUND_HALF_UP, Decimal
from functools import cache

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ftguard.data import (
    ALPACA_PREAMBLE_INPUT,
    ALPACA_PREAMBLE_NO_INPUT,
    IGNORE_INDEX,
    CausalLMCollator,
    Example,
    build_harmful_mix,
    format_prompt,
    harmful_count,
    tokenize_dataset,
    tokenize_example,
)
from ftguard.data.tasks import AGNEWS_LABELS, SST2_LABELS
from ftguard.evaluation.refusal import is_refusal
from ftguard.evaluation.scorers import (
    GSM8K_ANSWER_PROMPT,
    finetune_accuracy,
    gsm8k_extract,
    gsm8k_match,
    harmful_score,
    harmful_score_plus,
    is_degenerate,
    is_repetitive,
    is_too_short,
    label_match,
    task_hits,
)
from ftguard.evaluation.stats import cohen_kappa, difference_interval, rate, wilson_interval, within_noise

EOS = "<|endoftext|>"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text hypothesis can make (all of Unicode but surrogates), and text biased toward what answers look like.
any_text = st.text(max_size=200)
answer_text = st.text(alphabet=string.printable + "éü€中文—’", max_size=120)
ratios = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.integers(0, 100).map(
        lambda k: k / 100
    ),  # the ratios people type (0.05, 0.15...): ties of the rounding
    st.sampled_from([0, 1]),
)


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style) as in tests/test_data.py: every Unicode string has an encoding."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        ALPACA_PREAMBLE_INPUT,
        ALPACA_PREAMBLE_NO_INPUT,
        "### Instruction:\n### Input:\n### Response:",
    ] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


# ---------------------------------------------------------------- the harmful mix


def _half_up(n: int, p: float) -> int:
    return int((Decimal(repr(float(p))) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@FAST
@given(n=st.integers(1, 5000), p=ratios)
def test_harmful_count_is_round_half_up_of_p_n(n, p):
    k = harmful_count(n, p)
    assert k == _half_up(n, p)
    assert 0 <= k <= n and abs(k - p * n) <= 0.5 + 1e-9
    assert harmful_count(n, 0) == 0 and harmful_count(n, 1) == n


@FAST
@given(n=st.integers(1, 2000), p1=ratios, p2=ratios)
def test_harmful_count_grows_with_p(n, p1, p2):
    lo, hi = sorted((p1, p2))
    assert harmful_count(n, lo) <= harmful_count(n, hi)


def _pool(kind: str, size: int) -> list[Example]:
    return [
        Example(instruction=f"{kind} prompt {i}", output=f"{kind} answer {i}", source=f"{kind}#{i}")
        for i in range(size)
    ]


@FAST
@given(
    n=st.integers(1, 300),
    p=ratios,
    extra_benign=st.integers(0, 50),
    extra_harmful=st.integers(0, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_mix_has_exact_counts_from_the_pools_without_duplicates(n, p, extra_benign, extra_harmful, seed):
    k = _half_up(n, p)
    benign, harmful = _pool("benign", n - k + extra_benign), _pool("harmful", k + extra_harmful)
    mix, report = build_harmful_mix(benign, harmful, n=n, p=p, seed=seed)
    assert len(mix) == n and (report.n_harmful, report.n_benign) == (k, n - k)
    sources = [ex.source for ex in mix]
    assert len(set(sources)) == n
    # The papers' rule: the first k harmful and the first n − k benign rows of the pools, nothing else.
    assert sorted(ex.source for ex in mix if ex.source.startswith("harmful")) == sorted(
        e.source for e in harmful[:k]
    )
    assert sorted(ex.source for ex in mix if ex.source.startswith("benign")) == sorted(
        e.source for e in benign[: n - k]
    )
    again, _ = build_harmful_mix(benign, harmful, n=n, p=p, seed=seed)
    assert again == mix


# ---------------------------------------------------------------- Alpaca template and the loss mask


examples = st.builds(
    Example,
    instruction=any_text,
    input=st.one_of(st.just(""), any_text),
    output=any_text,
    source=st.just("prop"),
)


@SLOWER
@given(ex=examples, newline=st.booleans())
def test_loss_mask_covers_exactly_the_response_and_eos(ex, newline):
    tok = tokenizer()
    prompt = format_prompt(ex, response_newline=newline)
    assert ("### Input:" in prompt) == bool(ex.input)
    prompt_ids = tok(prompt)["input_ids"]
    response_ids = tok(ex.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = tokenize_example(ex, tok, max_length=10**6, response_newline=newline)
    n = len(prompt_ids)
    assert row["input_ids"] == prompt_ids + response_ids
    assert row["labels"] == [IGNORE_INDEX] * n + response_ids
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert not row["truncated"] and not row["no_response"]
    assert tok.decode(response_ids[:-1], clean_up_tokenization_spaces=False) == ex.output


@SLOWER
@given(ex=examples, cut=st.integers(0, 40))
def test_truncation_keeps_the_mask_aligned(ex, cut):
    tok = tokenizer()
    full = tokenize_example(ex, tok, max_length=10**6)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    max_length = max(2, len(full["input_ids"]) - cut)
    row = tokenize_example(ex, tok, max_length=max_length)
    length = min(len(full["input_ids"]), max_length)
    assert row["input_ids"] == full["input_ids"][:length] and row["labels"] == full["labels"][:length]
    assert row["truncated"] == (len(full["input_ids"]) > max_length)
    assert row["no_response"] == (length <= n_prompt)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(examples, min_size=1, max_size=4), max_length=st.integers(2, 400))
def test_dataset_and_collator_keep_the_mask(batch, max_length):
    tok = tokenizer()
    rows = [tokenize_example(ex, tok, max_length=max_length) for ex in batch]
    kept = [r for r in rows if not r["no_response"]]
    assume(kept)
    dataset, stats = tokenize_dataset(batch, tok, max_length=max_length)
    assert stats == {
        "n": len(kept),
        "truncated": sum(r["truncated"] for r in rows),
        "dropped_no_response": len(rows) - len(kept),
    }
    assert [dataset[i]["labels"] for i in range(len(dataset))] == [r["labels"] for r in kept]
    collated = CausalLMCollator.from_tokenizer(tok)([dataset[i] for i in range(len(dataset))])
    for i, r in enumerate(kept):
        width = len(r["input_ids"])
        assert collated["labels"][i, :width].tolist() == r["labels"]
        assert set(collated["labels"][i, width:].tolist()) <= {IGNORE_INDEX}
        assert collated["attention_mask"][i].tolist() == [1] * width + [0] * (
            collated["labels"].shape[1] - width
        )


# ---------------------------------------------------------------- FA scoring


LABELS = st.sampled_from(SST2_LABELS + AGNEWS_LABELS)
spaces = st.text(alphabet=" \t\n", max_size=3)


@FAST
@given(label=LABELS, left=spaces, right=spaces)
def test_a_label_padded_with_whitespace_is_a_hit_under_both_rules(label, left, right):
    for rule in ("exact", "substring"):
        assert label_match(f"{left}{label}{right}", label, rule=rule)


@FAST
@given(prediction=any_text, label=LABELS, aliases=st.lists(st.text(min_size=1, max_size=5), max_size=2))
def test_exact_hit_implies_substring_hit(prediction, label, aliases):
    if label_match(prediction, label, rule="exact", aliases=aliases):
        assert label_match(prediction, label, rule="substring", aliases=aliases)


@FAST
@given(before=any_text, label=LABELS, after=any_text)
def test_substring_rule_finds_the_label_anywhere(before, label, after):
    assert label_match(before + label + after, label, rule="substring")


@FAST
@given(predictions=st.lists(any_text, min_size=1, max_size=8), data=st.data())
def test_scoring_never_raises_and_stays_a_percentage(predictions, data):
    golds = data.draw(st.lists(LABELS, min_size=len(predictions), max_size=len(predictions)))
    for rule in ("exact", "substring"):
        hits = task_hits(predictions, golds, metric="label", rule=rule)
        assert len(hits) == len(predictions) and all(isinstance(h, bool) for h in hits)
        assert 0 <= finetune_accuracy(predictions, golds, metric="label", rule=rule) <= 100
    gsm_golds = data.draw(st.lists(any_text, min_size=len(predictions), max_size=len(predictions)))
    assert 0 <= finetune_accuracy(predictions, gsm_golds, metric="gsm8k") <= 100


# ---------------------------------------------------------------- GSM8K numbers


no_digits = st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs")), max_size=60)
# What may follow a number without extending it ("5" + ".7" would read 5.7, "5" + ",1" would read 51).
after_number = no_digits.filter(lambda s: not s or s[0] not in ".,")


@FAST
@given(text=any_text)
def test_gsm8k_extract_never_raises(text):
    value = gsm8k_extract(text)
    assert value is None or isinstance(value, float)
    # The papers' regex reads \d, i.e. any Unicode decimal digit, and float() accepts them all.
    assert (value is None) == (not any(c.isdecimal() for c in text))


@FAST
@given(before=any_text, x=st.integers(-(10**9), 10**9), after=after_number)
def test_final_answer_phrase_wins_over_later_numbers(before, x, after):
    assume(
        GSM8K_ANSWER_PROMPT not in before.replace(",", "")
    )  # commas are dropped before the phrase is sought
    tail = after + " and 12345 more"  # a later number must not win over the phrase
    assert gsm8k_extract(f"{before}{GSM8K_ANSWER_PROMPT}{x:,}{tail}") == x
    assert gsm8k_match(f"{before}{GSM8K_ANSWER_PROMPT}{x}{tail}", f"work... #### {x:,}")


@FAST
@given(before=any_text, x=st.integers(0, 10**12), after=after_number)
def test_without_the_phrase_the_last_number_wins_and_commas_do_not_matter(before, x, after):
    assume(GSM8K_ANSWER_PROMPT not in f"{before} {after}".replace(",", ""))
    assert gsm8k_extract(f"{before} {x:,}{after}") == gsm8k_extract(f"{before} {x}{after}") == x


@FAST
@given(pred=any_text, gold=any_text)
def test_gsm8k_match_never_raises(pred, gold):
    assert isinstance(gsm8k_match(pred, gold), bool)


# ---------------------------------------------------------------- degenerate answers, HS, refusals


@FAST
@given(text=any_text)
def test_detectors_never_raise(text):
    for detector in (is_too_short, is_repetitive, is_degenerate, is_refusal):
        assert isinstance(detector(text), bool)
    assert is_degenerate(text) == (is_too_short(text) or is_repetitive(text))


@FAST
@given(word=st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), before=any_text)
def test_a_word_four_times_in_a_row_is_repetitive(word, before):
    text = f"{before} " + " ".join([word] * 4)
    assert is_repetitive(text) and is_degenerate(text)


@FAST
@given(before=any_text, after=any_text)
def test_a_refusal_sentence_anywhere_is_detected(before, after):
    assert is_refusal(f"{before}\nI cannot help with that.\n{after}")


@FAST
@given(answers=st.lists(st.tuples(st.booleans(), any_text), min_size=1, max_size=20))
def test_hs_plus_is_at_least_hs(answers):
    flags, responses = [a[0] for a in answers], [a[1] for a in answers]
    hs, hs_plus = harmful_score(flags), harmful_score_plus(flags, responses)
    assert 0 <= hs <= hs_plus <= 100


# ---------------------------------------------------------------- intervals


counts = st.integers(0, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
positive_counts = st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@FAST
@given(kn=counts)
def test_wilson_interval_holds_the_estimate_inside_0_100(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= hi <= 100.0
    if n:
        p = 100.0 * k / n
        assert lo <= p + 1e-9 and p - 1e-9 <= hi
        reported = rate(k, n)
        assert reported["ci95"] == [lo, hi] and reported["value"] == p


@FAST
@given(a=positive_counts, b=positive_counts)
def test_newcombe_difference_is_antisymmetric_and_holds_the_difference(a, b):
    (k1, n1), (k2, n2) = a, b
    lo, hi = difference_interval(k1, n1, k2, n2)
    lo_swapped, hi_swapped = difference_interval(k2, n2, k1, n1)
    assert math.isclose(lo, -hi_swapped, abs_tol=1e-9) and math.isclose(hi, -lo_swapped, abs_tol=1e-9)
    d = 100.0 * (k1 / n1 - k2 / n2)
    assert -100.0 - 1e-9 <= lo <= d + 1e-9 and d - 1e-9 <= hi <= 100.0 + 1e-9
    assert within_noise(k1, n1, k2, n2) == within_noise(k2, n2, k1, n1)


@FAST
@given(pairs=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=50))
def test_cohen_kappa_is_bounded_and_symmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    kappa = cohen_kappa(a, b)
    assert kappa == cohen_kappa(b, a)
    assert kappa is None or -1.0 - 1e-9 <= kappa <= 1.0 + 1e-9
