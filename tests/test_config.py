"""The config loader: `_base_` inheritance, overrides, and errors that name the key and the file."""
import textwrap

import pytest

from sparse_detr.config import ConfigError, config_from_dict, load_config, to_dict


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path / "base.yaml", """
        model: {hidden_dim: 128, two_stage: true}
        train: {epochs: 12, lr_drop_epochs: [8]}
    """)
    child = _write(tmp_path / "child.yaml", """
        _base_: base.yaml
        model: {rho: 0.1}
        train: {epochs: 20}
    """)
    cfg = load_config(child, ["model.rho=0.3", "train.lr=1e-4", "data.train_scales=[32, 64]"])
    assert cfg.model.hidden_dim == 128 and cfg.model.two_stage  # from the base
    assert cfg.train.epochs == 20  # the child wins over the base
    assert cfg.train.lr_drop_epochs == [8]
    assert cfg.model.rho == 0.3  # the command line wins over both
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.train_scales == [32, 64]
    assert cfg.model.enc_layers == 6  # untouched default


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path / "typo.yaml", "model: {two_stgae: true}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "model.two_stgae" in msg and "typo.yaml" in msg and "two_stage" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    _write(tmp_path / "base.yaml", "train: {epoch: 3}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*train\.epoch"):
        load_config(child)


@pytest.mark.parametrize("override, fragment", [
    ("model.rho=abc", "model.rho"),
    ("model.two_stage=3", "model.two_stage"),
    ("model.backbone=resnet18", "model.backbone"),
    ("train.lr_drop_epochs=5", "train.lr_drop_epochs"),
    ("model.nope=1", "model.nope"),
    ("rho=0.1", "rho"),
    ("model.rho", "key=value"),
])
def test_bad_overrides(tmp_path, override, fragment):
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert fragment in str(e.value)
    if "=" in override:
        assert "command-line override" in str(e.value) or "key=value" in str(e.value)


def test_cross_field_validation(tmp_path):
    path = _write(tmp_path / "c.yaml", "model: {rho: 0.1}\n")
    with pytest.raises(ConfigError, match="two_stage"):
        load_config(path)
    with pytest.raises(ConfigError, match="rho"):
        config_from_dict({"model": {"rho": 1.5, "two_stage": True}})


@pytest.mark.parametrize("override, fragment", [
    ("train.log_every=0", "train.log_every"),
    ("train.checkpoint_every_iters=-1", "train.checkpoint_every_iters"),
    ("train.eval_every_epochs=-1", "train.eval_every_epochs"),
    ("train.max_iters_per_epoch=-2", "train.max_iters_per_epoch"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.ema_decay=0", "train.ema_decay"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.lr=0", "train.lr"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.crop_min=700", "data.crop_min"),
    ("data.train_scales=[]", "data.train_scales"),
    ("model.rho=-0.1", "model.rho"),
    ("model.rho_levels=[0.1,0.1,0.1,0.1]", "model.rho_levels"),  # the base is dense (rho 0): nothing to select
    ("model.hidden_dim=0", "model.hidden_dim"),
    ("model.nheads=0", "model.nheads"),  # a size error, not a ZeroDivisionError from the divisibility check
    ("model.dim_feedforward=0", "model.dim_feedforward"),
    ("model.dec_n_points=0", "model.dec_n_points"),
    ("model.dropout=1.0", "model.dropout"),
    ("data.label_mapping=identity", "data.label_mapping"),
])
def test_range_validation_names_the_key(tmp_path, override, fragment):
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true}\n")
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(path, [override])


@pytest.mark.parametrize("override", ["train.eval_every_epochs=0", "train.checkpoint_every_iters=0",
                                      "train.max_iters_per_epoch=0", "data.num_workers=0", "model.rho=1.0",
                                      "data.label_mapping=category_id"])
def test_documented_boundary_values_are_valid(tmp_path, override):
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true}\n")
    load_config(path, [override])  # 0 = never evaluate / only end-of-epoch checkpoints / whole epochs / no workers
    cfg = load_config(path, ["model.rho=0.2", "model.scorer_target=os"])
    assert cfg.model.scorer_target == "os"


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_round_trip_through_dict(tmp_path):
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true, rho: 0.2}\ndata: {synthetic: {num_train: 7}}\n")
    cfg = load_config(path)
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    assert again.data.synthetic.num_train == 7


def _float_fields(cls, prefix=""):
    """Every float field of the schema, found by walking the dataclasses (not a list kept by hand)."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float:
            out.append(prefix + f.name)
    return out


def test_every_float_field_rejects_non_finite_values(tmp_path):
    from sparse_detr.config import Config

    fields = _float_fields(Config)
    assert "train.lr" in fields and "loss.focal_alpha" in fields and len(fields) >= 15
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true}\n")
    for key in fields:
        for text in ("inf", "-inf", ".nan", "1e999"):
            with pytest.raises(ConfigError, match=rf"`{key}` must be a finite number"):
                load_config(path, [f"{key}={text}"])
    yaml_file = _write(tmp_path / "inf.yaml", "train: {lr: .inf}\n")
    with pytest.raises(ConfigError, match="inf.yaml.*train.lr"):
        load_config(yaml_file)


def test_num_threads_is_auto_or_a_positive_count(tmp_path):
    path = _write(tmp_path / "c.yaml", "model: {two_stage: true}\n")
    assert load_config(path).train.num_threads == "auto"
    assert load_config(path, ["train.num_threads=3"]).train.num_threads == 3
    for bad in ("0", "many", "1.5"):
        with pytest.raises(ConfigError, match="train.num_threads"):
            load_config(path, [f"train.num_threads={bad}"])


def test_a_misspelled_section_and_config_path_get_suggestions():
    with pytest.raises(ConfigError, match=r"command-line override 'trian.epochs=5': unknown key `trian` "
                                          r"\(did you mean `train`\?\)"):
        load_config("configs/demo_synthetic.yaml", ["trian.epochs=5"])
    with pytest.raises(ConfigError, match=r"config file not found: \S*configs/demo_synthetc.yaml \(did you mean "
                                          r"\S*configs/demo_synthetic.yaml"):
        load_config("configs/demo_synthetc.yaml")
