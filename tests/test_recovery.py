"""Recovery with rollback (docs/methods.md, Recovery): the selected entries against an independent top-k,
rollback, the schedule on a stubbed task score, resume, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from ftguard.methods.recovery import Recoverer, RecoveryConfig, mean_direction, run_schedule
from ftguard.schema import ConfigError, from_dict
from tiny import tiny_llama

K = 2  # of 3 layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _models():
    aligned = tiny_llama(num_hidden_layers=3).eval()
    tuned = copy.deepcopy(aligned)
    with (
        torch.no_grad()
    ):  # F = A + a fine-tuning delta on every linear layer (norms and embeddings untouched)
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return aligned, tuned


def _batches(seed: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (3, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _recoverer(rate=0.01, rollback_rate=0.2):
    aligned, tuned = _models()
    harmful, task = _batches(1), _batches(2)
    d_harm, d_ben = mean_direction(aligned, K, harmful), mean_direction(tuned, K, task)
    work = copy.deepcopy(tuned)
    rec = Recoverer(
        work, K, _state(aligned), _state(tuned), harmful, task, d_harm, d_ben, rate, rollback_rate
    )
    return rec, aligned, tuned


def _scope(model):
    """Non-norm parameters of layers < K, named as in the state dict (written here independently of the code)."""
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith(("model.layers.0.", "model.layers.1.")) and "layernorm" not in n
    }


def _grads(model, batches, direction):
    """Σ_batches −cos(mean h_K at the last token, d) by the model's own output_hidden_states, differentiated."""
    params = _scope(model)
    loss = 0
    for b in batches:
        h = model(**b, output_hidden_states=True).hidden_states[K][:, -1, :].mean(0)
        loss = loss - torch.nn.functional.cosine_similarity(h, direction, dim=0)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def _expected_top(grads, candidates, k):
    names = list(grads)
    flat = torch.cat([grads[n].abs().flatten() for n in names])
    cand = torch.cat([candidates[n].flatten() for n in names])
    idx = torch.nonzero(cand).flatten()
    top = idx[torch.argsort(flat[idx], descending=True, stable=True)[: min(k, idx.numel())]]
    chosen = torch.zeros_like(cand)
    chosen[top] = True
    out, start = {}, 0
    for n in names:
        out[n] = chosen[start : start + grads[n].numel()].view_as(grads[n])
        start += grads[n].numel()
    return out


def _changed(before, model):
    return {n: before[n] != p.detach() for n, p in model.named_parameters()}


def test_recovery_step_restores_exactly_the_top_k_candidates_to_aligned_values():
    rec, aligned, tuned = _recoverer(rate=0.01)
    a = dict(aligned.named_parameters())
    grads = _grads(copy.deepcopy(tuned), rec.harmful, rec.d_harm)
    cands = {n: torch.sign(tuned.get_parameter(n) - a[n]) * torch.sign(g) > 0 for n, g in grads.items()}
    n_layers = sum(p.numel() for p in tuned.model.layers.parameters())
    expected = _expected_top(grads, cands, math.ceil(0.01 * n_layers))
    before = _state(tuned)

    chosen, info = rec.recovery_step()

    changed = _changed(before, rec.model)
    assert info["restored"] == math.ceil(0.01 * n_layers) > 0
    for n, moved in changed.items():
        if n in expected:
            assert torch.equal(moved, expected[n] & (a[n] != before[n])), n
            assert torch.equal(chosen[n], expected[n])
            assert torch.equal(rec.model.get_parameter(n)[moved], a[n].detach()[moved])  # exactly A's value
        else:
            assert not moved.any(), f"{n} is outside the repaired scope but changed"


def test_gradients_accumulate_across_recovery_steps():
    rec, _, tuned = _recoverer(rate=0.01)
    w0 = copy.deepcopy(rec.model)
    rec.recovery_step()
    w1 = copy.deepcopy(rec.model)
    rec.recovery_step()
    g0, g1 = _grads(w0, rec.harmful, rec.d_harm), _grads(w1, rec.harmful, rec.d_harm)
    for n, p in rec.params.items():
        torch.testing.assert_close(p.grad, g0[n] + g1[n], rtol=1e-5, atol=1e-7)


