"""The mount configuration's one serialized form (JSON), and the FUSE options
a config and the server's privilege give. Pure: no mount."""
import json

import pytest

from unionfs.serve.config import MountConfig, OptionError, apply_options
from unionfs.serve.server import fuse_options


def full_config():
    cfg = MountConfig(lowers=["/l 1", "/l\t2"], upper="/u\n", work="/w\\", mountpoint="/m",
                      source="overlay", foreground=True, debug=True)
    apply_options(cfg, "volatile,metacopy=on,whiteout=oci,noatime,nodev")
    return cfg


def test_a_config_survives_its_json_round_trip():
    cfg = full_config()
    assert MountConfig.from_json(cfg.to_json()) == cfg
    assert MountConfig.from_json(MountConfig().to_json()) == MountConfig()


def test_a_path_that_is_not_utf8_survives_the_trip():
    cfg = MountConfig(lowers=["/layer-\udcff\udcfe"], mountpoint="/m-\udc80")
    text = cfg.to_json()
    text.encode("ascii")  # the wire form is plain ASCII
    assert MountConfig.from_json(text) == cfg


def test_the_json_is_one_line():
    assert "\n" not in full_config().to_json()


@pytest.mark.parametrize("change", [
    {"lowers": "/not-a-list"}, {"lowers": [1]}, {"upper": 5}, {"debug": "yes"},
    {"flags": [None]}, {"mountpoint": ["/m"]},
])
def test_a_field_of_the_wrong_type_is_refused(change):
    data = dict(json.loads(MountConfig().to_json()), **change)
    with pytest.raises(ValueError, match="mount configuration field"):
        MountConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("data", [
    {"lowers": []},                                             # fields missing
    [],                                                         # not an object
    dict(json.loads(MountConfig().to_json()), extra=1),         # a field unknown
])
def test_missing_or_unknown_fields_are_refused(data):
    with pytest.raises(ValueError, match="not a mount configuration"):
        MountConfig.from_json(json.dumps(data))


def test_privileged_servers_ask_for_allow_other_dev_and_suid():
    cfg = MountConfig(lowers=["/l"], upper="/u", work="/w")
    assert {"allow_other", "dev", "suid"} <= fuse_options(cfg, privileged=True)
    assert not {"allow_other", "dev", "suid"} & fuse_options(cfg, privileged=False)


def test_nodev_nosuid_and_a_read_only_stack_are_honoured():
    cfg = MountConfig(lowers=["/l"])
    apply_options(cfg, "nodev,nosuid")
    opts = fuse_options(cfg, privileged=True)
    assert "allow_other" in opts and "ro" in opts
    assert not {"dev", "suid"} & opts and {"nodev", "nosuid"} <= opts


def test_an_unknown_option_is_a_usage_error():
    with pytest.raises(OptionError, match="unknown option"):
        apply_options(MountConfig(), "lowerdir=/a,bogus=1")


@pytest.mark.parametrize("value, layers", [
    ("/a", ["/a"]),
    ("/a:/b:/c", ["/a", "/b", "/c"]),
    ("/a:/b::/data", ["/a", "/b", "/data"]),
    ("/odd\\:name:/b", ["/odd:name", "/b"]),
])
def test_lowerdir_is_split_as_the_kernel_splits_it(value, layers):
    assert apply_options(MountConfig(), f"lowerdir={value}").lowers == layers


@pytest.mark.parametrize("text, words", [
    ("lowerdir=/a:", "empty layer"),
    ("lowerdir=:/a", "empty layer"),
    ("lowerdir=/a:::/b", "empty layer"),
    ("lowerdir=", "at least one"),
    ("upperdir=", "upperdir= needs a directory"),
    ("workdir=", "workdir= needs a directory"),
    ("=", "unknown option '='"),
])
def test_empty_option_values_are_refused(text, words):
    with pytest.raises(OptionError, match=words):
        apply_options(MountConfig(), text)


def test_messages_show_paths_as_they_are_but_on_one_line():
    with pytest.raises(OptionError, match="unknown option 'x=/a\\\\nb'"):
        apply_options(MountConfig(), "x=/a\nb")
