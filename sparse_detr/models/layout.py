"""The official checkpoint layout of the composed detector, in one table.

``SparseDETR``'s module tree is its parts (``tokens``, ``encoder``, ``queries``, ``decoder``); official checkpoints
name the same tensors ``backbone.*``, ``input_proj.*``, ``transformer.*``, ``class_embed.<h>``, ``bbox_embed.<h>``,
``query_embed``, with every head ``h`` (decoder layers 0..Ld-1, the two-stage head Ld, the encoder aux heads) also
under ``transformer.decoder.*`` (two-stage: class heads; refinement: box heads) and ``transformer.encoder.*`` (aux
heads). ``key_rules`` lists (module prefix, official prefixes); the detector's state-dict hooks translate with it,
so ``state_dict()`` has the official keys and ``load_state_dict`` takes them (``tests/data/official_keys``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["key_rules", "to_official", "from_official"]

Rules = list[tuple[str, tuple[str, ...]]]


def _children(module: nn.Module) -> list[str]:
    """First-level names in a module's state dict (its submodules, parameters and buffers)."""
    return sorted({key.split(".")[0] for key in nn.Module.state_dict(module).keys()} if module is not None else ())


def key_rules(model: nn.Module) -> Rules:
    """(module-key prefix, official prefixes) for every tensor of a ``SparseDETR``; a prefix ending in "." names a
    module, otherwise a tensor."""
    decoder, queries, encoder = model.decoder, model.queries, model.encoder
    num_dec = len(decoder.class_embed)
    two_stage = hasattr(queries, "pos_trans")
    refine = decoder.stack.refine
    rules: Rules = [
        ("tokens.backbone.", ("backbone.",)),
        ("tokens.input_proj.", ("input_proj.",)),
        ("tokens.level_embed", ("transformer.level_embed",)),
        ("encoder.stack.", ("transformer.encoder.",)),
        ("decoder.stack.", ("transformer.decoder.",)),
    ]
    rules += [(f"encoder.selector.{name}", (f"transformer.{name}",)) for name in _children(encoder.selector)]
    for owner in ("encoder", "queries"):  # one projection, reachable from both stages
        rules += [(f"{owner}.proposal_proj.{name}", (f"transformer.{name}",)) for name in _children(
            getattr(model, owner).proposal_proj if hasattr(getattr(model, owner), "proposal_proj") else None)]
    rules += [(f"queries.{name}", (f"transformer.{name}",)) for name in ("pos_trans", "pos_trans_norm",
                                                                       "reference_points")]
    rules.append(("queries.query_embed.", ("query_embed.",)))

    heads = [(f"decoder.{{}}.{h}.", h) for h in range(num_dec)]
    heads += [("queries.{}.", num_dec)] if two_stage else []
    num_aux = len(encoder.aux_class_embed) if encoder.aux_class_embed is not None else 0
    heads += [(f"encoder.aux_{{}}.{j}.", num_dec + 1 + j) for j in range(num_aux)]
    for kind, decoder_alias in (("class_embed", two_stage), ("bbox_embed", refine)):
        for module_prefix, h in heads:
            official = [f"{kind}.{h}."]
            official += [f"transformer.decoder.{kind}.{h}."] if decoder_alias else []
            official += [f"transformer.encoder.{kind}.{h - num_dec - 1}."] if h > num_dec else []
            rules.append((module_prefix.format(kind), tuple(official)))
    return rules


def _match(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith(".") or not prefix else key == prefix or key.startswith(
        prefix + ".")


def to_official(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``register_state_dict_post_hook``: rename the module keys under ``prefix`` to the official ones (a tensor
    with several official names appears under each)."""
    rules = key_rules(module)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        rule = max((r for r in rules if _match(local, r[0])), key=lambda r: len(r[0]), default=None)
        if rule is None:
            continue
        value = state_dict.pop(key)
        for official in rule[1]:
            state_dict[prefix + official + local[len(rule[0]):]] = value


def from_official(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """``register_load_state_dict_pre_hook``: rename official keys under ``prefix`` to the module keys (a tensor
    shared by several modules is loaded into each). Keys no rule knows stay, for ``strict`` to report."""
    reverse: dict[str, list[str]] = {}
    for module_prefix, officials in key_rules(module):
        for official in officials:
            reverse.setdefault(official, []).append(module_prefix)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        official = max((o for o in reverse if _match(local, o)), key=len, default=None)
        if official is None:
            continue
        value = state_dict.pop(key)
        for module_prefix in reverse[official]:
            state_dict[prefix + module_prefix + local[len(official):]] = value