def test_rollback_reverts_only_this_steps_restored_entries_to_finetuned_values():
    rec, aligned, tuned = _recoverer(rate=0.02, rollback_rate=0.3)
    f = dict(tuned.named_parameters())
    rec.recovery_step()  # an earlier step: its entries must survive the next rollback
    earlier = {n: m.clone() for n, m in rec.restored.items()}
    chosen, _ = rec.recovery_step()
    after_recovery = _state(rec.model)
    grads = _grads(copy.deepcopy(rec.model), rec.task, rec.d_ben)
    cands = {
        n: (torch.sign(after_recovery[n] - f[n]) * torch.sign(g) > 0) & chosen[n] for n, g in grads.items()
    }
    n_cand = sum(int(c.sum()) for c in cands.values())
    expected = _expected_top(grads, cands, math.ceil(0.3 * n_cand))

    info = rec.rollback_step(chosen)

    assert info["reverted"] == math.ceil(0.3 * n_cand) > 0
    for n, reverted in _changed(after_recovery, rec.model).items():
        if n not in expected:
            assert not reverted.any()
            continue
        assert torch.equal(reverted, expected[n])
        assert torch.equal(rec.model.get_parameter(n)[reverted], f[n].detach()[reverted])
        assert not (reverted & earlier[n] & ~chosen[n]).any()
        assert torch.equal(rec.restored[n], (earlier[n] | chosen[n]) & ~reverted)
    assert all(p.grad is None for p in rec.params.values()), "rollback zeroes the gradients"


def test_recovery_raises_the_harmful_direction_cosine():
    rec, _, _ = _recoverer(rate=0.05)
    batches = rec.harmful

    def cos():
        return torch.nn.functional.cosine_similarity(
            mean_direction(rec.model, K, batches), rec.d_harm, dim=0
        ).item()

    start = cos()
    for _ in range(3):
        rec.recovery_step()
    assert cos() > start + 1e-3


def test_zero_rate_changes_nothing():
    rec, _, tuned = _recoverer(rate=0.0, rollback_rate=0.0)
    before = _state(tuned)
    for _ in range(2):
        chosen, info = rec.recovery_step()
        rec.rollback_step(chosen)
    assert info["restored"] == 0
    assert all(torch.equal(before[n], p) for n, p in rec.model.state_dict().items())


# ------------------------------------------------------------------------------------- schedule (stubbed)


class _FakeRec:
    """Counts steps; its one mask holds one restored entry per step since the last restart."""

    def __init__(self):
        self.restored = {"w": torch.zeros(64, dtype=torch.bool)}
        self.params = {"w": torch.nn.Parameter(torch.zeros(1))}
        self.events = []
        self.model = None

    def recovery_step(self):
        self.restored["w"][int(self.restored["w"].sum())] = True
        self.events.append("recover")
        return {}, {}

    def rollback_step(self, chosen):
        self.events.append("rollback")
        return {}

    def set_restored(self, masks):
        self.restored = {n: m.clone() for n, m in masks.items()}

    def zero_grad(self):
        self.events.append("zero")

    def n_restored(self):
        return int(self.restored["w"].sum())


def _schedule(scores, **cfg):
    rec, calls = _FakeRec(), iter(scores)
    meta = run_schedule(rec, RecoveryConfig(**cfg), lambda m: next(calls))
    return rec, meta


def test_schedule_without_rollback_returns_the_checkpoint_before_the_first_drop():
    # F = 100 → minimum 95. Warm-up 99 (no rollback), then 10: 98, 15: 96, 20: 94 ≤ 95 → keep 15.
    rec, meta = _schedule([100, 99, 98, 96, 94])
    assert rec.events == ["recover"] * 20 and not meta["rollback"]
    assert [c["step"] for c in meta["checkpoints"]] == [5, 10, 15, 20]
    assert meta["good_step"] == 15 and rec.n_restored() == 15


