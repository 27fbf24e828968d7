"""Regenerates the model table in README.md from `diffussm_jax.models.stats` (abstract; CPU ok).

python scripts/model_table.py            # rewrites the table between the README markers
python scripts/model_table.py --print    # prints it only
"""

from __future__ import annotations

import argparse
import os
import re

from diffussm_jax import models

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def _paper(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table() -> str:
    rows = [
        "| model | D | depth | M / patch | params (M) | paper | GMACs 256 | paper | GMACs 512 "
        "| paper | of which SSM (256) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models.names():
        at256 = models.stats(name, input_size=32)
        at512 = models.stats(name, input_size=64)
        model = models.create(name, input_size=32, in_channels=4, num_classes=1000)
        grouping = (
            f"M={model.hourglass_ratio}" if name.startswith("DiffuSSM") else f"p={model.patch_size}"
        )
        paper = at256["paper"]
        ssm_part = at256["gmacs_breakdown"].get("blocks.ssm")
        rows.append(
            f"| {name} | {model.hidden_size} | {model.depth} | {grouping} "
            f"| {at256['params'] / 1e6:.1f} | {_paper(paper.get('params_m'), '.0f')} "
            f"| {at256['forward_gmacs']:.2f} | {_paper(paper.get('gmacs_256'), '.2f')} "
            f"| {at512['forward_gmacs']:.2f} | {_paper(paper.get('gmacs_512'), '.1f')} "
            f"| {'-' if ssm_part is None else format(ssm_part, '.1f')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--print", action="store_true", help="print instead of editing README")
    args = parser.parse_args()
    text = table()
    if args.print:
        print(text)
        return
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    readme = pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme)
    with open(README, "w", encoding="utf-8") as f:
        f.write(readme)
    print(text)


if __name__ == "__main__":
    main()
