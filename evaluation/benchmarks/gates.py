"""The release's quality gate simulated: how often does it pass a variant whose loss is exactly
the margin (its false-pass rate, at most alpha by design), and how often one that changes nothing?

    slipway bench gates [--seeds 2000] [--margin 0.10] [--alpha 0.05]

Variants at the margin lose exactly `margin` of the base's score (relative), with flips one way
or both, at base accuracies of 0.36 to 0.89 (AT_MARGIN); each is drawn on `seeds` simulated
suites of every size in SIZES, paired items in four cells, and judged by the gate's own test
(evaluation/quality/noninferiority.py). The false-pass rate per size is pooled over them, with its
Wilson 95% interval, beside each variant's own. The identical variant (base accuracy 0.6, no
flips) gives the share of suites on which the gate can pass a variant that changes nothing.
Writes gates.json to $SLIPWAY_HOME/bench.
"""

from __future__ import annotations

import json
import math

import click
import numpy as np

from configs.home import Home
from evaluation.quality.noninferiority import Flips, score_z, z_of

# (both right, harmful flip, beneficial flip) shares; the rest is both wrong.
AT_MARGIN = {
    "harmful flips only, base 0.70": (0.63, 0.07, 0.0),
    "flips both ways, base 0.70": (0.60, 0.10, 0.03),
    "harmful flips only, base 0.40": (0.36, 0.04, 0.0),
    "many flips both ways, base 0.40": (0.30, 0.10, 0.06),
}
IDENTICAL = (0.6, 0.0, 0.0)
SIZES = (27, 58, 105, 231, 1000)


def pass_rate(
    shares: tuple[float, float, float], n: int, seeds: int, margin: float, alpha: float, seed: int
) -> float:
    """The share of `seeds` simulated suites of n items on which the gate passes the variant."""
    both, harmful, beneficial = shares
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(n, [both, harmful, beneficial, 1 - both - harmful - beneficial], seeds)
    z = z_of(alpha)
    return float(np.mean([score_z(Flips(*map(int, c)), 1 - margin) > z for c in drawn]))


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def loss_of(shares: tuple[float, float, float]) -> float:
    both, harmful, beneficial = shares
    return 1 - (both + beneficial) / (both + harmful)


def run(seeds: int, margin: float, alpha: float) -> dict:
    if margin != 0.10:
        raise click.BadParameter("the variants at the margin are drawn for a margin of 0.10")
    for name, shares in AT_MARGIN.items():  # the table is exact, not approximately at the margin
        if not math.isclose(loss_of(shares), margin):
            raise AssertionError(f"{name}: loss {loss_of(shares)} is not the margin {margin}")
    sizes = []
    for n in SIZES:
        rates = {
            name: pass_rate(shares, n, seeds, margin, alpha, seed)
            for seed, (name, shares) in enumerate(AT_MARGIN.items())
        }
        pooled = sum(rates.values()) / len(rates)
        low, high = wilson(pooled, seeds * len(rates))
        identical = pass_rate(IDENTICAL, n, seeds, margin, alpha, 100)
        sizes.append(
            {
                "items": n,
                "false_pass_rate": round(pooled, 4),
                "interval_95": [round(low, 4), round(high, 4)],
                "by_variant": {k: round(v, 4) for k, v in rates.items()},
                "identical_pass_rate": round(identical, 4),
            }
        )
        click.echo(
            f"{n:5d} items: false-pass {pooled:.4f} [{low:.4f}, {high:.4f}] "
            f"(alpha {alpha}); identical variant passes {identical:.3f}"
        )
    result = {
        "seeds": seeds,
        "margin": margin,
        "alpha": alpha,
        "variants_at_margin": AT_MARGIN,
        "identical": IDENTICAL,
        "sizes": sizes,
    }
    out = Home.from_env().root / "bench" / "gates.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"written to {out}")
    return result
