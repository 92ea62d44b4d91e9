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


# ---------------------------------------------------------------- method sections: blpa (and swat+blpa)
def test_blpa_section_parses_and_round_trips(tmp_path):
    from leanprop.blpa.config import BLPAConfig
    from leanprop.swat.config import SWATConfig

    p = tmp_path / "b.yaml"
    p.write_text("model: {name: preact_resnet20, kwargs: {shortcut: pad}}\n"
                 "method: {name: blpa}\nblpa: {bits: 8, mode: ref, codec_bits: null, kernels: torch}\n")
    cfg = C.load(p, ["blpa.codec_min_bytes=0"])
    assert cfg.blpa == BLPAConfig(bits=8, mode="ref", codec_bits=None, kernels="torch", codec_min_bytes=0)
    assert isinstance(cfg.blpa.window, float)
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.method_configs(cfg) == [cfg.blpa]
    # no section: the defaults; dense: nothing to convert
    assert C.method_configs(C.load(None, ["method.name=blpa"])) == [BLPAConfig()]
    assert C.method_configs(C.load(None, [])) == []
    # swat+blpa: both configs, SWAT first, each from its own section (or its defaults)
    both = C.load(None, ["method.name=swat+blpa", "blpa.bits=2"])
    assert C.method_configs(both) == [SWATConfig(), BLPAConfig(bits=2)]
    both = C.load(None, ["method.name=swat+blpa", "swat.sparsity=0.5"])
    assert C.method_configs(both) == [SWATConfig(sparsity=0.5), BLPAConfig()]


def test_section_inherited_from_base_can_be_removed(tmp_path):
    (tmp_path / "base.yaml").write_text("method: {name: blpa}\nblpa: {bits: 8}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmethod: {name: dense}\n")
    with pytest.raises(C.ConfigError, match="a blpa: section is set"):
        C.load(tmp_path / "child.yaml")
    cfg = C.load(tmp_path / "child.yaml", ["blpa=null"])
    assert cfg.method.name == "dense" and cfg.blpa is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["blpa.bits=8"], r"a blpa: section is set but method.name='dense' does not use blpa: "
                          r"set method.name=blpa \(or remove the blpa: section\)"),
        (["method.name=swat", "blpa.bits=8"], r"set method.name=swat\+blpa"),
        (["method.name=blpa", "swat.sparsity=0.5"], r"a swat: section is set .* set method.name=swat\+blpa"),
        (["swat.sparsity=0.5"], r"a swat: section is set .*'dense' does not use swat: set method.name=swat "),
        (["method.name=blpaa"], r"method.name='blpaa': unknown method 'blpaa'.* Did you mean 'blpa'\?"),
        (["method.name=swat-u90+swat-u80"], r"names swat twice"),
        (["method.name=swat-q90"], r"unknown SWAT preset 'q90'"),
        (["method.name=blpa", "blpa.bitz=4"], r"Unknown config key 'blpa.bitz'. Did you mean 'bits'\?"),
        (["method.name=blpa", "blpa.windw=2"], r"Did you mean 'window'\?"),
        (["method.name=blpa", "blpa.bits=3"], r"blpa: BLPA bits must be one of \(2, 4, 8, 32\), got 3"),
        (["method.name=blpa", "blpa.bits=eight"], r"blpa.bits: expected an integer"),
        (["method.name=blpa", "blpa.mode=exact"], r"mode 'exact': use 'signaware' or 'ref'"),
        (["method.name=blpa", "blpa.mode=ref", "blpa.window=2"], r"fixes window=3.0"),
        (["method.name=blpa", "blpa.window=0"], r"window must be > 0"),
        (["method.name=blpa", "blpa.codec_bits=16"], r"codec_bits must be 2, 4, 8, 32 or null"),
        (["method.name=blpa", "blpa.policy={conv2d: 4}"], r"unknown op kind .conv2d."),
        (["method.name=blpa", "blpa.kernels=cuda"], r"kernels 'cuda'"),
        (["method.name=blpa", "blpa.simulate=maybe"], r"blpa.simulate: expected true or false"),
        (["method.name=blpa", "blpa=4"], r"blpa: expected a mapping of keys"),
    ],
)
def test_bad_blpa_input(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(None, overrides)


def test_blpa_presets_follow_the_paper_and_differ_from_exact_only_in_the_method():
    from pathlib import Path

    folder = Path(__file__).parents[1] / "configs" / "blpa"
    names = {p.name for p in folder.glob("*.yaml")}
    expected = {f"preact_resnet164_{ds}_{v}.yaml" for ds in ("cifar10", "cifar100") for v in ("exact", "8bit", "4bit")}
    expected |= {f"preact_resnet20_cifar10_{v}.yaml" for v in ("exact", "8bit", "4bit", "2bit")}
    assert expected <= names
    for ds in ("cifar10", "cifar100"):
        exact = C.load(folder / f"preact_resnet164_{ds}_exact.yaml")
        assert exact.data.name == ds and exact.method.name == "dense" and exact.blpa is None
        assert exact.model.name == "preact_resnet164" and exact.model.kwargs == {"shortcut": "pad"}
        # Chakrabarti & Moseley 2019, §5: batch 128, 64k iterations, momentum 0.9, wd 2e-4,
        # 0.01 for 400 it, 0.1, /10 at 32k and 48k
        assert exact.data.batch_size == 128 and exact.train.max_steps == 64000
        assert exact.train.epochs * 391 >= 64000  # ~164 epochs of CIFAR's 50k images at batch 128
        assert exact.optim.momentum == 0.9 and exact.optim.weight_decay == 2e-4
        assert exact.schedule.name == "piecewise" and exact.schedule.boundaries == [400, 32000, 48000]
        assert exact.schedule.values == [0.01, 0.1, 0.01, 0.001]
    for stem, bits in [("preact_resnet164_cifar10", (8, 4)), ("preact_resnet164_cifar100", (8, 4)),
                       ("preact_resnet20_cifar10", (8, 4, 2))]:
        exact = C.load(folder / f"{stem}_exact.yaml")
        assert exact.model.kwargs == {"shortcut": "pad"} and exact.method.name == "dense"
        for k in bits:
            cfg = C.load(folder / f"{stem}_{k}bit.yaml")
            assert cfg.method.name == f"blpa{k}" and C.method_configs(cfg) == [C.BLPAConfig(bits=k)]
            d, e = C.to_dict(cfg), C.to_dict(exact)
            assert {key for key in d if d[key] != e[key]} == {"method", "blpa"}, (stem, k)
