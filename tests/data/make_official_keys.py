"""Regenerate ``tests/data/official_keys/*.txt`` from the reference descriptions of the official checkpoints.

The reference (``shared/reference/official_state_dict_keys.md``, beside the repository) lists every non-backbone
tensor of the official Sparse DETR ρ=0.1 checkpoint and, as diffs, the other layouts; the ResNet-50 backbone is
"torchvision's resnet50 keys without fc.*, frozen BatchNorms without num_batches_tracked". This script applies
those rules and checks the tensor counts and element totals the reference states, then writes one
``key<TAB>shape`` line per tensor. The Swin-T layouts (``official_swin_t_layout.md`` in the same folder) are the
187 listed backbone keys plus the R50 layout's other keys, with the input projections reading 192 / 384 / 768 / 768
channels. The tests read only the written files, so they do not need the reference.

    python tests/data/make_official_keys.py [path/to/official_state_dict_keys.md]
"""

from __future__ import annotations

import ast
import re
import sys
from math import prod
from pathlib import Path

import torchvision

HERE = Path(__file__).resolve().parent
DEFAULT_REFERENCE = HERE.parents[1].parent / "shared" / "reference" / "official_state_dict_keys.md"
OUT = HERE / "official_keys"

# layout file → (tensor count, element count) as stated in the reference's "Counts" table.
EXPECTED = {
    "sparse_detr_r50": (760, 44_695_428),
    "deformable_detr_r50_two_stage": (630, 42_379_762),
    "deformable_detr_r50": (561, 40_955_900),
    "efficient_detr_r50": (630, 42_247_922),
    "sparse_detr_swin_t": (682, None),  # the Swin reference states tensor counts only
    "efficient_detr_swin_t": (552, None),
}
SWIN_IN_CHANNELS = {"input_proj.0.0.weight": 192, "input_proj.1.0.weight": 384, "input_proj.2.0.weight": 768,
                    "input_proj.3.0.weight": 768}
_SWIN_LINE = re.compile(r"^(backbone\.0\.body\.\S+)\t(\(.*\))\s*$")
_LINE = re.compile(r"^\s+(?:only in ([^:]+): )?(\S+)\t(\(.*\))\s*$")


def backbone_keys() -> dict[str, tuple[int, ...]]:
    """ResNet-50 under ``backbone.0.body.``: torchvision keys without ``fc.*`` and ``num_batches_tracked``."""
    state = torchvision.models.resnet50(weights=None).state_dict()
    return {f"backbone.0.body.{k}": tuple(v.shape) for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def parse_sections(text: str) -> dict[str, list[tuple[str | None, str, tuple[int, ...]]]]:
    """Tensor lines of every ``## `` section: (the 'only in X' tag or None, key, shape)."""
    sections: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None and (m := _LINE.match(line)):
            sections[current].append((m.group(1), m.group(2), tuple(ast.literal_eval(m.group(3)))))
    return sections


def layouts(text: str) -> dict[str, dict[str, tuple[int, ...]]]:
    sections = parse_sections(text)
    (sparse_name,) = [s for s in sections if s.startswith("Sparse DETR")]
    (two_stage_name,) = [s for s in sections if s.startswith("Deformable DETR two-stage")]
    (plain_name,) = [s for s in sections if s.startswith("Deformable DETR plain")]

    sparse = {**backbone_keys(), **{k: s for _, k, s in sections[sparse_name]}}
    two_stage = dict(sparse)
    for tag, key, shape in sections[two_stage_name]:
        if tag == "Sparse DETR":
            del two_stage[key]
    for tag, key, shape in sections[two_stage_name]:
        if tag == "Deformable DETR":
            two_stage[key] = shape
    plain = dict(two_stage)
    for tag, key, shape in sections[plain_name]:
        if tag == "two-stage+refine":
            del plain[key]
    for tag, key, shape in sections[plain_name]:
        if tag == "plain":
            plain[key] = shape
    # "Efficient DETR equals the two-stage + refine layout except pos_trans (256, 512) / pos_trans_norm (256,)":
    # the Sparse DETR query initialisation, whose shapes the Sparse DETR listing holds.
    efficient = dict(two_stage)
    for key in ("transformer.pos_trans.weight", "transformer.pos_trans.bias",
                "transformer.pos_trans_norm.weight", "transformer.pos_trans_norm.bias"):
        efficient[key] = sparse[key]
    return {"sparse_detr_r50": sparse, "deformable_detr_r50_two_stage": two_stage,
            "deformable_detr_r50": plain, "efficient_detr_r50": efficient}


def swin_layout(r50: dict[str, tuple[int, ...]], swin_text: str) -> dict[str, tuple[int, ...]]:
    """An R50 layout with the listed Swin-T backbone keys instead of ResNet-50's and Swin-T's input channels."""
    swin = {m.group(1): tuple(ast.literal_eval(m.group(2)))
            for line in swin_text.splitlines() if (m := _SWIN_LINE.match(line))}
    if len(swin) != 187:
        raise SystemExit(f"the Swin-T reference lists {len(swin)} backbone keys, expected 187")
    out = {k: s for k, s in r50.items() if not k.startswith("backbone.")}
    for key, channels in SWIN_IN_CHANNELS.items():
        out[key] = (out[key][0], channels, *out[key][2:])
    return {**swin, **out}


def main(reference: Path) -> None:
    result = layouts(reference.read_text(encoding="utf-8"))
    swin_text = (reference.parent / "official_swin_t_layout.md").read_text(encoding="utf-8")
    for name in ("sparse_detr", "efficient_detr"):
        result[f"{name}_swin_t"] = swin_layout(result[f"{name}_r50"], swin_text)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, keys in result.items():
        count, elements = len(keys), sum(prod(s) for s in keys.values())
        if count != EXPECTED[name][0] or EXPECTED[name][1] not in (None, elements):
            raise SystemExit(f"{name}: got {count} tensors / {elements} elements, the reference says "
                             f"{EXPECTED[name][0]} / {EXPECTED[name][1]}")
        lines = [f"{k}\t{','.join(map(str, s))}" for k, s in sorted(keys.items())]
        (OUT / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {count} tensors, {elements:,} elements")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_REFERENCE)