def test_schedule_enables_rollback_restarts_from_f_and_stops_at_the_first_drop():
    # Warm-up 90 < 95 → restart from F with rollback; 5: 99, 10: 95 ≤ 95 → keep 5, steps 11–20 never run.
    rec, meta = _schedule([100, 90, 99, 95])
    assert rec.events == ["recover"] * 5 + ["zero"] + ["recover", "rollback"] * 10
    assert meta["rollback"] and [c["step"] for c in meta["checkpoints"]] == [5, 10]
    assert meta["good_step"] == 5 and rec.n_restored() == 5


def test_schedule_edge_cases():
    rec, meta = _schedule([100, 90, 80])  # the first rollback checkpoint already fails → F itself
    assert meta["good_step"] == 0 and rec.n_restored() == 0
    rec, meta = _schedule([100, 95])  # equal to the minimum: no rollback (<) but a stop (≤) → F
    assert not meta["rollback"] and meta["good_step"] == 0 and rec.n_restored() == 0
    rec, meta = _schedule(
        [0, 0, 0, 0, 0]
    )  # no task score to lose: nothing fails, the last checkpoint is kept
    assert meta["good_step"] == 20 and rec.n_restored() == 20
    # rollback disabled: the low warm-up checkpoint is simply the first checkpoint, and it fails → F
    rec, meta = _schedule([100, 50], rollback=False)
    assert rec.events == ["recover"] * 5 and not meta["rollback"] and meta["good_step"] == 0
    rec, meta = _schedule([100, 99, 99, 99], steps=12, warmup_steps=4, save_every=4)
    assert [c["step"] for c in meta["checkpoints"]] == [4, 8, 12] and len(rec.events) == 12


@pytest.mark.parametrize(("warmup_score", "stop_after"), [(99.0, 7), (50.0, 3), (50.0, 8)])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, warmup_score, stop_after):
    cfg = RecoveryConfig(steps=10, warmup_steps=5, save_every=5, recovery_rate=0.01)

    def score(m):  # F, warm-up, then checkpoints that never fail
        return scores.pop(0) if scores else 99.0

    scores = [100.0, warmup_score]
    rec, _, _ = _recoverer(rate=0.01)
    full = run_schedule(rec, cfg, score)
    expected = _state(rec.model)

    scores = [100.0, warmup_score]
    path = tmp_path / "state.safetensors"
    first, _, _ = _recoverer(rate=0.01)
    part = run_schedule(first, cfg, score, path, stop_after=stop_after)
    assert not part["done"] and path.is_file()
    second, _, _ = _recoverer(rate=0.01)  # a fresh process: W = F again, state from disk
    resumed = run_schedule(second, cfg, score, path)
    assert resumed["resumed"] and resumed["good_step"] == full["good_step"] == 10
    assert resumed["rollback"] == full["rollback"] == (warmup_score < 95)
    assert resumed["steps"] == full["steps"]
    for n, p in second.model.state_dict().items():
        assert torch.equal(p, expected[n]), n


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="recovery_rate"):
        from_dict(RecoveryConfig, {"recovery_rate": 1.5})
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(RecoveryConfig, {"steps": 3, "warmup_steps": 5})
    with pytest.raises(ConfigError, match="layer_fractio"):
        from_dict(RecoveryConfig, {"layer_fractio": 0.5})


@pytest.mark.slow
def test_pipeline_runs_recovery_end_to_end(tmp_path):
    from safetensors.torch import load_file

    from ftguard import cli

    assert cli.main(["run", "recovery-tiny", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["stages"]["post"]
    assert entry["method"] == "recovery" and "harmful_score" in entry and "finetune_accuracy" in entry
    report = json.loads((tmp_path / "post" / "COMPLETE.json").read_text())["report"]
    assert report["layers_repaired"] == 1 and report["checkpoints"] and not report["resumed"]
    tuned = load_file(next((tmp_path / "finetune" / "model").glob("*.safetensors")))
    aligned = load_file(next((tmp_path / "align" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post" / "model").glob("*.safetensors")))
    moved = 0
    for n, w in repaired.items():
        changed = w != tuned[n]
        if changed.any():  # only layer 0 (K = 1 of 2), only LoRA-touched weights, and only to A's values
            assert n.startswith("model.layers.0.self_attn."), n
            assert torch.equal(w[changed], aligned[n][changed])
            moved += int(changed.sum())
    assert moved == report["restored_entries"]
    assert moved > 0 or report["selected_step"] == 0
