"""The `ftguard` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError

DEMO_CONFIG = "demo"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file or packaged config name (see `ftguard configs`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set finetune.train.max_steps=20 (repeatable)",
    )
    p.add_argument("--output-dir", help="shortcut for --set output_dir=DIR")
    p.add_argument(
        "--overwrite", action="store_true", help="replace outputs of a different config in the output dir"
    )


def _load(args: argparse.Namespace):
    """The run of ``args.config`` resolved once: every name and method arg checked before any work."""
    from ftguard.resolve import load_run

    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_run(args.config, overrides)


def _print_table(results: dict) -> None:
    """Shown after every evaluation point, so long runs report as they go."""
    from ftguard.pipeline.results import markdown_table

    print("\n" + markdown_table(results, status=False), flush=True)


def cmd_run(
    args: argparse.Namespace, train: tuple[str, ...] = ("align", "finetune", "post"), evaluate: bool = True
) -> int:
    from ftguard.pipeline.run import run_pipeline

    resolved = _load(args)
    repo_id = getattr(args, "push_to_hub", None)
    policy, report = getattr(args, "policy", None), getattr(args, "report", None)
    if policy:
        from ftguard.policy import load_policy

        load_policy(policy)  # a bad policy fails before training, not after
        # an earlier verdict must not stand for this run if it stops incomplete
        (resolved.config.out_dir / "verdict.json").unlink(missing_ok=True)
    if repo_id:
        from ftguard.model_card import final_model_key, hub_token

        token, final_key = hub_token(), final_model_key(resolved.config)  # fail before training, not after
    results = run_pipeline(
        resolved, overwrite=args.overwrite, train=train, evaluate=evaluate, on_update=_print_table
    )
    out = resolved.config.out_dir
    state = "complete" if results["complete"] else "incomplete: stages or evaluations remain"
    print(f"results ({state}): {out / 'results.json'}")
    if (policy or report or repo_id) and not results["complete"]:
        raise FtguardError(
            "the run is incomplete: no verdict, report or upload (run the same command again to finish it)"
        )
    from ftguard import distributed

    if policy or report or repo_id:
        # Gating, the page and an upload read files and need no other rank: leave the group now, or the others
        # would wait at its closing barrier for a long upload, past gloo's timeout.
        distributed.shutdown()
    if not distributed.is_main():
        return 0
    code = 0
    if policy:
        from ftguard.policy import gate_with_policy

        code = gate_with_policy(str(out), policy, str(out / "verdict.json"))
    if report:
        from ftguard.report_html import build_report, write_report

        print(f"report: {write_report(report, build_report(str(out), policy=policy))}")
    if repo_id:
        from ftguard.model_card import push_to_hub

        if code != 0:
            print(f"not pushed to {repo_id}: the release policy blocked the model")
            return code
        folder = out / final_key / "model"
        push_to_hub(folder, repo_id, private=not args.hub_public, token=token)
        print(f"pushed {folder} to {repo_id} ({'public' if args.hub_public else 'private'})")
    return code


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model:
        import json

        from ftguard.pipeline.run import evaluate_model_dir

        metrics = evaluate_model_dir(_load(args), args.model)
        print(json.dumps(metrics, indent=2))
        return 0
    return cmd_run(args, train=())


def _print_registered(name: str, entry: Any, width: int, verbose: bool) -> None:
    """One line for a registered method or attack; with ``verbose``, its config's fields and defaults."""
    from ftguard.schema import field_help

    print(f"  {name:<{width}}  {entry.summary}  [{entry.paper}]")
    if verbose:
        for field, help_text in field_help(entry.config_class).items():
            default = getattr(entry.config_class(), field)
            print(f"      {field} = {default!r}: {help_text}")


