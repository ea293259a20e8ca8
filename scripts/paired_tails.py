"""How far the study's p-values can be trusted: null rejection rates of the paired bootstrap and of Student's t over
the seeds, simulated at the testbed's design (5 seeds × 200 prompts).

    python scripts/paired_tails.py --out docs/results/paired-inference      # about 10 minutes on one core

Each simulated study draws 200 prompts from a population (each prompt's chance of a harmful answer uniform in
[0.15, 0.85], and its own effect of the defense, normal with SD ``het``, mean 0), then five seeds: a shift shared
by both arms (SD 0.05) and the defense's own effect at that seed (SD ``tau``, mean 0: no effect in the population).
Both arms answer each prompt with the same random number (the pairing the study's shared prompts and aligned model
give). ``tau`` is what a seed-level test must see: the study's defenses show a spread of their per-seed
differences of 1.6 to 5.3 points (docs/testbed.md, step 5), which the table's "seed SD" column matches.

Read at α = 0.05 (one defense's interval), 0.01 and 0.005 (where Holm reads the smallest of a dozen p-values): a
test whose rate exceeds α finds effects that are not there. ``both`` rejects only when the bootstrap and the t test
both do (the study's ‡).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ftguard.evaluation.paired import paired_bootstrap, seed_level_t

ALPHAS = (0.05, 0.01, 0.005)
SETTINGS = [(het, tau) for het in (0.10, 0.25) for tau in (0.02, 0.035, 0.05, 0.07)]


def simulate(het: float, tau: float, sims: int, seeds: int = 5, prompts: int = 200, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    boot, by_t, spread = [], [], []
    for k in range(sims):
        chance = rng.uniform(0.15, 0.85, prompts)
        own = rng.normal(0.0, het, prompts)
        shift = rng.normal(0.0, 0.05, (seeds, 1))
        effect = rng.normal(0.0, tau, (seeds, 1))
        coin = rng.random((seeds, prompts))
        control = coin < np.clip(chance + shift, 0, 1)
        treated = coin < np.clip(chance + shift + effect + own, 0, 1)
        boot.append(paired_bootstrap(treated, control, n_boot=4000, seed=k)["p"])
        t = seed_level_t(treated, control)
        by_t.append(t["p"])
        spread.append(t["se"] * np.sqrt(seeds))
    boot_p, t_p = np.array(boot), np.array(by_t)
    return {
        "het": het,
        "tau": tau,
        "sims": sims,
        "seed_sd": float(np.median(spread)),
        "rejections": {
            f"{alpha:g}": {
                "bootstrap": float((boot_p < alpha).mean()),
                "seed_t": float((t_p < alpha).mean()),
                "both": float(((boot_p < alpha) & (t_p < alpha)).mean()),
            }
            for alpha in ALPHAS
        },
    }


def markdown(results: list[dict]) -> str:
    head = " | ".join(f"α {a:g}: bootstrap / t / both" for a in ALPHAS)
    lines = [
        f"| prompt effect SD | seed effect SD | seed SD of the difference (points) | {head} |",
        "|---|---|---|" + "---|" * len(ALPHAS),
    ]
    for r in results:
        cells = [
            " / ".join(f"{100 * r['rejections'][f'{a:g}'][k]:.1f}" for k in ("bootstrap", "seed_t", "both"))
            for a in ALPHAS
        ]
        lines.append(f"| {r['het']:g} | {r['tau']:g} | {r['seed_sd']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tails.json and tails.md")
    parser.add_argument("--sims", type=int, default=800, help="simulated studies per setting")
    args = parser.parse_args(argv)
    results = [simulate(het, tau, args.sims) for het, tau in tqdm(SETTINGS, desc="settings", unit="setting")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tails.json").write_text(json.dumps({"settings": results}, indent=1) + "\n")
    (args.out / "tails.md").write_text(
        "# Null rejection rates (%) at 5 seeds × 200 prompts (`scripts/paired_tails.py`)\n\n"
        + markdown(results)
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
