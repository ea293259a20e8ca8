"""Paper-protocol and modern presets (configs/paper, configs/modern): they load, validate, expand and dry-run on a
CPU without loading any model or data, and their reference numbers are the papers' (docs/methods.md,
section 3, Reference numbers)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from ftguard import cli
from ftguard.config import load_config, packaged_configs_dir
from ftguard.cost import model_parameters
from ftguard.evaluation.judges import JUDGES, available_judges
from ftguard.sweep.config import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]
METHODS_MD = REPO / "docs" / "methods.md"
ROOT = packaged_configs_dir()
NUMBER = r"\d+(?:\.\d+)?"  # not a sentence's final period
FILES = sorted([*(ROOT / "paper").glob("*.yaml"), *(ROOT / "modern").glob("*.yaml")])


def _data(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").as_posix()


def _is_sweep(path: Path) -> bool:
    return bool({"defenses", "grid", "attack"} & set(_data(path)))


SWEEPS = [_name(p) for p in FILES if _is_sweep(p)]
RUNS = [p for p in FILES if not _is_sweep(p)]


def test_the_presets_exist():
    names = {_name(p) for p in FILES}
    expected = {"paper/booster-table1", "paper/booster-tasks", "paper/booster-models", "paper/vaccine-table1"}
    assert expected <= names
    assert any(n.startswith("modern/") for n in SWEEPS) and any(p.parent.name == "modern" for p in RUNS)


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_each_file_starts_with_its_launch_command_and_describes_itself(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    if _is_sweep(path):
        assert first == f"# ftguard sweep {_name(path)}"
    else:
        assert first.startswith("# ftguard run ")
    assert len(_data(path).get("description", "")) > 100


@pytest.mark.parametrize("path", RUNS, ids=_name)
def test_run_configs_validate_and_name_a_known_model_and_judge(path):
    cfg = load_config(str(path))
    assert model_parameters(cfg) > 1e9  # in the estimate's table: the dry run needs no gpu.model_parameters
    for judge in [cfg.evaluate.judge, *cfg.evaluate.extra_judges]:
        assert judge in available_judges()
    accepted = inspect.signature(JUDGES[cfg.evaluate.judge].__init__).parameters
    assert set(cfg.evaluate.judge_options) <= set(accepted)


def test_the_booster_base_follows_the_paper_protocol():
    cfg = load_config(str(ROOT / "paper" / "booster-llama2-7b.yaml"))
    # docs/methods.md: Models, Booster, Alignment data
    assert cfg.model.name == "meta-llama/Llama-2-7b-hf" and cfg.model.max_length == 256
    assert (cfg.data.alignment.n, cfg.data.finetune.harmful_reserve) == (4999, 5000)
    assert (cfg.data.finetune.n, cfg.data.finetune.harmful_ratio, cfg.data.finetune.task) == (
        1000,
        0.1,
        "sst2",
    )
    for lora in (cfg.adapter.align, cfg.adapter.finetune):  # docs/methods.md: Booster, Adapter topologies
        assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
            32,
            4,
            0,
            ["q_proj", "k_proj", "v_proj"],
        )
    assert cfg.align is not None and cfg.finetune is not None
    assert (cfg.align.train.learning_rate, cfg.align.train.epochs, cfg.align.train.batch_size) == (
        5e-4,
        20,
        10,
    )
    ft = cfg.finetune.train
    assert (ft.learning_rate, ft.lr_scheduler, ft.epochs, ft.batch_size) == (1e-5, "constant", 20, 10)
    ev = cfg.evaluate
    assert (ev.judge, ev.harmful_prompts.n, ev.max_new_tokens, ev.task_rule) == (
        "beaver-dam",
        1000,
        512,
        "exact",
    )


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_expand_into_validated_runs(name, tmp_path):
    sweep, folder = load_sweep(name)
    runs = expand(sweep, folder, tmp_path)  # validates every run config, methods and their args included
    assert {r.defense for r in runs} == set(sweep.defenses)
    assert len(runs) == len(sweep.defenses) * _grid_size(sweep)
    assert sweep.description
    if sweep.reference is not None:
        assert sweep.reference.source
        assert set(sweep.reference.hs) | set(sweep.reference.fa) <= set(sweep.defenses)
    if "booster" in sweep.defenses:
        assert all(r.config.adapter.topology == "single" for r in runs if r.defense == "booster")


def _grid_size(sweep) -> int:
    size = 1
    for values in [*sweep.grid.values(), *(sweep.attack.grid.values() if sweep.attack else [])]:
        size *= len(values)
    return size


@pytest.mark.parametrize("name", SWEEPS)
def test_dry_run_prints_the_plan_and_positive_gpu_hours(name, capsys):
    assert cli.main(["sweep", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {Path(name).name}:" in out
    total = float(re.search(r"; total ([\d.]+)", out).group(1))
    # Paper-scale sweeps on one A100: hours per run, tens of GPU hours per table (not minutes, not months).
    assert 5 < total < 500, out


def test_configs_lists_the_presets(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in [*SWEEPS, *(_name(p) for p in RUNS)]:
        assert name in out
    assert cli.main(["configs", "--show", "paper/booster-table1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "booster-table1"  # only the file: valid YAML


# ----------------------------------------------------------------------------------------- reference numbers


def _methods_md_section3() -> str:
    text = METHODS_MD.read_text(encoding="utf-8")
    return text[text.index("## 3.") : text.index("## 4.")]


def _paper_numbers(block: str) -> dict[str, dict[str, dict[str, float]]]:
    """{'hs'|'fa': {defense: {column: value}}} from one paper's block of docs/methods.md, section 3: the p =
    0.1 table and the "Averages" / "Clean" / per-model lines ("SFT 33.58/90.39, Lisa 21.88/91.13")."""
    out: dict[str, dict[str, dict[str, float]]] = {"hs": {}, "fa": {}}
    header = next(line for line in block.splitlines() if line.startswith("| p=0.1 |"))
    defenses = [c.strip().lower() for c in header.strip("|").split("|")[1:]]
    for line in block.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] in ("HS", "FA"):
            for defense, value in zip(defenses, cells[1:], strict=True):
                out[cells[0].lower()].setdefault(defense, {})["0.1"] = float(value)
    columns = {"Averages": "avg", "Clean": "0", "Gemma2-9B": "gemma-2-9b", "Qwen2-7B": "qwen2-7b"}
    for line in block.splitlines():
        label = line.removeprefix("- ").split(" ")[0].rstrip(":")
        if label not in columns:
            continue
        for defense, hs, fa in re.findall(rf"([A-Za-z][\w-]*) ({NUMBER})/({NUMBER})", line.split(":", 1)[1]):
            out["hs"].setdefault(defense.lower(), {})[columns[label]] = float(hs)
            out["fa"].setdefault(defense.lower(), {})[columns[label]] = float(fa)
    return out


def _blocks() -> dict[str, str]:
    section = _methods_md_section3()
    vaccine = section[section.index("**Vaccine, Table 1.**") : section.index("**Booster, Table 1")]
    booster = section[section.index("**Booster, Table 1") : section.index("**Lisa paper")]
    return {"vaccine": vaccine, "booster": booster}


def _reference(name: str):
    sweep, _ = load_sweep(name)
    assert sweep.reference is not None
    return sweep.reference


def _assert_same(reference, paper, columns):
    for metric in ("hs", "fa"):
        ours = getattr(reference, metric)
        for defense, values in paper[metric].items():
            for column in columns:
                if column in values:
                    assert ours[defense][column] == pytest.approx(values[column]), (metric, defense, column)
        # No number in the file that methods.md does not have.
        for defense, values in ours.items():
            for column, value in values.items():
                if column in columns:
                    assert paper[metric][defense][column] == pytest.approx(value), (metric, defense, column)


def test_booster_table1_reference_is_methods_md():
    paper = _paper_numbers(_blocks()["booster"])
    assert paper["hs"]["booster"]["0.1"] == 8.3 and paper["fa"]["sft"]["avg"] == 90.39  # the parser works
    _assert_same(_reference("paper/booster-table1"), paper, ("0", "0.1", "avg"))


def test_booster_models_reference_is_methods_md():
    paper = _paper_numbers(_blocks()["booster"])
    _assert_same(_reference("paper/booster-models"), paper, ("gemma-2-9b", "qwen2-7b"))


def test_booster_tasks_reference_is_methods_md():
    block = _blocks()["booster"]
    paper = _paper_numbers(block)
    reference = _reference("paper/booster-tasks")
    for metric in ("hs", "fa"):
        for defense, values in getattr(reference, metric).items():
            assert values["sst2"] == pytest.approx(paper[metric][defense]["0.1"])
    default, table3 = (
        float(x) for x in re.search(rf"GSM8K: HS ({NUMBER}) .* vs ({NUMBER}) in Table 3", block).groups()
    )
    gsm8k = {k: v for k, v in reference.hs["booster"].items() if k.startswith("gsm8k")}
    assert sorted(gsm8k.values()) == sorted([default, table3])


def test_vaccine_table1_reference_is_methods_md():
    paper = _paper_numbers(_blocks()["vaccine"])
    assert paper["hs"]["non-aligned"]["0.1"] == 77.6 and paper["fa"]["vaccine"]["avg"] == 93.4
    _assert_same(_reference("paper/vaccine-table1"), paper, ("0", "0.1", "avg"))