def cmd_methods(args: argparse.Namespace) -> int:
    from ftguard.methods.registry import STAGE_NAMES, all_methods

    methods = all_methods()
    width = max(map(len, methods))
    for stage in STAGE_NAMES:
        names = [n for n, m in methods.items() if stage in m.stages]
        if not names:
            continue
        print(f"{stage}:")
        for name in names:
            _print_registered(name, methods[name], width, args.verbose)
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from ftguard.attacks.base import all_attacks

    attacks = all_attacks()
    width = max(map(len, attacks))
    for name, attack in attacks.items():
        _print_registered(name, attack, width, args.verbose)
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    import yaml

    from ftguard.config import packaged_configs, packaged_configs_dir

    root = packaged_configs_dir()
    if args.show:
        # Only the file, so that `--show NAME > my.yaml` is valid YAML.
        from ftguard.config import resolve_config_path

        nested = root / f"{args.show}.yaml"  # paper/..., modern/...
        path = nested if "/" in args.show and nested.is_file() else resolve_config_path(args.show)
        if args.resolved:
            from ftguard.config import dump_config, load_config

            print(dump_config(load_config(str(path))))
        else:
            print(path.read_text(encoding="utf-8"))
        return 0
    for name, path in packaged_configs().items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        desc = " ".join(str(data.get("description", "")).split())
        print(f"{name:<22} {textwrap.shorten(desc, 90)}")
    # Paper and modern protocols live in subfolders: sweeps, and the run configs they start from.
    for path in sorted(root.glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        kind = (
            "sweep" if {"defenses", "grid", "attack"} & set(data) else "policy" if "rules" in data else "run"
        )
        desc = " ".join(str(data.get("description", "")).split())
        name = path.relative_to(root).with_suffix("").as_posix()
        print(f"{name:<32} [{kind}] {textwrap.shorten(desc, 76)}")
    print(
        "\nrun one with `ftguard run NAME`, a [sweep] with `ftguard sweep NAME`, gate by a [policy] with "
        "`ftguard gate RUN --policy NAME`; copy one with `ftguard configs --show NAME > my.yaml`"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ftguard.compare import collect_rows, markdown, plot

    rows = collect_rows(args.runs)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    plot(rows, out)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")
    print(f"plot: {out}")
    return 0


def _cmd_bench_generation(args: argparse.Namespace) -> int:
    from ftguard.bench_generation import GenerationBenchSpec, markdown, run_generation_bench
    from ftguard.schema import from_dict

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise FtguardError(
            f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}"
        ) from None
    values = {
        "model": args.model or "smollm2-135m",
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "batch_sizes": batch_sizes,
        "backend": args.backend,
    }
    spec = from_dict(GenerationBenchSpec, values)
    report = run_generation_bench(spec)
    print(markdown(report))
    out = args.output or args.json
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"json: {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from ftguard.bench import BenchSpec, markdown, run_bench

    if args.generation:
        return _cmd_bench_generation(args)
    spec = BenchSpec(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        model=args.model or "tiny",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        topology=args.topology,
    )
    from ftguard.bench import check_methods

    check_methods(spec.methods)
    with tempfile.TemporaryDirectory(prefix="ftguard-bench-") as tmp:
        report = run_bench(spec, Path(tmp), memory=not args.no_memory)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


def _method_stages(name: str) -> tuple[str, ...]:
    from ftguard.methods.registry import all_methods

    methods = all_methods()
    if name not in methods:
        raise FtguardError(f"unknown method {name!r} (see `ftguard methods`)")
    return methods[name].stages


def cmd_gate(args: argparse.Namespace) -> int:
    from ftguard.gate import CHECKS, gate, load_gate_config, verdict_table
    from ftguard.run_results import read_results

    overrides = {name: getattr(args, name) for name, _ in CHECKS.values()}
    overrides |= {"bound": args.bound, "stages": args.stages}
    if args.policy:
        from ftguard.policy import gate_with_policy

        given = [k for k, v in overrides.items() if v is not None]
        given += [k for k in ("thresholds", "worst_case") if getattr(args, k)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise FtguardError(
                f"{flag} does not go with --policy: the policy's rules hold the limits and stages"
            )
        return gate_with_policy(args.results, args.policy, args.json)
    if args.json:
        raise FtguardError("--json records a --policy verdict: give --policy too")
    if args.worst_case:
        from ftguard.gate import gate_worst_case, read_sweep_report, worst_case_table

        report = read_sweep_report(args.results)
        cfg = load_gate_config(args.thresholds, overrides)
        passed, rows = gate_worst_case(report, cfg)
        print(worst_case_table(rows, passed, report, cfg.bound))
        return 0 if passed else 1
    run = read_results(args.results)
    cfg = load_gate_config(args.thresholds, overrides)
    passed, rows = gate(run, cfg)
    print(verdict_table(rows, passed, run.complete, cfg.bound))
    return 0 if passed else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ftguard.gate import CHECKS
    from ftguard.report_html import build_report, write_report

    overrides = {name: getattr(args, name) for name, _ in CHECKS.values()} | {"bound": args.bound}
    text = build_report(
        args.path,
        samples=args.samples,
        policy=args.policy,
        thresholds=args.thresholds,
        overrides=overrides,
        open_harmful=args.show_harmful,
    )
    print(f"report: {write_report(args.out, text)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.config = DEMO_CONFIG
    if not args.methods:
        return cmd_run(args)
    # Compare alignment methods after the same harmful fine-tune: one run per method, then one table and plot.
    from ftguard.compare import collect_rows, markdown, plot
    from ftguard.pipeline.run import run_pipeline

    base_out = Path(args.output_dir or "runs")
    run_dirs = []
    from ftguard.methods.registry import get_method

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        args_m = argparse.Namespace(**vars(args))
        # Each method runs in its paper's topology (Booster: single LoRA), as the papers' tables compare them.
        # Alignment methods replace the SFT alignment; fine-tuning-stage methods (Lisa, ...) the SFT fine-tune;
        # post-stage methods (recovery, ...) repair the SFT fine-tune, and the repaired model is evaluated too.
        stages = _method_stages(method)
        stage = "align" if "align" in stages else "finetune" if "finetune" in stages else "post"
        topology = get_method(method, stage).preferred_topology
        extra = [f"adapter.topology={topology}"] if topology else []
        method_cls = get_method(method, stage)
        if method_cls.demo_args:
            extra.append(f"{stage}.args={json.dumps(method_cls.demo_args)}")  # JSON is YAML
        args_m.overrides = [*extra, *args.overrides, f"{stage}.method={method}", f"name=demo-{method}"]
        args_m.output_dir = str(base_out / f"demo-{method}")
        cfg = _load(args_m)
        run_pipeline(cfg, overwrite=args.overwrite, on_update=_print_table)
        run_dirs.append(args_m.output_dir)
    rows = collect_rows(run_dirs)
    print(markdown(rows))
    plot(rows, base_out / "demo-compare.png")
    print(f"plot: {base_out / 'demo-compare.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftguard",
        description="Defenses against harmful fine-tuning: align → finetune → evaluate (HS, HS+, FA).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline of a config")
    _add_config_args(p)
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="after a complete run, upload its final model folder (with its model card) to this hub repo; "
        "the token is read from $HF_TOKEN",
    )
    p.add_argument(
        "--hub-public",
        action="store_true",
        help="with --push-to-hub: make a new repo public (default private)",
    )
    p.add_argument(
        "--policy",
        metavar="YAML",
        help="after a complete run, gate it by this release policy as `ftguard gate --policy` (verdict.json in the "
        "run folder; exit 1 when blocked, and --push-to-hub then uploads nothing)",
    )
    p.add_argument(
        "--report", metavar="HTML", help="after a complete run, write its HTML report (with the verdict) here"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "align",
        help="train only the align stage (writes <output_dir>/align); evaluate later with `ftguard evaluate`",
    )
    _add_config_args(p)
    p.set_defaults(func=lambda a: cmd_run(a, train=("align",), evaluate=False))

    p = sub.add_parser("finetune", help="train only the finetune stage(s), from the completed align stage")
    _add_config_args(p)
    p.set_defaults(func=lambda a: cmd_run(a, train=("finetune",), evaluate=False))

    p = sub.add_parser(
        "recover", help="run only the post stage (repair) on the completed fine-tuned models of a run"
    )
    _add_config_args(p)
    p.set_defaults(func=lambda a: cmd_run(a, train=("post",), evaluate=False))

    p = sub.add_parser(
        "evaluate",
        help="evaluate the base model and every completed stage of a run (trains nothing), or any model with --model",
    )
    _add_config_args(p)
    p.add_argument(
        "--model", help="a model folder or hub id to evaluate with the config's evaluation settings"
    )
    p.set_defaults(func=cmd_evaluate)

    from ftguard.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub)

    from ftguard.judge_cli import add_parser as add_judge_parser

    add_judge_parser(sub)

    p = sub.add_parser("methods", help="list the registered methods by stage")
    p.add_argument("--verbose", action="store_true", help="show each method's hyperparameters and defaults")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "attacks", help="list the registered attacks (data.finetune.attack.name: how the upload is built)"
    )
    p.add_argument("--verbose", action="store_true", help="show each attack's arguments and defaults")
    p.set_defaults(func=cmd_attacks)

    p = sub.add_parser("configs", help="list the packaged example configs")
    p.add_argument("--show", metavar="NAME", help="print one packaged config")
    p.add_argument(
        "--resolved", action="store_true", help="with --show: the whole run config, its `base:` chain applied"
    )
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("compare", help="table across runs and an HS-vs-FA plot")
    p.add_argument("runs", nargs="+", help="run output directories (holding results.json)")
    p.add_argument("--out", default="compare.png", help="where to write the PNG plot (default compare.png)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.set_defaults(func=cmd_compare)

    from ftguard.gate import CHECKS, GateConfig
    from ftguard.schema import field_help

    p = sub.add_parser(
        "gate",
        help="release gate: exit 1 if the model a run ships (post if evaluated, else finetune) exceeds HS / "
        "over-refusal or misses FA thresholds",
    )
    p.add_argument(
        "results", help="a run directory or its results.json (with --worst-case: a sweep's output folder)"
    )
    p.add_argument(
        "--worst-case",
        action="store_true",
        help="gate a sweep's worst case: per defense, the highest HS over the attack settings its capability "
        "guard kept (report.json) and the FA there, against --max-hs / --min-fa",
    )
    gate_help = field_help(GateConfig)
    for name, _ in CHECKS.values():  # one flag per threshold of the gate's config
        p.add_argument(f"--{name.replace('_', '-')}", type=float, help=gate_help[name].replace("%", "%%"))
    p.add_argument(
        "--bound",
        choices=["point", "interval"],
        help="compare point estimates (default) or the unfavourable 95%% bound",
    )
    p.add_argument(
        "--stages",
        metavar="STAGE[,STAGE]",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="gate these stages' points (base, align, finetune, post) instead of each run's final point",
    )
    keys = ", ".join([name for name, _ in CHECKS.values()] + ["bound", "stages"])
    p.add_argument(
        "--thresholds",
        metavar="YAML",
        help=f"thresholds from a file (keys {keys}); flags override it",
    )
    p.add_argument(
        "--policy",
        metavar="YAML",
        help="gate by a release policy instead of thresholds: must_pass / warn rules, absolute or relative to a "
        "baseline point (a file, or a packaged name: release)",
    )
    p.add_argument(
        "--json", metavar="OUT", help="with --policy: also write the verdict, with the policy's hash"
    )
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run (results, judge, gate, sample answers) or a sweep's folder",
    )
    p.add_argument(
        "path", metavar="RUN_OR_SWEEP", help="a run's output folder (results.json) or a sweep's (report.json)"
    )
    p.add_argument("--out", default="report.html", help="where to write the page (default report.html)")
    p.add_argument(
        "--samples",
        type=int,
        default=20,
        help="rows of generations.jsonl shown per kind and point (default 20)",
    )
    p.add_argument(
        "--show-harmful",
        action="store_true",
        help="open the answers to harmful prompts (collapsed behind a warning by default)",
    )
    p.add_argument("--policy", metavar="YAML", help="add the verdict of a release policy (a run only)")
    p.add_argument("--thresholds", metavar="YAML", help="add the gate's verdict with thresholds from a file")
    for name, _ in CHECKS.values():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, help=gate_help[name].replace("%", "%%"))
    p.add_argument(
        "--bound", choices=["point", "interval"], help="with thresholds: as `ftguard gate --bound`"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "bench", help="step time and peak memory of methods as ratios to SFT, measured in one run"
    )
    p.add_argument(
        "--methods",
        default="sft",
        help="comma-separated method names (sft is always included); name:key=value times a variant, e.g. repnoise:readout=sampled",
    )
    p.add_argument(
        "--model",
        help="tiny, smollm2-135m, gemma3-270m, a hub id or a path (default tiny; smollm2-135m with --generation)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--seq-len", type=int, default=128, help="every batch is padded to exactly this many tokens"
    )
    p.add_argument(
        "--topology",
        choices=["double", "single", "full"],
        default="double",
        help="LoRA (r 8, q/k/v/o) or full",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, interleaved across methods")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory measurement")
    p.add_argument("--json", help="write the report (time_ratio, memory_ratio per method) to this file")
    p.add_argument(
        "--generation",
        action="store_true",
        help="instead: tokens/s of batched greedy generation vs one prompt at a time, on the same held-out "
        "harmful prompts (uses --model, --prompts, --max-new-tokens, --batch-sizes, --backend, --output)",
    )
    p.add_argument("--prompts", type=int, default=64, help="--generation: number of prompts (default 64)")
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="--generation: new tokens per prompt (default 48)"
    )
    p.add_argument(
        "--batch-sizes",
        default="1,32",
        help="--generation: comma-separated batch sizes; 1 (one prompt at a time) is always included",
    )
    p.add_argument(
        "--backend",
        choices=["hf", "vllm", "auto"],
        default="auto",
        help="--generation: hf only; vllm adds a vLLM row (error without GPU + vllm); auto adds it when available",
    )
    p.add_argument("--output", metavar="FILE.json", help="--generation: write the JSON report to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "demo",
        help="offline demo on SmolLM2-135M: base → SFT alignment → harmful fine-tune (≈20 min on 2 cores)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the demo config",
    )
    p.add_argument(
        "--output-dir", help="where to write (default runs/demo; with --methods, runs/demo-<method>)"
    )
    p.add_argument(
        "--methods",
        help="compare methods after the same harmful fine-tune, e.g. sft,vaccine,booster,repnoise,lisa (one run each; "
        "alignment methods replace the SFT alignment, fine-tuning-stage methods the SFT fine-tune)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs of a different config")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="ftguard: %(message)s",
        stream=sys.stderr,
    )
    try:
        from ftguard.precision import forced_precision

        forced_precision()  # a typo in $FTGUARD_PRECISION fails here, not after a stage has trained
        code = args.func(args)
        if (
            "torch" in sys.modules
        ):  # a command that never loaded torch (configs, a dry run) has no process group
            from ftguard.distributed import shutdown

            shutdown()  # only after success: a rank that failed would leave the others waiting at its barrier
        return code
    except FtguardError as exc:
        print(f"ftguard: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk, a quota or a permission: the environment, not a bug. Nothing half-written is marked
        # complete, so the same command picks up where this one stopped.
        print(
            f"ftguard: error: {exc}; fix it (free disk space, check permissions) and run the same command "
            "again: complete outputs are kept and an interrupted training resumes from its last checkpoint",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("ftguard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
