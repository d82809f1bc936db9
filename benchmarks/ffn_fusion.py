"""Whether FFN fusion would pay on this CPU: one FFN of width a + b against two FFNs of widths a and b, timed.

    python benchmarks/ffn_fusion.py [--model smollm2-135m] [--scenario 128/64] [--repeats 15]

FFN fusion (NVIDIA, arXiv 2503.18908) takes consecutive layers whose
attention was removed and runs their FFNs in parallel on the same input, as
one FFN of the summed width (up and gate projections stacked, down
projections concatenated; each layer's RMSNorm weight folded into its rows).
The weights and FLOPs stay the same; what one fused FFN saves is the second
RMSNorm, the second residual add and the second block's fixed overhead, and
on GPUs with tensor parallelism one all-reduce per fused pair, which is where
the paper finds its gain. It costs quality (the second FFN no longer sees the
first one's output), so it pays only where it saves time on the target.

This measures that saving with the profile pass's own timing
(``hwopt.profiling.measure_costs``: torch on this CPU, every variant in each
interleaved round, cold weight copies, decode at three contexts): for each
pair of widths, the scenario's runtime of the two FFNs summed against that of
one FFN of their summed width, the saving per fused pair, and that saving as
a fraction of the parent's whole runtime (the profile's sum of blocks).
Nothing is trained; weights are random (timing does not depend on them).
"""

from __future__ import annotations

import argparse

from hwopt.model.config import FFNConfig
from hwopt.model_source import resolve_model
from hwopt.profiling import choose_backend, layer_rows, measure_costs, model_total, model_variants
from hwopt.search_space import Scenario, model_sub_variants, sub_variant_of
from hwopt.targets import resolve_target


def width_pairs(intermediate: int) -> list[tuple[int, int]]:
    """Pairs of FFN widths a fused FFN would join: the parent's own, and the search space's 1/2 and 1/4 widths
    (rounded to multiples of 256, as ``ffn_fractions`` are), equal and mixed."""
    half, quarter = (max(256, round(intermediate * f / 256) * 256) for f in (0.5, 0.25))
    return [(intermediate, intermediate), (half, half), (quarter, quarter), (intermediate, quarter)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scenario", default="128/64", help="input/output tokens (default 128/64), batch 1, fp32")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()

    source = resolve_model(args.model)
    config, scenario, target = source.config, Scenario.parse(args.scenario), resolve_target("cpu")
    backend, label = choose_backend("torch", target, scenario, require_measured=True)
    pairs = width_pairs(config.intermediate_size)
    widths = sorted({w for pair in pairs for w in pair} | {a + b for a, b in pairs})
    variants = [sub_variant_of(config, FFNConfig(intermediate_size=w)) for w in widths]
    parent_attention = {attention.name: attention for attention, _ in model_sub_variants(source)}  # for the total
    costs = measure_costs(config, variants + list(parent_attention.values()), target, scenario, backend, label,
                          args.repeats, "FFN widths and the parent's attention")
    parent_ms = model_total(costs, layer_rows(costs, model_variants(source)))["runtime_ms"]
    ms = {v.config.intermediate_size: costs["ffn"][v.name]["runtime_ms"] for v in variants}

    print(f"{args.model} on {label['device']} ({label['backend']}), {scenario.describe()}; "
          f"parent {parent_ms:.0f} ms (the sum of its blocks, timed here)")
    print(f"{'widths':>12} {'two FFNs ms':>12} {'fused ms':>10} {'fused/two':>10} {'saved ms':>9} "
          f"{'saved/parent':>13}")
    for a, b in pairs:
        two, fused = ms[a] + ms[b], ms[a + b]
        print(f"{f'{a}+{b}':>12} {two:12.2f} {fused:10.2f} {fused / two:10.3f} {two - fused:9.2f} "
              f"{(two - fused) / parent_ms:13.2%}")


if __name__ == "__main__":
    main()
