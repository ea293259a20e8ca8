"""Sweeps: expansion of the grid, validation before any work, the packaged sweeps, a tiny sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftguard import cli
from ftguard.config import load_config
from ftguard.data.plan import build_data_plan
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError
from ftguard.sweep.config import expand
from script_module import load_script
from sweep_helpers import TINY, tiny_sweep, unit_folders


def test_expansion_is_the_full_product_with_validated_configs(tmp_path):
    sweep = tiny_sweep(
        defenses={"sft": {}, "vaccine": {"align.method": "vaccine"}, "none": {"align": None}},
        grid={"data.finetune.harmful_ratio": [0.0, 0.5]},
        seeds=[1, 2],
    )
    runs = expand(sweep, tmp_path, tmp_path / "out")
    assert len(runs) == 3 * 2 * 2 and len({r.id for r in runs}) == 12
    vaccine = [r for r in runs if r.defense == "vaccine" and r.axes["data.finetune.harmful_ratio"] == 0.5]
    assert {r.seed for r in vaccine} == {1, 2} and all(r.config.align.method == "vaccine" for r in vaccine)
    assert all(r.config.align is None for r in runs if r.defense == "none")
    assert runs[0].config.out_dir == tmp_path / "out" / "runs" / runs[0].id
    # every run keeps the same leading records for the attack: round(0.5 · 64) = 32, the largest need
    assert {r.config.data.finetune.harmful_reserve for r in runs} == {32}


def test_the_attack_is_a_grid_axis_with_readable_run_folders(tmp_path):
    attacks = [
        {"name": "harmful_mix"},
        {"name": "jailbreak_tuning", "args": {"template": "year_2025"}},
        {"name": "benign_identity_shift", "args": {"mode": "in_task"}},
    ]
    runs = expand(
        tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.attack": attacks}), tmp_path, tmp_path / "o"
    )
    assert [r.id.split("/")[1] for r in runs] == [
        "attack=harmful_mix-seed43",
        "attack=jailbreak_tuning-template=year_2025-seed43",
        "attack=benign_identity_shift-mode=in_task-seed43",
    ]
    assert [r.config.data.finetune.attack.name for r in runs] == [a["name"] for a in attacks]
    with pytest.raises(ConfigError, match=r"data\.finetune\.attack\.args\.templat"):
        expand(
            tiny_sweep(
                grid={"data.finetune.attack": [{"name": "jailbreak_tuning", "args": {"templat": "x"}}]}
            ),
            tmp_path,
            tmp_path / "o",
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"defenses": {"bad": {"align.methd": "sft"}}}, "sweep run bad/seed43: unknown key 'align.methd'"),
        ({"grid": {"data.finetune.harmful_ratio": [0.1, 2.0]}}, "harmful_ratio"),
        ({"defenses": {"x": {"align.method": "vacine"}}}, "vacine"),
    ],
)
def test_a_bad_run_anywhere_in_the_grid_fails_before_any_work(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(tiny_sweep(**extra), tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"grid": {"data.finetune.harmful_ratio": []}}, "data.finetune.harmful_ratio"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"defenses": {}}, "defenses"),
        ({"attack": {"grid": {}}}, "grid"),
        ({"attack": {"grid": {"x": [1]}, "capability_guard": {"max_fa_drop": 300}}}, "max_fa_drop"),
        ({"attack": {"grid": {"x": [1]}, "capability_guard": {"relative_to": "worst"}}}, "relative_to"),
        # a listed attack setting gives every grid axis a value, once, and is not one of the grid's own
        ({"attack": {"grid": {"x": [1], "y": [2]}, "settings": [{"x": 3}]}}, r"setting 0 sets \['x'\]"),
        ({"attack": {"grid": {"x": [1], "y": [2]}, "settings": [{"x": 1, "y": 2}]}}, "already in the grid"),
        ({"attack": {"grid": {"x": [1]}, "settings": [{"x": 2}, {"x": 2}]}}, "setting 1 is already"),
    ],
)
def test_sweep_schema_errors_name_the_key(extra, key):
    with pytest.raises(ConfigError, match=key):
        tiny_sweep(**extra)


def test_aligned_model_fingerprint_is_shared_across_ratios_only_with_the_reserve():
    def graph(p, reserve, *more):
        overrides = [f"data.finetune.harmful_ratio={p}", f"data.finetune.harmful_reserve={reserve}", *more]
        return build_graph(load_run("quickstart-tiny", overrides))

    a, b = graph(0.0, 32), graph(0.5, 32)
    assert a.plan.alignment == b.plan.alignment and a.unit("align") == b.unit("align")
    assert a.unit("finetune").fingerprint != b.unit("finetune").fingerprint
    # without a fixed reserve the attack's records are taken first, so the alignment data shift with p
    c, d = graph(0.0, "null"), graph(0.5, "null")
    assert c.plan.alignment != d.plan.alignment and c.unit("align") != d.unit("align")
    # the evaluation of the same model with other settings is another unit; the model is not
    e, f = graph(0.1, 32, "evaluate.max_new_tokens=4"), graph(0.1, 32)
    assert e.unit("align") == f.unit("align") and e.unit("eval/align") != f.unit("eval/align")


def test_a_reserve_smaller_than_the_attack_fails_with_the_key():
    cfg = load_config(
        "quickstart-tiny", ["data.finetune.harmful_ratio=0.5", "data.finetune.harmful_reserve=3"]
    )
    with pytest.raises(Exception, match="harmful_reserve = 3"):
        build_data_plan(cfg, roles=())


@pytest.mark.slow
def test_tiny_sweep_shares_units_resumes_and_reports(tmp_path, monkeypatch):
    spec = {
        "name": "tiny-sweep",
        **TINY,
        "seeds": [5],
        "defenses": {"sft": {}, "safelora": {"post.method": "safelora"}},
        "grid": {"data.finetune.harmful_ratio": [0.0, 0.5]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--output-dir", str(out)]) == 0

    units = {kind: unit_folders(out, kind) for kind in ("align", "finetune")}
    # one aligned model for both ratios and both defenses; one fine-tune per ratio, shared by both defenses
    assert len(units["align"]) == 1 and len(units["finetune"]) == 2
    assert len(unit_folders(out, "post")) == 2
    index = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(index) == 4 and {e["status"] for e in index.values()} == {"complete"}
    rows = json.loads((out / "runs.json").read_text())
    finals = [r for r in rows if r["final"]]
    assert {(r["defense"], r["point"]) for r in finals} == {
        ("sft", "finetune"),
        ("safelora", "post"),
    } and len(finals) == 4
    sft = [r for r in rows if r["defense"] == "sft" and r["point"] == "finetune"]
    shared = [r for r in rows if r["defense"] == "safelora" and r["point"] == "finetune"]
    # the shared fine-tune was evaluated once: both runs report the very same numbers
    assert sorted((r["p"], r["harmful_score"]) for r in sft) == sorted(
        (r["p"], r["harmful_score"]) for r in shared
    )
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "| safelora |" in report and "p = 0.5" in report
    assert (out / "hs_vs_p.png").stat().st_size > 1000 and (out / "hs_vs_fa.png").stat().st_size > 1000
    assert (out / "runs.csv").read_text().count("\n") == len(rows) + 1
    # each point says where its answers are: the shared store's evaluation, whichever run made it
    for entry in index.values():
        results = json.loads((Path(entry["dir"]) / "results.json").read_text())
        for point in results["stages"].values():
            answers = Path(point["generations"])
            assert answers.is_absolute() and answers.is_relative_to((out / "units" / "eval").resolve())
            assert answers.is_file()

    # resume: a run whose results vanished is redone from the shared units, without any training
    import ftguard.pipeline.run as run_mod

    victim = Path(next(iter(index.values()))["dir"])
    (victim / "results.json").unlink()

    def no_training(*a, **k):
        raise AssertionError("a unit was trained again")

    monkeypatch.setattr(run_mod, "train_stage", no_training)
    monkeypatch.setattr(run_mod, "post_stage", no_training)
    monkeypatch.setattr(run_mod, "evaluate_point", no_training)
    assert cli.main(["sweep", str(path), "--output-dir", str(out)]) == 0
    assert json.loads((victim / "results.json").read_text())["complete"] is True

    # Another sweep pointed at this store (--units-dir) needs no training for the units the two share, and
    # leaves its own output dir without a units folder.
    probe = tmp_path / "probe.yaml"
    probe.write_text(
        yaml.safe_dump({**spec, "name": "probe", "grid": {"data.finetune.harmful_ratio": [0.5]}})
    )
    other = tmp_path / "other"
    assert cli.main(["sweep", str(probe), "--output-dir", str(other), "--units-dir", str(out / "units")]) == 0
    assert json.loads((other / "report.json").read_text())["runs"] == 2 and not (other / "units").exists()

    # The results alone (no weights), archived and restored into another folder: every run is done there.
    archive_sweep = load_script("archive_sweep")
    moved = tmp_path / "moved"
    assert archive_sweep.archive(out, moved) == 4
    assert not [p for p in moved.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    # ... also when the results predate a config field whose default keeps the old behaviour
    for results in moved.glob("runs/*/*/results.json"):
        data = json.loads(results.read_text())
        del data["config"]["model"]["trust_remote_code"]
        data["config_hash"] = "written-by-an-older-ftguard"
        results.write_text(json.dumps(data))
    assert cli.main(["sweep", str(path), "--output-dir", str(moved)]) == 0
    assert (moved / "report.md").read_text() == (out / "report.md").read_text()

    # The archive's answers (in the units store it names) judged again by the same judge and refusal detector:
    # the same report, point for point (`ftguard judge rescore` on real generations, not hand-made ones)
    again = tmp_path / "again"
    rescore = ["judge", "rescore", str(moved), "--judge", "keyword", "--refusal-detector", "rules"]
    assert cli.main([*rescore, "--output-dir", str(again), "--sweep", str(path)]) == 0
    tables = json.loads((again / "report.json").read_text())["tables"]
    assert tables == json.loads((out / "report.json").read_text())["tables"]
    summary = json.loads((again / "rescore.json").read_text())["points"]
    assert len(summary) == 6 and all(p["agreement"] == 100.0 for p in summary)  # 4 runs, safelora: + post

    # Archived, then judged again where the units store is gone (a new machine): the thinner copy is refused
    # and the fuller archive kept
    archived = tmp_path / "archived"
    archive_sweep.archive(again, archived)
    (out / "units").rename(tmp_path / "units-elsewhere")
    lost = tmp_path / "lost"
    cli.main([*rescore, "--output-dir", str(lost)])
    assert archive_sweep.scored_points(lost) == 0 < archive_sweep.scored_points(archived) == 6
    before = (archived / "rescore.json").read_text()
    with pytest.raises(SystemExit, match="kept the archive"):
        archive_sweep.archive(lost, archived)
    assert (archived / "rescore.json").read_text() == before


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import ftguard.pipeline.run as run_mod

    spec = {"name": "f", **TINY, "seeds": [5], "grid": {"data.finetune.harmful_ratio": [0.0, 0.5]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    real = run_mod.evaluate_point

    def flaky(run, key, *a, **k):
        if run.data.finetune.harmful_ratio == 0.5:
            raise OSError("disk full")
        return real(run, key, *a, **k)

    monkeypatch.setattr(run_mod, "evaluate_point", flaky)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--output-dir", str(out)]) == 1
    status = {k: v["status"] for k, v in json.loads((out / "sweep.json").read_text())["runs"].items()}
    assert sorted(status.values()) == ["complete", "failed: disk full"]
    assert "Incomplete: 1 of 2 runs" in (out / "report.md").read_text()
    monkeypatch.setattr(run_mod, "evaluate_point", real)
    assert cli.main(["sweep", str(path), "--output-dir", str(out)]) == 0


SWEEPS = Path(__file__).resolve().parents[1] / "src" / "ftguard" / "configs" / "sweeps"


@pytest.mark.parametrize("name", sorted(f"sweeps/{p.stem}" for p in SWEEPS.glob("*.yaml")))
def test_packaged_cpu_sweeps_validate_and_dry_run(name, tmp_path, capsys, request):
    from ftguard.sweep.config import load_sweep
    from ftguard.sweep.runner import preflight

    sweep, folder = load_sweep(name)
    runs = expand(sweep, folder, tmp_path)
    if any(str(run.config.data.root) != "bundled" for run in runs):
        request.getfixturevalue("shared_data")  # testbed sweeps read ../shared/data: skipped in a fresh clone
    preflight(runs)  # every data plan of the grid builds (from the bundled data where the sweep uses it)
    assert cli.main(["sweep", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(runs)} runs" in out and "shared across runs" in out
