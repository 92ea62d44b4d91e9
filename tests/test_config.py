import pytest

from leanprop import config as C


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: resnet32}\ntrain: {epochs: 7}\n")
    cfg = C.load(p, ["train.epochs=3", "optim.lr=0.05", "schedule.milestones=[1, 2]", "data.root=/x"])
    assert cfg.model.name == "resnet32"
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 0.05
    assert cfg.schedule.milestones == [1, 2]
    assert cfg.data.root == "/x"
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_unknown_key_suggests_fix():
    with pytest.raises(C.ConfigError, match="Did you mean 'epochs'"):
        C.load(None, ["train.epoch=3"])
    with pytest.raises(C.ConfigError, match="Unknown config key 'modle'"):
        C.from_dict({"modle": {"name": "x"}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.epochs=three", "expected an integer"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("train.amp=fp8", "train.amp"),
        ("data.name=mnist", "data.name"),
        ("train.save_best=val", "data.val_split"),
        ("schedule.name=piecewise", "one more entry"),
        ("train.channels_last=maybe", "true or false"),
        ("noequals", "key.path=value"),
    ],
)
def test_bad_values(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="top level"):
        C.load(lst)


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert len(files) >= 50
    for f in files:
        C.load(f)


def test_every_config_key_is_documented():
    import dataclasses
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    import typing

    hints = typing.get_type_hints(C.RunConfig)
    for f in dataclasses.fields(C.RunConfig):
        section = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if section:
            value = section[0]
            assert f"## `{f.name}`" in doc, f.name
            for g in dataclasses.fields(value):
                assert f"| `{g.name}` |" in doc, f"{f.name}.{g.name} missing from docs/configuration.md"
        else:
            assert f"| `{f.name}` |" in doc, f"{f.name} missing from docs/configuration.md"


def test_base_include_merges_and_detects_loops(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name: resnet32}\ntrain: {epochs: 9, channels_last: true}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 2}\n")
    cfg = C.load(tmp_path / "child.yaml")
    assert cfg.model.name == "resnet32" and cfg.train.epochs == 2 and cfg.train.channels_last
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(C.ConfigError, match="loop"):
        C.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        C.load(tmp_path / "c.yaml")
